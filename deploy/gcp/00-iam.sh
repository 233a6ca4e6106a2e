#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Step 3.0: service accounts of both tiers and their project roles. The
# firewall rules select the tiers by these service accounts.
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config

ROLES=(roles/logging.logWriter roles/monitoring.metricWriter roles/artifactregistry.reader roles/storage.objectViewer)

gc iam service-accounts create "$NAME-lb" --display-name "odin-ws ws-lb tier"
gc iam service-accounts create "$NAME-shard" --display-name "odin-ws ws-shard tier"
for sa in "$LB_SA" "$SHARD_SA"; do
  for role in "${ROLES[@]}"; do
    gc projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$sa" --role "$role" --condition None
  done
done
# LB VMs list the shard group's instances for their member file.
gc projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$LB_SA" --role roles/compute.viewer --condition None
