#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Deletes everything deploy.sh created, in reverse order. A delete that fails
# (typically: already gone) is reported and skipped.
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config

# Global load balancer.
gc_teardown compute forwarding-rules delete "$NAME-https" "$NAME-http" --global --quiet
gc_teardown compute target-https-proxies delete "$NAME-https-proxy" --global --quiet
gc_teardown compute target-http-proxies delete "$NAME-http-proxy" --global --quiet
gc_teardown compute ssl-certificates delete "$NAME-cert" --global --quiet
gc_teardown compute url-maps delete "$NAME-https" "$NAME-http-redirect" --global --quiet
gc_teardown compute backend-services delete "$NAME-lb-backend" --global --quiet
gc_teardown compute health-checks delete "$NAME-lb-backend-hc" --global --quiet
gc_teardown compute addresses delete "$NAME-ip" --global --quiet

# LB tier (the autoscaler goes with its group).
gc_teardown compute instance-groups managed delete "$NAME-lb" --region "$REGION" --quiet
gc_teardown compute instance-templates delete "$LB_TEMPLATE" --quiet
gc_teardown compute health-checks delete "$NAME-lb-autoheal-hc" --global --quiet

# Shard tier.
gc_teardown compute instance-groups managed delete "$NAME-shard" --region "$REGION" --quiet
gc_teardown compute instance-templates delete "$SHARD_TEMPLATE" --quiet
gc_teardown compute health-checks delete "$NAME-shard-hc" --global --quiet

# Firewall.
gc_teardown compute firewall-rules delete "$NAME-allow-google-lb-hc" "$NAME-allow-lb-to-shards" --quiet
if [[ -n "$PROMETHEUS_SOURCE_RANGES" ]]; then
  gc_teardown compute firewall-rules delete "$NAME-allow-prometheus" --quiet
fi

# IAM.
gc_teardown projects remove-iam-policy-binding "$PROJECT" --member "serviceAccount:$LB_SA" --role roles/compute.viewer --condition None
for sa in "$LB_SA" "$SHARD_SA"; do
  for role in roles/logging.logWriter roles/monitoring.metricWriter roles/artifactregistry.reader roles/storage.objectViewer; do
    gc_teardown projects remove-iam-policy-binding "$PROJECT" --member "serviceAccount:$sa" --role "$role" --condition None
  done
  gc_teardown iam service-accounts delete "$sa" --quiet
done
