#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Step 3.2: the ws-shard tier. A regional MIG autoscaled between
# SHARD_MIN_REPLICAS and SHARD_MAX_REPLICAS VMs on CPU and on connections per VM
# (custom metric published by deploy/startup/ws-shard-startup.sh). ws-lb follows
# the group's running VMs (label odin-ws-group) through its member file
# (deploy/startup/ws-lb-startup.sh), so VMs need no fixed address. Scale-in
# drains: the shutdown script sends SIGTERM, the shard closes its clients with
# 1012 over its drain window; a cool-down and a scale-in control keep the group
# from flapping.
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config
require CONTAINER_IMAGE

gc compute instance-templates create "$SHARD_TEMPLATE" \
  --machine-type "$SHARD_MACHINE_TYPE" \
  --image-family "$IMAGE_FAMILY" --image-project "$IMAGE_PROJECT" \
  --boot-disk-type pd-balanced --boot-disk-size 20GB \
  --network "$NETWORK" --subnet "$SUBNET" --region "$REGION" --no-address \
  --service-account "$SHARD_SA" --scopes cloud-platform \
  --tags "$NAME-shard" --labels "odin-ws-role=shard,odin-ws-group=$NAME-shard" \
  --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
  --metadata-from-file "startup-script=$DEPLOY_DIR/startup/ws-shard-startup.sh,shutdown-script=$DEPLOY_DIR/startup/odin-ws-shutdown.sh" \
  --metadata "$(metadata_arg \
    enable-oslogin=TRUE google-logging-enabled=true google-monitoring-enabled=true \
    "odin-container-image=$CONTAINER_IMAGE" "odin-release-url=$RELEASE_URL" \
    "odin-args=$SHARD_ARGS" "odin-env=" \
    "odin-open-ports=$SHARD_BASE_PORT:$SHARD_LAST_PORT,$SHARD_ADMIN_PORT" \
    "odin-connections-metric=$SHARD_CONNECTIONS_METRIC")"

# Autohealing: shard 0 of the VM must answer /live (liveness: 200 while the process serves;
# /health is 503 while it drains or warms its Kafka history, which must not recreate the VM).
gc compute health-checks create http "$NAME-shard-hc" --global \
  --port "$SHARD_BASE_PORT" --request-path /live \
  --check-interval 10s --timeout 5s --healthy-threshold 2 --unhealthy-threshold 3

gc compute instance-groups managed create "$NAME-shard" \
  --region "$REGION" --zones "$ZONES" \
  --template "$SHARD_TEMPLATE" --size "$SHARD_MIN_REPLICAS" --base-instance-name "$NAME-shard" \
  --health-check "$NAME-shard-hc" --initial-delay 180 \
  --instance-redistribution-type NONE

gc compute instance-groups managed set-autoscaling "$NAME-shard" \
  --region "$REGION" \
  --min-num-replicas "$SHARD_MIN_REPLICAS" --max-num-replicas "$SHARD_MAX_REPLICAS" \
  --target-cpu-utilization "$SHARD_CPU_TARGET" \
  --custom-metric-utilization "metric=$SHARD_CONNECTIONS_METRIC,utilization-target=$SHARD_CONNECTIONS_TARGET,utilization-target-type=GAUGE" \
  --cool-down-period "$SHARD_COOL_DOWN" --mode on \
  --scale-in-control "$SHARD_SCALE_IN_CONTROL"
