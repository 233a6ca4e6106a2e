#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Step 3.3: the ws-lb tier. Regional MIG of LB_TARGET_SIZE stateless VMs,
# autohealed on /health :3001 and autoscaled on CPU and on client connections
# per VM (custom metric published by deploy/startup/ws-lb-startup.sh).
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config
require CONTAINER_IMAGE

gc compute instance-templates create "$LB_TEMPLATE" \
  --machine-type "$LB_MACHINE_TYPE" \
  --image-family "$IMAGE_FAMILY" --image-project "$IMAGE_PROJECT" \
  --boot-disk-type pd-balanced --boot-disk-size 20GB \
  --network "$NETWORK" --subnet "$SUBNET" --region "$REGION" --no-address \
  --service-account "$LB_SA" --scopes cloud-platform \
  --tags "$NAME-lb" --labels odin-ws-role=lb \
  --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
  --metadata-from-file "startup-script=$DEPLOY_DIR/startup/ws-lb-startup.sh,shutdown-script=$DEPLOY_DIR/startup/odin-ws-shutdown.sh" \
  --metadata "$(metadata_arg \
    enable-oslogin=TRUE google-logging-enabled=true google-monitoring-enabled=true \
    "odin-container-image=$CONTAINER_IMAGE" "odin-release-url=$RELEASE_URL" \
    "odin-args=$LB_ARGS" "odin-env=$LB_ENV" \
    "odin-open-ports=$LB_PORT,$LB_ADMIN_PORT" \
    "odin-connections-metric=$LB_CONNECTIONS_METRIC" \
    "odin-shard-group=$SHARD_GROUP" \
    "odin-shard-ports=$SHARD_BASE_PORT:$SHARD_LAST_PORT")"

# Autohealing check: more tolerant than the load balancer's (40-global-lb.sh).
# /health is liveness only (503 only while draining): a shard-tier outage never
# gets LB VMs recreated.
gc compute health-checks create http "$NAME-lb-autoheal-hc" --global \
  --port "$LB_PORT" --request-path /health --description "$LB_HEALTH_CHECK_DESCRIPTION" \
  --check-interval 10s --timeout 5s --healthy-threshold 2 --unhealthy-threshold 6

gc compute instance-groups managed create "$NAME-lb" \
  --region "$REGION" --zones "$ZONES" \
  --template "$LB_TEMPLATE" --size "$LB_TARGET_SIZE" --base-instance-name "$NAME-lb" \
  --health-check "$NAME-lb-autoheal-hc" --initial-delay 120

gc compute instance-groups managed set-named-ports "$NAME-lb" \
  --region "$REGION" --named-ports "ws:$LB_PORT"

gc compute instance-groups managed set-autoscaling "$NAME-lb" \
  --region "$REGION" \
  --min-num-replicas "$LB_MIN_REPLICAS" --max-num-replicas "$LB_MAX_REPLICAS" \
  --target-cpu-utilization "$LB_CPU_TARGET" \
  --custom-metric-utilization "metric=$LB_CONNECTIONS_METRIC,utilization-target=$LB_CONNECTIONS_TARGET,utilization-target-type=GAUGE" \
  --cool-down-period 120 --mode on \
  --scale-in-control max-scaled-in-replicas=1,time-window=600
