#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Step 3.4: global external Application Load Balancer (HTTPS + WebSockets) in
# front of the ws-lb MIG, with a Google-managed certificate for $DOMAIN and an
# optional port-80 redirect to HTTPS.
set -euo pipefail
# shellcheck source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
load_config
require DOMAIN

gc compute addresses create "$NAME-ip" --global --ip-version IPV4

# /health is liveness: a draining ws-lb (503) leaves the load balancer, a live
# one stays even when no shard can take a client (clients get 1012, not a 5xx).
gc compute health-checks create http "$NAME-lb-backend-hc" --global \
  --port "$LB_PORT" --request-path /health --description "$LB_HEALTH_CHECK_DESCRIPTION" \
  --check-interval 5s --timeout 5s --healthy-threshold 2 --unhealthy-threshold 2

# --timeout is the longest a WebSocket may stay open through the proxy.
gc compute backend-services create "$NAME-lb-backend" --global \
  --load-balancing-scheme EXTERNAL_MANAGED --protocol HTTP --port-name ws \
  --health-checks "$NAME-lb-backend-hc" --global-health-checks \
  --timeout 86400s --connection-draining-timeout 300s --session-affinity NONE \
  --enable-logging --logging-sample-rate 0.1

gc compute backend-services add-backend "$NAME-lb-backend" --global \
  --instance-group "$NAME-lb" --instance-group-region "$REGION" \
  --balancing-mode UTILIZATION --max-utilization 0.8 --capacity-scaler 1.0

gc compute url-maps create "$NAME-https" --global --default-service "$NAME-lb-backend"

gc compute ssl-certificates create "$NAME-cert" --global --domains "$DOMAIN"

gc compute target-https-proxies create "$NAME-https-proxy" --global \
  --url-map "$NAME-https" --ssl-certificates "$NAME-cert"

gc compute forwarding-rules create "$NAME-https" --global \
  --load-balancing-scheme EXTERNAL_MANAGED --address "$NAME-ip" \
  --target-https-proxy "$NAME-https-proxy" --ports 443

if [[ "$ENABLE_HTTP_REDIRECT" == 1 ]]; then
  gc compute url-maps import "$NAME-http-redirect" --global \
    --source "$GCP_DIR/http-redirect-url-map.yaml" --quiet
  gc compute target-http-proxies create "$NAME-http-proxy" --global \
    --url-map "$NAME-http-redirect"
  gc compute forwarding-rules create "$NAME-http" --global \
    --load-balancing-scheme EXTERNAL_MANAGED --address "$NAME-ip" \
    --target-http-proxy "$NAME-http-proxy" --ports 80
fi
