#!/bin/bash
# GCE shutdown script of both tiers (instance metadata "shutdown-script"): stop
# ws-lb / ws-shard with SIGTERM and wait up to 45 s, so that clients are closed
# with 1012 over the drain window instead of the VM vanishing under them.
set -uo pipefail

systemctl stop odin-ws-connections-metric.service odin-shard-members.service 2>/dev/null || true
for svc in ws-lb ws-shard; do
  if command -v docker >/dev/null 2>&1 && docker inspect "$svc" >/dev/null 2>&1; then
    docker stop --time 45 "$svc"
  elif systemctl is-active --quiet "$svc.service"; then
    systemctl stop "$svc.service"
  fi
done
