#!/bin/bash
# GCE startup script of the ws-shard tier (instance metadata "startup-script").
# Runs at every boot: tunes the kernel, then runs ws-shard with the arguments
# in metadata "odin-args" -- as a container on Container-Optimized OS, or as the
# systemd unit deploy/systemd/ws-shard.service on Debian/Ubuntu.
set -euo pipefail

ROLE=ws-shard

# ==== BEGIN COMMON: identical in ws-lb-startup.sh and ws-shard-startup.sh (deploy/tests/test_startup.sh checks) ====
#
# Instance metadata read (set by deploy/terraform and deploy/gcp; each role
# script reads a few more keys of its own, below the common block):
#   odin-args             arguments of the binary (required), e.g. "--listen 0.0.0.0:3001 ..."
#   odin-env              space-separated KEY=VALUE pairs for the process environment
#   odin-open-ports       host-firewall ports to open on COS (iptables multiport, e.g. "3001,9101")
#   odin-container-image  image with /usr/local/bin/ws-lb and ws-shard (Container-Optimized OS)
#   odin-release-url      tarball bin/<binary> + systemd/<binary>.service (Debian/Ubuntu images)
# Test hooks: ODIN_ROOT prefixes every path written, ODIN_OS_RELEASE replaces
# /etc/os-release, ODIN_METADATA_URL replaces the metadata server.

ROOT="${ODIN_ROOT:-}"
OS_RELEASE="${ODIN_OS_RELEASE:-/etc/os-release}"
METADATA_URL="${ODIN_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
STATE_DIR="$ROOT/var/lib/odin-ws"
ENV_FILE="$ROOT/etc/odin-ws/$ROLE.env"
SYSCTL_FILE="$ROOT/etc/sysctl.d/99-odin-ws.conf"
WORK_DIR=""

