#!/usr/bin/env bash
# Installs what `make test` needs and is not part of a fresh machine, skipping anything
# already present: Python packages for the independent test clients (websockets,
# kafka-python, kosoku, PyJWT, dnslib), cargo-nextest, the tansu Kafka-protocol broker (the first
# build takes ~10-20 minutes on 2 cores; later runs reuse the installed binary), and for the
# client libraries Debian's chromium and the npm packages of clients/js (typescript,
# playwright-core; `npm ci` from the committed package-lock.json; no browser download).
# deploy/tests/run.sh installs its own tools (shellcheck, promtool, python-hcl2).
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }

py_missing=()
python3 -c 'import websockets' 2>/dev/null || py_missing+=("websockets>=12")
# kafka-python 2.x is what every Kafka test and benchmark was written and checked against;
# 3.0 (November 2026) reworked the client's networking, so it is held back until checked.
python3 -c 'import kafka, sys; sys.exit(not kafka.__version__.startswith("2."))' 2>/dev/null ||
    py_missing+=("kafka-python>=2.0,<3")
python3 -c 'import kosoku' 2>/dev/null || py_missing+=("kosoku")
# PyJWT makes the tokens of the auth e2e test (an implementation independent of ours).
python3 -c 'import jwt, cryptography' 2>/dev/null || py_missing+=("PyJWT[crypto]>=2.8,<3")
# dnslib: the DNS wire format of the DNS server in tests/e2e/membership_dns_e2e.py.
python3 -c 'import dnslib' 2>/dev/null || py_missing+=("dnslib>=0.9,<0.10")
if ((${#py_missing[@]})); then
    log "pip install ${py_missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check "${py_missing[@]}"
fi

# prlimit (util-linux) runs the binaries under a small open-files limit in the fd tests.
if ! command -v prlimit >/dev/null 2>&1; then
    log "apt-get install util-linux (prlimit)"
    apt-get update -qq && apt-get install -y -qq util-linux
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo install --locked cargo-nextest"
    cargo install --locked cargo-nextest
fi

if ! command -v tansu >/dev/null 2>&1; then
    log "cargo install --locked tansu --features dynostore (one-time, slow)"
    cargo install --locked tansu --features dynostore
fi
# Client libraries: Node.js for the TypeScript client, Debian's Chromium for its browser test.
apt_missing=()
command -v node >/dev/null 2>&1 || apt_missing+=(nodejs npm)
command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
if ((${#apt_missing[@]})); then
    log "apt-get install ${apt_missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}"
fi
js="$(dirname "$0")/../clients/js"
# npm ci replaces node_modules; run it only when the lock file is newer than the install.
if [[ ! -f "$js/node_modules/.package-lock.json" || "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]]; then
    log "npm ci (clients/js)"
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
fi
log "ok"
