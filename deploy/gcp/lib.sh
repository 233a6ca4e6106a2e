# shellcheck shell=bash disable=SC2034,SC2153
# (SC2034/SC2153: values are set for, or come from, the files that source this.)
# Helpers of the deploy/gcp scripts (sourced after config.sh).
#
# DRY_RUN=1: print every gcloud command line instead of running it -- one per
# line, shell-quoted, nothing else on stdout (messages go to stderr).

DRY_RUN="${DRY_RUN:-0}"
GCP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPLOY_DIR="$(dirname "$GCP_DIR")"

log() { printf '%s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# quote WORD: WORD as one POSIX shell word.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD ARG...: print (DRY_RUN=1) or run one command.
run() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$line"
  else
    log "+ $line"
    "$@"
  fi
}

# gc ARG...: one gcloud command in $PROJECT.
gc() { run gcloud "$@" --project "$PROJECT"; }

# gc_teardown ARG...: like gc, but a failure (typically: already deleted) is
# reported and skipped.
gc_teardown() {
  gc "$@" || log "  (failed; continuing)"
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# Validates config.sh and derives the values every script uses.
load_config() {
  [[ -n "$PROJECT" ]] || die "PROJECT is not set"
  [[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN must be 0 or 1"
  local var
  for var in SHARD_COUNT SHARDS_PER_VM SHARD_MAX_CONNECTIONS SHARD_IP_START \
    LB_TARGET_SIZE LB_MIN_REPLICAS LB_MAX_REPLICAS LB_CONNECTIONS_TARGET; do
    is_uint "${!var}" || die "$var must be a whole number (got '${!var}')"
  done
  ((SHARD_COUNT >= 7 && SHARD_COUNT <= 10)) ||
    die "SHARD_COUNT must be 7..10 (got $SHARD_COUNT)"
  ((SHARDS_PER_VM >= 1 && SHARDS_PER_VM <= 10)) ||
    die "SHARDS_PER_VM must be 1..10 (got $SHARDS_PER_VM)"
  [[ "$SHARD_MEMBERSHIP" == group || "$SHARD_MEMBERSHIP" == static ]] ||
    die "SHARD_MEMBERSHIP must be group or static (got $SHARD_MEMBERSHIP)"
  ((SHARD_MIN_REPLICAS >= 1 && SHARD_MIN_REPLICAS <= SHARD_MAX_REPLICAS)) ||
    die "need 1 <= SHARD_MIN_REPLICAS ($SHARD_MIN_REPLICAS) <= SHARD_MAX_REPLICAS ($SHARD_MAX_REPLICAS)"
  # ws-lb's pool holds 128 shards.
  ((SHARD_MAX_REPLICAS * SHARDS_PER_VM <= 128)) ||
    die "SHARD_MAX_REPLICAS x SHARDS_PER_VM must be at most 128 (ws-lb's pool)"
  ((LB_MIN_REPLICAS >= 1 && LB_MIN_REPLICAS <= LB_MAX_REPLICAS)) ||
    die "need 1 <= LB_MIN_REPLICAS ($LB_MIN_REPLICAS) <= LB_MAX_REPLICAS ($LB_MAX_REPLICAS)"
  ((LB_TARGET_SIZE >= LB_MIN_REPLICAS && LB_TARGET_SIZE <= LB_MAX_REPLICAS)) ||
    die "LB_TARGET_SIZE ($LB_TARGET_SIZE) must lie within [$LB_MIN_REPLICAS, $LB_MAX_REPLICAS]"

  LB_SA="$NAME-lb@$PROJECT.iam.gserviceaccount.com"
  SHARD_SA="$NAME-shard@$PROJECT.iam.gserviceaccount.com"
  SHARD_LAST_PORT=$((SHARD_BASE_PORT + SHARDS_PER_VM - 1))
  LB_TEMPLATE="$NAME-lb-$TEMPLATE_VERSION"
  SHARD_TEMPLATE="$NAME-shard-$TEMPLATE_VERSION"

  local i
  if [[ -z "$SHARD_IPS" ]]; then
    for ((i = 0; i < SHARD_COUNT; i++)); do
      SHARD_IPS+="${SHARD_IPS:+ }$SHARD_IP_PREFIX$((SHARD_IP_START + i))"
    done
  fi
  read -r -a SHARD_IP_LIST <<<"$SHARD_IPS"
  ((${#SHARD_IP_LIST[@]} == SHARD_COUNT)) ||
    die "SHARD_IPS holds ${#SHARD_IP_LIST[@]} addresses, SHARD_COUNT is $SHARD_COUNT"

  # ws://ADDR:PORT/ws for every shard of every shard VM.
  local ip port
  BACKEND_URLS=""
  for ip in "${SHARD_IP_LIST[@]}"; do
    for ((port = SHARD_BASE_PORT; port <= SHARD_LAST_PORT; port++)); do
      BACKEND_URLS+="${BACKEND_URLS:+,}ws://$ip:$port/ws"
    done
  done

  SHARD_ARGS="--shards $SHARDS_PER_VM --base-port $SHARD_BASE_PORT --bind 0.0.0.0 --admin-addr 0.0.0.0:$SHARD_ADMIN_PORT --max-connections $SHARD_MAX_CONNECTIONS --drain-window 10s --grace 30s --log-json"
  if [[ -n "$KAFKA_BROKERS" ]]; then
    SHARD_ARGS+=" --kafka-brokers $KAFKA_BROKERS --kafka-topics $KAFKA_TOPICS --kafka-start $KAFKA_START"
  fi
  [[ -n "$SHARD_CONNECTIONS_TARGET" ]] ||
    SHARD_CONNECTIONS_TARGET=$((SHARDS_PER_VM * SHARD_MAX_CONNECTIONS * 7 / 10))
  if [[ "$SHARD_MEMBERSHIP" == group ]]; then
    # The member file is written by ws-lb-startup.sh from the shard group's VMs.
    SHARD_MEMBERS="--backend-file /var/lib/odin-ws/shards"
    SHARD_GROUP="$NAME-shard"
  else
    SHARD_MEMBERS="--backend-urls=$BACKEND_URLS"
    SHARD_GROUP=""
  fi
  LB_ARGS="--listen 0.0.0.0:$LB_PORT --admin-addr 0.0.0.0:$LB_ADMIN_PORT $SHARD_MEMBERS --allowed-origins $ALLOWED_ORIGINS --trust-forwarded-for"
  LB_ENV="CIRCUIT_BREAKER_FAILURE_THRESHOLD=$CB_FAILURE_THRESHOLD CIRCUIT_BREAKER_TIMEOUT=$CB_TIMEOUT CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS=$CB_HALF_OPEN_MAX_CALLS"
}

require() {
  local var
  for var in "$@"; do
    [[ -n "${!var}" ]] || die "$var is not set"
  done
}

# metadata_arg KEY=VALUE...: one --metadata value. The values hold commas
# (backend URL list), so the list uses gcloud's alternate delimiter syntax
# (`gcloud topic escaping`): ^#^k1=v1#k2=v2.
metadata_arg() {
  local out="^#^" pair
  for pair in "$@"; do
    [[ "$pair" != *"#"* ]] || die "metadata entry contains '#': $pair"
    out+="$pair#"
  done
  printf '%s' "${out%#}"
}
