#!/usr/bin/env bash
# Runs a command in a fresh network namespace with only a loopback interface, so a test
# that must use fixed ports (`make run` listens on 3001-3004, 9101, 9102) cannot collide
# with anything else on the machine. The namespace is removed on exit. Without the rights to
# create one (not root), the command runs in the host's namespace and says so.
set -euo pipefail

ns="odin-test-$$"
if ip netns add "$ns" 2>/dev/null; then
    trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" "$@"
else
    echo "in-netns: cannot create a network namespace; running in the host's (fixed ports must be free)" >&2
    "$@"
fi
