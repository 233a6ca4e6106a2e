# shellcheck shell=bash disable=SC2034  # variables used by the scripts that source this
# Shared settings of the deploy/gcp scripts (sourced). Every value can be
# overridden from the environment, e.g.
#   PROJECT=my-prod DOMAIN=md.example.com CONTAINER_IMAGE=... ./deploy.sh
# Keep the defaults in step with deploy/terraform/variables.tf.

# ---- project and placement ----------------------------------------------------
PROJECT="${PROJECT:-}"                         # required
REGION="${REGION:-us-central1}"
ZONES="${ZONES:-us-central1-a,us-central1-b,us-central1-c}"
NETWORK="${NETWORK:-default}"
SUBNET="${SUBNET:-default}"                    # needs Private Google Access (no external IPs)
DOMAIN="${DOMAIN:-}"                           # required: name on the managed certificate
ENABLE_HTTP_REDIRECT="${ENABLE_HTTP_REDIRECT:-1}"
NAME="${NAME:-odin-ws}"                        # prefix of every resource name
TEMPLATE_VERSION="${TEMPLATE_VERSION:-v1}"     # instance templates are immutable: bump to roll out

# ---- images ------------------------------------------------------------------
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"         # required, e.g. us-central1-docker.pkg.dev/P/odin/odin-ws:0.1.0
IMAGE_FAMILY="${IMAGE_FAMILY:-cos-stable}"
IMAGE_PROJECT="${IMAGE_PROJECT:-cos-cloud}"
RELEASE_URL="${RELEASE_URL:-}"                 # tarball for Debian images (see deploy/README.md)

# ---- shard tier --------------------------------------------------------------
# The shard tier is an autoscaled MIG; ws-lb follows its running VMs through a
# member file kept current on every LB VM (SHARD_MEMBERSHIP=group; deploy/local's
# one-machine topology runs this too). static: a fixed list of SHARD_COUNT
# reserved addresses in ws-lb's --backend-urls.
SHARD_MEMBERSHIP="${SHARD_MEMBERSHIP:-group}"
SHARD_MIN_REPLICAS="${SHARD_MIN_REPLICAS:-7}"
SHARD_MAX_REPLICAS="${SHARD_MAX_REPLICAS:-10}"
SHARD_CPU_TARGET="${SHARD_CPU_TARGET:-0.6}"
# Connections per shard VM the autoscaler aims at (default: 70 % of the VM's slots).
SHARD_CONNECTIONS_TARGET="${SHARD_CONNECTIONS_TARGET:-}"
SHARD_CONNECTIONS_METRIC="${SHARD_CONNECTIONS_METRIC:-custom.googleapis.com/ws_shard_connections}"
# A new shard VM is not counted by the autoscaler for this long (boot, Kafka warm-up).
SHARD_COOL_DOWN="${SHARD_COOL_DOWN:-180}"
# Scale-in: at most one VM per 15 minutes (each removal drains its clients with 1012).
SHARD_SCALE_IN_CONTROL="${SHARD_SCALE_IN_CONTROL:-max-scaled-in-replicas=1,time-window=900}"
SHARD_COUNT="${SHARD_COUNT:-7}"                # static membership only: 7..10 VMs
SHARDS_PER_VM="${SHARDS_PER_VM:-4}"            # 1..10 shards per VM on ports 3002..
SHARD_MAX_CONNECTIONS="${SHARD_MAX_CONNECTIONS:-6000}"
SHARD_MACHINE_TYPE="${SHARD_MACHINE_TYPE:-n2-standard-8}"
# Static membership only: reserved internal IPs, one per shard VM (space-separated). Default: 10
# consecutive addresses from SHARD_IP_PREFIX + SHARD_IP_START in the subnet.
SHARD_IP_PREFIX="${SHARD_IP_PREFIX:-10.128.0.}"
SHARD_IP_START="${SHARD_IP_START:-10}"
SHARD_IPS="${SHARD_IPS:-}"
KAFKA_BROKERS="${KAFKA_BROKERS:-}"             # empty: no Kafka consumer
KAFKA_TOPICS="${KAFKA_TOPICS:-trades,book}"
# Where a (re)started shard begins each partition: back:N warms its history so clients
# reconnecting to a restarted shard VM recover with `since` (see variables.tf kafka_start).
KAFKA_START="${KAFKA_START:-back:1000}"

# ---- LB tier -----------------------------------------------------------------
LB_TARGET_SIZE="${LB_TARGET_SIZE:-10}"
LB_MIN_REPLICAS="${LB_MIN_REPLICAS:-10}"
LB_MAX_REPLICAS="${LB_MAX_REPLICAS:-20}"
LB_CPU_TARGET="${LB_CPU_TARGET:-0.6}"
LB_CONNECTIONS_TARGET="${LB_CONNECTIONS_TARGET:-20000}"
LB_CONNECTIONS_METRIC="${LB_CONNECTIONS_METRIC:-custom.googleapis.com/ws_lb_active_connections}"
LB_MACHINE_TYPE="${LB_MACHINE_TYPE:-n2-standard-4}"
ALLOWED_ORIGINS="${ALLOWED_ORIGINS:-https://app.example.com}"
CB_FAILURE_THRESHOLD="${CB_FAILURE_THRESHOLD:-10}"
CB_TIMEOUT="${CB_TIMEOUT:-30s}"
CB_HALF_OPEN_MAX_CALLS="${CB_HALF_OPEN_MAX_CALLS:-5}"

# ---- monitoring --------------------------------------------------------------
PROMETHEUS_SOURCE_RANGES="${PROMETHEUS_SOURCE_RANGES:-}"   # CIDRs allowed to scrape 9101/9102

# ---- fixed ports (see deploy/README.md) ---------------------------------------
LB_PORT=3001
LB_ADMIN_PORT=9101
SHARD_BASE_PORT=3002
SHARD_ADMIN_PORT=9102
GOOGLE_LB_SOURCE_RANGES="35.191.0.0/16,130.211.0.0/22"
# What ws-lb's GET /health means (both LB-tier health checks use it; keep in
# step with local.lb_health_check_description in deploy/terraform/main.tf).
LB_HEALTH_CHECK_DESCRIPTION="ws-lb liveness: 200 while it serves clients, 503 only while draining; shard availability is reported in the body and ws_lb_shards_available, not here"
