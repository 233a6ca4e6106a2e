#!/usr/bin/env bash
# Installs what `make test` needs and is not part of a fresh machine, skipping anything
# already present: Python packages for the independent test clients (websockets,
# kafka-python, kosoku), cargo-nextest, and the tansu Kafka-protocol broker (the first
# build takes ~10-20 minutes on 2 cores; later runs reuse the installed binary).
# deploy/tests/run.sh installs its own tools (shellcheck, promtool, python-hcl2).
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }

py_missing=()
python3 -c 'import websockets' 2>/dev/null || py_missing+=("websockets>=12")
python3 -c 'import kafka' 2>/dev/null || py_missing+=("kafka-python>=2.0")
python3 -c 'import kosoku' 2>/dev/null || py_missing+=("kosoku")
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
log "ok"
