#!/usr/bin/env bash
# Installs and starts what the service manager needs on a fresh Debian/Ubuntu machine, saying what
# it does: Docker Engine (docker.io) and a running dockerd, busybox-static and mmdebstrap (to build
# images without a registry), and a Python virtual environment in .venv with the project installed.
# Safe to run again: it skips whatever is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  say "need root for: $*"; exit 1; fi; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The test command (setup.sh --tests) also drives a real browser: Debian's Chromium, as Playwright's own
# browser download is not reachable from every machine.
[ "${1:-}" = --tests ] && ! command -v chromium >/dev/null && missing+=(chromium)
# ... and a network namespace of its own, for a host that the allow-list refuses.
[ "${1:-}" = --tests ] && ! command -v ip >/dev/null && missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker_ok=$(python3 - <<'PY' 2>/dev/null
import socket
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect("/var/run/docker.sock")
s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
print("OK" if b"OK" in s.recv(4096) else "")
PY
) || [ "$docker_ok" != OK ]; then
  say "no Docker daemon answers on /var/run/docker.sock; starting dockerd (log: /var/log/dsm-dockerd.log)"
  as_root bash -c 'nohup dockerd >/var/log/dsm-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    [ -S /var/run/docker.sock ] && python3 -c '
import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect("/var/run/docker.sock")
s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n"); assert b"OK" in s.recv(4096)' 2>/dev/null && break
    sleep 1
  done
  [ -S /var/run/docker.sock ] || { say "dockerd did not start; see /var/log/dsm-dockerd.log"; tail -20 /var/log/dsm-dockerd.log >&2; exit 1; }
  say "dockerd is up"
fi

if [ ! -x "$root/.venv/bin/python" ]; then
  say "creating the Python virtual environment in .venv"
  python3 -m venv "$root/.venv"
fi
# The service needs only its own dependencies; the tests add theirs (pytest, the fuzzer, the browser driver...).
extras="" stamp="$root/.venv/.dsm-installed"
if [ "${1:-}" = --tests ]; then extras="[dev]" stamp="$root/.venv/.dsm-installed-dev"; fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  say "installing the project and its Python dependencies${extras:+ (with the test tools)} into .venv"
  "$root/.venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$root/.venv/bin/python" -m pip install -q -e "$root$extras"
  touch "$stamp"
  if [ -n "$extras" ]; then touch "$root/.venv/.dsm-installed"; fi  # the test install holds the service's
fi
