#!/usr/bin/env bash
# Installs what `make test` needs and is not part of a fresh machine, skipping anything
# already present: Python packages for the independent test clients, cargo-nextest.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }

py_missing=()
python3 -c 'import websockets' 2>/dev/null || py_missing+=("websockets>=12")
if ((${#py_missing[@]})); then
    log "pip install ${py_missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check "${py_missing[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo install --locked cargo-nextest"
    cargo install --locked cargo-nextest
fi
log "ok"
