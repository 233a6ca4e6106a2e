#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Step 3.1: firewall rules.
#  - Google front ends and health checkers (35.191.0.0/16, 130.211.0.0/22) ->
#    ws-lb :3001 and the shard health-check port :3002.
#  - ws-lb tier -> every shard port of the shard tier (by service account).
#  - optionally Prometheus -> admin ports 9101/9102.
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config

gc compute firewall-rules create "$NAME-allow-google-lb-hc" \
  --network "$NETWORK" --direction INGRESS --priority 1000 --action ALLOW \
  --rules "tcp:$LB_PORT,tcp:$SHARD_BASE_PORT" \
  --source-ranges "$GOOGLE_LB_SOURCE_RANGES" \
  --target-service-accounts "$LB_SA,$SHARD_SA"

gc compute firewall-rules create "$NAME-allow-lb-to-shards" \
  --network "$NETWORK" --direction INGRESS --priority 1000 --action ALLOW \
  --rules "tcp:$SHARD_BASE_PORT-$SHARD_LAST_PORT" \
  --source-service-accounts "$LB_SA" \
  --target-service-accounts "$SHARD_SA"

if [[ -n "$PROMETHEUS_SOURCE_RANGES" ]]; then
  gc compute firewall-rules create "$NAME-allow-prometheus" \
    --network "$NETWORK" --direction INGRESS --priority 1000 --action ALLOW \
    --rules "tcp:$LB_ADMIN_PORT,tcp:$SHARD_ADMIN_PORT" \
    --source-ranges "$PROMETHEUS_SOURCE_RANGES" \
    --target-service-accounts "$LB_SA,$SHARD_SA"
fi
