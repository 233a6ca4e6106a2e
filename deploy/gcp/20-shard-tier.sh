#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Step 3.2: the ws-shard tier. SHARD_COUNT VMs in a regional stateful MIG; VM
# $NAME-shard-<i> always has the reserved internal address $NAME-shard-<i>
# (kept across autohealing and updates), because ws-lb's backend list is built
# from these addresses.
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config
require CONTAINER_IMAGE

for ((i = 0; i < SHARD_COUNT; i++)); do
  gc compute addresses create "$NAME-shard-$i" \
    --region "$REGION" --subnet "$SUBNET" --addresses "${SHARD_IP_LIST[$i]}"
done

gc compute instance-templates create "$SHARD_TEMPLATE" \
  --machine-type "$SHARD_MACHINE_TYPE" \
  --image-family "$IMAGE_FAMILY" --image-project "$IMAGE_PROJECT" \
  --boot-disk-type pd-balanced --boot-disk-size 20GB \
  --network "$NETWORK" --subnet "$SUBNET" --region "$REGION" --no-address \
  --service-account "$SHARD_SA" --scopes cloud-platform \
  --tags "$NAME-shard" --labels odin-ws-role=shard \
  --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
  --metadata-from-file "startup-script=$DEPLOY_DIR/startup/ws-shard-startup.sh,shutdown-script=$DEPLOY_DIR/startup/odin-ws-shutdown.sh" \
  --metadata "$(metadata_arg \
    enable-oslogin=TRUE google-logging-enabled=true google-monitoring-enabled=true \
    "odin-container-image=$CONTAINER_IMAGE" "odin-release-url=$RELEASE_URL" \
    "odin-args=$SHARD_ARGS" "odin-env=" \
    "odin-open-ports=$SHARD_BASE_PORT:$SHARD_LAST_PORT,$SHARD_ADMIN_PORT")"

# Autohealing: shard 0 of the VM must answer /live (liveness: 200 while the process serves;
# /health is 503 while it drains or warms its Kafka history, which must not recreate the VM).
gc compute health-checks create http "$NAME-shard-hc" --global \
  --port "$SHARD_BASE_PORT" --request-path /live \
  --check-interval 10s --timeout 5s --healthy-threshold 2 --unhealthy-threshold 3

# Created empty; every VM is added below with its own stateful address.
gc compute instance-groups managed create "$NAME-shard" \
  --region "$REGION" --zones "$ZONES" \
  --template "$SHARD_TEMPLATE" --size 0 --base-instance-name "$NAME-shard" \
  --health-check "$NAME-shard-hc" --initial-delay 180 \
  --stateful-internal-ip interface-name=nic0,auto-delete=never \
  --instance-redistribution-type NONE

for ((i = 0; i < SHARD_COUNT; i++)); do
  gc compute instance-groups managed create-instance "$NAME-shard" \
    --region "$REGION" --instance "$NAME-shard-$i" \
    --stateful-internal-ip "interface-name=nic0,address=projects/$PROJECT/regions/$REGION/addresses/$NAME-shard-$i,auto-delete=never"
done
