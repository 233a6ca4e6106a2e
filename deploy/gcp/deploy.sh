#!/bin/bash
# Creates everything, in order: IAM, firewall, shard tier, LB tier, global LB.
# Same settings and DRY_RUN=1 behaviour as the step scripts.
set -euo pipefail
dir="$(dirname "${BASH_SOURCE[0]}")"
for step in 00-iam.sh 10-firewall.sh 20-shard-tier.sh 30-lb-tier.sh 40-global-lb.sh; do
  bash "$dir/$step"
done
