# Global external Application Load Balancer (HTTPS, WebSockets) in front of the
# ws-lb MIG.

resource "google_compute_global_address" "lb" {
  name       = "${local.name}-ip"
  ip_version = "IPV4"
}

# ws-lb's /health is liveness: 200 while the process serves clients, 503 only
# while it drains (SIGTERM), so a draining VM leaves the load balancer and a
# live one stays in it even when no shard can take a client (its clients then
# get a WebSocket closed with 1012, not an HTTP 5xx from the load balancer).
# Shard availability is in the body and in ws_lb_shards_available (alert
# NoShardAvailable), never in the status code.
resource "google_compute_health_check" "lb_backend" {
  name                = "${local.name}-lb-backend-hc"
  description         = local.lb_health_check_description
  check_interval_sec  = 5
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 2

  http_health_check {
    port         = local.lb_port
    request_path = "/health"
  }
}

resource "google_compute_backend_service" "lb" {
  name                  = "${local.name}-lb-backend"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  protocol              = "HTTP"
  port_name             = "ws"
  # For WebSockets this is the longest a client connection may live.
  timeout_sec                     = 86400
  connection_draining_timeout_sec = 300
  session_affinity                = "NONE"
  health_checks                   = [google_compute_health_check.lb_backend.id]

  backend {
    group           = google_compute_region_instance_group_manager.lb.instance_group
    balancing_mode  = "UTILIZATION"
    max_utilization = 0.8
    capacity_scaler = 1.0
  }

  log_config {
    enable      = true
    sample_rate = 0.1
  }
}

resource "google_compute_url_map" "https" {
  name            = "${local.name}-https"
  default_service = google_compute_backend_service.lb.id
}

# The name carries a hash of the domain so that a new certificate can be
# created (and attached) before the old one is deleted.
resource "google_compute_managed_ssl_certificate" "lb" {
  name = "${local.name}-cert-${substr(md5(var.domain), 0, 8)}"

  managed {
    domains = [var.domain]
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_target_https_proxy" "lb" {
  name             = "${local.name}-https-proxy"
  url_map          = google_compute_url_map.https.id
  ssl_certificates = [google_compute_managed_ssl_certificate.lb.id]
}

resource "google_compute_global_forwarding_rule" "https" {
  name                  = "${local.name}-https"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  ip_protocol           = "TCP"
  port_range            = "443"
  ip_address            = google_compute_global_address.lb.id
  target                = google_compute_target_https_proxy.lb.id
}

# Optional port 80 -> 443 redirect on the same IP.
resource "google_compute_url_map" "http_redirect" {
  count = var.enable_http_redirect ? 1 : 0
  name  = "${local.name}-http-redirect"

  default_url_redirect {
    https_redirect         = true
    redirect_response_code = "MOVED_PERMANENTLY_DEFAULT"
    strip_query            = false
  }
}

resource "google_compute_target_http_proxy" "redirect" {
  count   = var.enable_http_redirect ? 1 : 0
  name    = "${local.name}-http-proxy"
  url_map = google_compute_url_map.http_redirect[0].id
}

resource "google_compute_global_forwarding_rule" "http_redirect" {
  count                 = var.enable_http_redirect ? 1 : 0
  name                  = "${local.name}-http"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  ip_protocol           = "TCP"
  port_range            = "80"
  ip_address            = google_compute_global_address.lb.id
  target                = google_compute_target_http_proxy.redirect[0].id
}
