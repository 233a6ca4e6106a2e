# Firewall rules. Tiers are selected by service account (a VM cannot change its
# service account from inside, unlike its network tags).

# Google front ends and health checkers -> ws-lb :3001 and the shard health
# check port :3002. Nothing else is reachable from the internet.
resource "google_compute_firewall" "google_lb_and_health_checks" {
  name          = "${local.name}-allow-google-lb-hc"
  network       = var.network
  direction     = "INGRESS"
  priority      = 1000
  source_ranges = local.google_lb_source_ranges

  target_service_accounts = [
    google_service_account.lb.email,
    google_service_account.shard.email,
  ]

  allow {
    protocol = "tcp"
    ports    = [tostring(local.lb_port), tostring(local.shard_base_port)]
  }
}

# ws-lb tier -> every shard port of the shard tier. Only the LB tier may open
# client WebSockets on the shards.
resource "google_compute_firewall" "lb_to_shards" {
  name      = "${local.name}-allow-lb-to-shards"
  network   = var.network
  direction = "INGRESS"
  priority  = 1000

  source_service_accounts = [google_service_account.lb.email]
  target_service_accounts = [google_service_account.shard.email]

  allow {
    protocol = "tcp"
    ports    = ["${local.shard_base_port}-${local.shard_last_port}"]
  }
}

# Prometheus -> admin ports (/metrics). Created only when ranges are given.
resource "google_compute_firewall" "prometheus_scrape" {
  count         = length(var.prometheus_source_ranges) > 0 ? 1 : 0
  name          = "${local.name}-allow-prometheus"
  network       = var.network
  direction     = "INGRESS"
  priority      = 1000
  source_ranges = var.prometheus_source_ranges

  target_service_accounts = [
    google_service_account.lb.email,
    google_service_account.shard.email,
  ]

  allow {
    protocol = "tcp"
    ports    = [tostring(local.lb_admin_port), tostring(local.shard_admin_port)]
  }
}
