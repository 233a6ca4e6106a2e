# Shared names, ports and the service accounts both tiers run as. The firewall
# rules (firewall.tf) select VMs by these service accounts, not by network tags.

locals {
  name = "odin-ws"

  # Fixed ports (see deploy/README.md): ws-lb listens on 3001 (clients, via the
  # HTTPS load balancer) and 9101 (admin: /metrics, /health); ws-shard listens on
  # 3002 + i for shard i (ws-lb only) and 9102 (admin).
  lb_port          = 3001
  lb_admin_port    = 9101
  shard_base_port  = 3002
  shard_admin_port = 9102
  shard_last_port  = local.shard_base_port + var.shards_per_vm - 1
  shard_ports      = [for i in range(var.shards_per_vm) : local.shard_base_port + i]

  # Google front ends and health checkers reach the backends from these ranges
  # only (global external Application Load Balancer).
  google_lb_source_ranges = ["35.191.0.0/16", "130.211.0.0/22"]

  # What ws-lb's GET /health means (both LB-tier health checks use it).
  lb_health_check_description = "ws-lb liveness: 200 while it serves clients, 503 only while draining; shard availability is reported in the body and ws_lb_shards_available, not here"

  # Per-VM connection signal for the autoscaler. ws-lb exports the gauge
  # ws_lb_active_connections on :9101/metrics; the LB startup script publishes it
  # every 30 s as this Cloud Monitoring custom metric on the gce_instance
  # resource (deploy/startup/ws-lb-startup.sh, publish-connections-metric).
  lb_connections_metric = "custom.googleapis.com/ws_lb_active_connections"

  # The shard group, as LB VMs find its instances (label odin-ws-group), and
  # the file ws-lb reads its shards from (kept current by ws-lb-startup.sh).
  shard_group              = "${local.name}-shard"
  shard_members_file       = "/var/lib/odin-ws/shards"
  shard_connections_metric = "custom.googleapis.com/ws_shard_connections"
  shard_connections_target = var.shard_connections_target > 0 ? var.shard_connections_target : floor(0.7 * var.shards_per_vm * var.shard_max_connections)

  # Command lines. The startup scripts run "<binary> ${odin-args}" (container on
  # COS, systemd unit on Debian), so these are the exact process arguments.
  shard_args = join(" ", compact([
    "--shards ${var.shards_per_vm}",
    "--base-port ${local.shard_base_port}",
    "--bind 0.0.0.0",
    "--admin-addr 0.0.0.0:${local.shard_admin_port}",
    "--max-connections ${var.shard_max_connections}",
    "--drain-window 10s",
    "--grace 30s",
    "--log-json",
    var.kafka_brokers == "" ? "" : "--kafka-brokers ${var.kafka_brokers}",
    var.kafka_brokers == "" ? "" : "--kafka-topics ${join(",", var.kafka_topics)}",
    var.kafka_brokers == "" ? "" : "--kafka-start ${var.kafka_start}",
  ]))

  lb_args = join(" ", [
    "--listen 0.0.0.0:${local.lb_port}",
    "--admin-addr 0.0.0.0:${local.lb_admin_port}",
    "--backend-file ${local.shard_members_file}",
    "--allowed-origins ${join(",", var.allowed_origins)}",
    "--trust-forwarded-for",
  ])

  lb_env = join(" ", [
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD=${var.circuit_breaker.failure_threshold}",
    "CIRCUIT_BREAKER_TIMEOUT=${var.circuit_breaker.timeout}",
    "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS=${var.circuit_breaker.half_open_max_calls}",
  ])

  # Ports each tier opens in the host firewall of Container-Optimized OS
  # (iptables multiport syntax).
  lb_open_ports    = "${local.lb_port},${local.lb_admin_port}"
  shard_open_ports = "${local.shard_base_port}:${local.shard_last_port},${local.shard_admin_port}"

  common_metadata = {
    enable-oslogin            = "TRUE"
    google-logging-enabled    = "true"
    google-monitoring-enabled = "true"
    odin-container-image      = var.container_image
    odin-release-url          = var.release_url
    shutdown-script           = file("${path.module}/../startup/odin-ws-shutdown.sh")
  }
}

resource "google_service_account" "lb" {
  account_id   = "${local.name}-lb"
  display_name = "odin-ws ws-lb tier"
}

resource "google_service_account" "shard" {
  account_id   = "${local.name}-shard"
  display_name = "odin-ws ws-shard tier"
}

# Logs, metrics (incl. the custom connections metric) and image pulls.
resource "google_project_iam_member" "tier_roles" {
  for_each = {
    for pair in setproduct(["lb", "shard"], [
      "roles/logging.logWriter",
      "roles/monitoring.metricWriter",
      "roles/artifactregistry.reader",
      "roles/storage.objectViewer",
    ]) : "${pair[0]}/${pair[1]}" => { tier = pair[0], role = pair[1] }
  }

  project = var.project
  role    = each.value.role
  member  = "serviceAccount:${each.value.tier == "lb" ? google_service_account.lb.email : google_service_account.shard.email}"
}

# LB VMs list the shard group's instances for their member file.
resource "google_project_iam_member" "lb_compute_viewer" {
  project = var.project
  role    = "roles/compute.viewer"
  member  = "serviceAccount:${google_service_account.lb.email}"
}
