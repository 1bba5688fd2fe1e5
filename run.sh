#!/usr/bin/env bash
# First command for a fresh machine: install what is missing, build the OCR and Whisper service images
# locally, start the server on the embedded default configuration (port 4000, data in ./dsm-data), run a
# demo OCR job and a demo speech-to-text job through it as 4CAT would, print the text they found, and keep
# serving until Ctrl-C.
#   bash run.sh              PORT=4001 bash run.sh              bash run.sh --demo-only
set -euo pipefail
cd "$(dirname "$0")"
port="${PORT:-4000}"

bash scripts/setup.sh
echo "[run] building the OCR service image (cached after the first time)" >&2
.venv/bin/dsm build-service ocr >/dev/null
echo "[run] building the Whisper service image (cached after the first time; the first build fetches about" \
     "350 MB of wheels and models)" >&2
.venv/bin/dsm build-service whisper >/dev/null

echo "[run] starting the server on port $port" >&2
.venv/bin/dsm serve --port "$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
for _ in $(seq 1 60); do
  .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/api/health', timeout=2)" \
    2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "[run] the server stopped; see the messages above" >&2; exit 1; }
  sleep 0.5
done

.venv/bin/dsm demo --server "http://127.0.0.1:$port" --out dsm-data/demo-results
echo "[run] the result files are in dsm-data/demo-results/ and dsm-data/demo-results-whisper/; the server" \
     "keeps running at" \
     "http://localhost:$port/ (dashboard) until Ctrl-C. Point 4CAT's DMI Service Manager URL there." >&2
[ "${1:-}" = "--demo-only" ] && exit 0
wait "$server"