log() { printf '%s-startup: %s\n' "$ROLE" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
cleanup() { [[ -z "$WORK_DIR" ]] || rm -rf "$WORK_DIR"; }
trap cleanup EXIT

# metadata PATH: a metadata-server value; non-zero exit when it is not set.
metadata() {
  curl -fsS --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$METADATA_URL/$1"
}

# attr KEY [DEFAULT]: an instance attribute, or DEFAULT ("" if none) when unset.
attr() {
  local value
  if value="$(metadata "instance/attributes/$1" 2>/dev/null)"; then
    printf '%s' "$value"
  else
    printf '%s' "${2-}"
  fi
}

os_id() {
  sed -n 's/^ID=//p' "$OS_RELEASE" | tr -d '"' | head -n 1
}

# Kernel settings for hundreds of thousands of long-lived TCP connections.
tune_kernel() {
  mkdir -p "${SYSCTL_FILE%/*}"
  cat >"$SYSCTL_FILE" <<'SYSCTL'
# Written by the odin-ws startup script.
fs.file-max = 4194304
fs.nr_open = 2097152
net.core.somaxconn = 65535
net.core.netdev_max_backlog = 65536
net.ipv4.tcp_max_syn_backlog = 65535
# Ephemeral ports stay above every odin-ws listener (3001-3011, 9101, 9102).
net.ipv4.ip_local_port_range = 10240 65535
net.ipv4.tcp_tw_reuse = 1
net.ipv4.tcp_fin_timeout = 15
SYSCTL
  # Client and upstream sockets are both tracked where conntrack is loaded
  # (COS host firewall).
  if [[ -e /proc/sys/net/netfilter/nf_conntrack_max ]]; then
    printf 'net.netfilter.nf_conntrack_max = 4194304\n' >>"$SYSCTL_FILE"
  fi
  sysctl -q -p "$SYSCTL_FILE"
}

# The process environment, as one file read by both `docker run --env-file`
# and systemd's EnvironmentFile= (both take the rest of the line literally).
write_env_file() {
  local pair pairs=()
  read -r -a pairs <<<"$(attr odin-env)" || true
  mkdir -p "${ENV_FILE%/*}"
  {
    printf '# Written by %s-startup.sh from instance metadata.\n' "$ROLE"
    printf 'ODIN_ARGS=%s\n' "$ARGS"
    for pair in "${pairs[@]}"; do
      [[ "$pair" =~ ^[A-Z_][A-Z0-9_]*=[^[:space:]\"\']*$ ]] || die "bad odin-env entry: $pair"
      printf '%s\n' "$pair"
    done
  } >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

# Container-Optimized OS drops inbound traffic except SSH by default.
open_host_firewall() {
  local ports
  ports="$(attr odin-open-ports)"
  [[ -n "$ports" ]] || return 0
  iptables -w -C INPUT -p tcp -m multiport --dports "$ports" -j ACCEPT 2>/dev/null ||
    iptables -w -A INPUT -p tcp -m multiport --dports "$ports" -j ACCEPT
}

run_container() {
  local image registry args=()
  image="$(attr odin-container-image)"
  [[ -n "$image" ]] || die "metadata odin-container-image is not set"
  read -r -a args <<<"$ARGS"
  # COS keeps / read-only: docker's client config goes to a writable HOME.
  mkdir -p "$STATE_DIR"
  export HOME="$STATE_DIR"
  registry="${image%%/*}"
  case "$registry" in
    *-docker.pkg.dev | gcr.io | *.gcr.io) docker-credential-gcr configure-docker --registries="$registry" >&2 ;;
  esac
  local try
  for try in 1 2 3 4 5; do
    docker pull "$image" >&2 && break
    [[ $try -lt 5 ]] || die "cannot pull $image"
    sleep $((try * 5))
  done
  docker rm -f "$ROLE" >/dev/null 2>&1 || true
  docker run --detach --name "$ROLE" --restart on-failure \
    --network host --ulimit nofile=1048576:1048576 \
    --stop-signal SIGTERM --stop-timeout 45 \
    --log-opt max-size=100m --log-opt max-file=5 \
    --env-file "$ENV_FILE" \
    --volume /var/lib/odin-ws:/var/lib/odin-ws:ro \
    "$image" "/usr/local/bin/$ROLE" "${args[@]}" >&2
}

install_release() {
  local url
  url="$(attr odin-release-url)"
  [[ -n "$url" ]] || die "metadata odin-release-url is not set (needed on $1)"
  WORK_DIR="$(mktemp -d)"
  case "$url" in
    gs://*) gcloud storage cp "$url" "$WORK_DIR/release.tar.gz" >&2 ;;
    https://* | http://*) curl -fsSL --retry 5 -o "$WORK_DIR/release.tar.gz" "$url" ;;
    *) die "unsupported odin-release-url: $url" ;;
  esac
  tar -xzf "$WORK_DIR/release.tar.gz" -C "$WORK_DIR"
  install -D -m 0755 "$WORK_DIR/bin/$ROLE" "$ROOT/usr/local/bin/$ROLE"
  install -D -m 0644 "$WORK_DIR/systemd/$ROLE.service" "$ROOT/etc/systemd/system/$ROLE.service"
  systemctl daemon-reload
  systemctl enable "$ROLE.service"
  systemctl restart "$ROLE.service"
}

# Autoscaling signal of both groups: the sum of the role's connections gauge
# (CONNECTIONS_GAUGE on ADMIN_METRICS_URL, set in the role's part below) is
# written every 30 s to Cloud Monitoring as the custom metric named in metadata
# "odin-connections-metric" on this VM's gce_instance resource, which is what
# the group's autoscaler reads. Without that key nothing is published.
# Test hooks: ODIN_ADMIN_METRICS_URL, ODIN_MONITORING_URL, ODIN_PUBLISH_ONCE=1.
MONITORING_URL="${ODIN_MONITORING_URL:-https://monitoring.googleapis.com/v3}"
PUBLISHER_UNIT=odin-ws-connections-metric

# helper_unit UNIT DESCRIPTION COMMAND [ARGS...]: (re)starts this script's
# COMMAND as a transient systemd unit that is restarted whenever it ends.
helper_unit() {
  local unit="$1" description="$2"
  shift 2
  mkdir -p "$STATE_DIR"
  install -m 0644 "${BASH_SOURCE[0]}" "$STATE_DIR/$ROLE-startup.sh"
  systemctl stop "$unit.service" 2>/dev/null || true
  systemctl reset-failed "$unit.service" 2>/dev/null || true
  systemd-run --unit="$unit" --description="odin-ws: $description" \
    --property=Restart=always --property=RestartSec=10 \
    /bin/bash "/var/lib/odin-ws/$ROLE-startup.sh" "$@"
}

start_connections_publisher() {
  local metric
  metric="$(attr odin-connections-metric)"
  if [[ -z "$metric" ]]; then
    log "metadata odin-connections-metric not set: not publishing the connections metric"
    return 0
  fi
  helper_unit "$PUBLISHER_UNIT" "publish $metric" publish-connections-metric "$metric"
}

# scrape_sum NAME: the sum of every sample of NAME on the admin /metrics page.
scrape_sum() {
  local page
  page="$(curl -fsS --max-time 5 "$ADMIN_METRICS_URL")" || return 1
  awk -v m="$1" '($1 == m || index($1, m "{") == 1) { s += $2; found = 1 } END { if (found) print s + 0; else exit 1 }' <<<"$page"
}

publish_connections_metric() {
  local metric="$1" project instance_id zone value token now body
  project="$(metadata project/project-id)"
  instance_id="$(metadata instance/id)"
  zone="$(metadata instance/zone)"
  zone="${zone##*/}"
  while :; do
    if value="$(scrape_sum "$CONNECTIONS_GAUGE")" && [[ "$value" =~ ^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$ ]]; then
      token="$(metadata instance/service-accounts/default/token | sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')"
      now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
      body="$(printf '{"timeSeries":[{"metric":{"type":"%s"},"resource":{"type":"gce_instance","labels":{"project_id":"%s","instance_id":"%s","zone":"%s"}},"points":[{"interval":{"endTime":"%s"},"value":{"doubleValue":%s}}]}]}' \
        "$metric" "$project" "$instance_id" "$zone" "$now" "$value")"
      curl -fsS --max-time 10 -X POST -H "Authorization: Bearer $token" \
        -H 'Content-Type: application/json' --data "$body" \
        "$MONITORING_URL/projects/$project/timeSeries" >/dev/null ||
        log "writing $metric failed"
    else
      log "no $CONNECTIONS_GAUGE on $ADMIN_METRICS_URL"
    fi
    [[ "${ODIN_PUBLISH_ONCE:-0}" != 1 ]] || return 0
    sleep 30
  done
}

main() {
  case "${1:-start}" in
    start) ;;
    publish-connections-metric)
      publish_connections_metric "${2:?metric type}"
      return
      ;;
    *)
      role_command "$@"
      return
      ;;
  esac
  local os
  ARGS="$(attr odin-args)"
  [[ -n "$ARGS" ]] || die "metadata odin-args is not set"
  os="$(os_id)"
  tune_kernel
  write_env_file
  role_before_start
  case "$os" in
    cos)
      open_host_firewall
      run_container
      ;;
    debian | ubuntu) install_release "$os" ;;
    *) die "unsupported OS '$os' (expected cos, debian or ubuntu)" ;;
  esac
  start_connections_publisher
  log "started $ROLE $ARGS"
}
# ==== END COMMON ====

# ---- ws-shard only ----------------------------------------------------------
#
# Autoscaling signal (common block): the sum of ws_shard_connections over this
# VM's shards (admin port 9102); the shard group's autoscaler targets a number of
# connections per VM (custom.googleapis.com/ws_shard_connections).
# Scale-in drains: the VM's shutdown script (odin-ws-shutdown.sh) stops
# ws-shard with SIGTERM, which closes its clients with 1012 spread over the drain
# window; they reconnect through ws-lb and recover with `since`.

ADMIN_METRICS_URL="${ODIN_ADMIN_METRICS_URL:-http://127.0.0.1:9102/metrics}"
CONNECTIONS_GAUGE=ws_shard_connections

role_before_start() { :; }

role_command() {
  log "ERROR: unknown command: $1"
  return 2
}

main "$@"
