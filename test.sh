#!/usr/bin/env bash
# Second command for a fresh machine: install what is missing (see scripts/setup.sh), then run the
# whole test suite against the real Docker engine, then ruff and mypy. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --tests
.venv/bin/python -m pytest "$@"
.venv/bin/ruff check src tests bench
.venv/bin/mypy
