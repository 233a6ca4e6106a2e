# ws-lb tier: stateless, autoscaled regional MIG behind the global HTTPS load
# balancer (global-lb.tf).

resource "google_compute_instance_template" "lb" {
  name_prefix  = "${local.name}-lb-"
  description  = "ws-lb --listen 0.0.0.0:${local.lb_port} --admin-addr 0.0.0.0:${local.lb_admin_port} (shards: group ${local.shard_group})"
  machine_type = var.lb_machine_type
  region       = var.region
  tags         = ["${local.name}-lb"]

  labels = {
    odin-ws-role = "lb"
  }

  disk {
    source_image = var.boot_image
    boot         = true
    auto_delete  = true
    disk_type    = "pd-balanced"
    disk_size_gb = 20
  }

  network_interface {
    network    = var.network
    subnetwork = var.subnetwork
  }

  service_account {
    email  = google_service_account.lb.email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  scheduling {
    automatic_restart   = true
    on_host_maintenance = "MIGRATE"
  }

  metadata = merge(local.common_metadata, {
    startup-script          = file("${path.module}/../startup/ws-lb-startup.sh")
    odin-args               = local.lb_args
    odin-env                = local.lb_env
    odin-open-ports         = local.lb_open_ports
    odin-connections-metric = local.lb_connections_metric
    odin-shard-group        = local.shard_group
    odin-shard-ports        = "${local.shard_base_port}:${local.shard_last_port}"
  })

  lifecycle {
    create_before_destroy = true
  }
}

# Autohealing check: more tolerant than the load balancer's own check
# (global-lb.tf), so a briefly overloaded VM is taken out of rotation, not
# recreated. Same endpoint, same meaning: /health fails only when ws-lb itself
# does not answer (or drains), never because of the shard tier, so a shard
# outage cannot get the LB VMs recreated.
resource "google_compute_health_check" "lb_autoheal" {
  name                = "${local.name}-lb-autoheal-hc"
  description         = local.lb_health_check_description
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 6

  http_health_check {
    port         = local.lb_port
    request_path = "/health"
  }
}

resource "google_compute_region_instance_group_manager" "lb" {
  name                      = "${local.name}-lb"
  base_instance_name        = "${local.name}-lb"
  region                    = var.region
  distribution_policy_zones = var.zones

  # Initial size; afterwards the autoscaler below owns the size.
  target_size = var.lb_target_size

  version {
    name              = "primary"
    instance_template = google_compute_instance_template.lb.self_link_unique
  }

  named_port {
    name = "ws"
    port = local.lb_port
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.lb_autoheal.id
    initial_delay_sec = 120
  }

  # Surge new VMs first; connections on a replaced VM are drained by the
  # backend service (connection_draining_timeout_sec) and by ws-lb on SIGTERM.
  update_policy {
    type                         = "PROACTIVE"
    minimal_action               = "REPLACE"
    replacement_method           = "SUBSTITUTE"
    instance_redistribution_type = "PROACTIVE"
    max_surge_fixed              = length(var.zones)
    max_unavailable_fixed        = 0
  }

  lifecycle {
    ignore_changes = [target_size]
  }
}

resource "google_compute_region_autoscaler" "lb" {
  name   = "${local.name}-lb"
  region = var.region
  target = google_compute_region_instance_group_manager.lb.id

  autoscaling_policy {
    min_replicas    = var.lb_autoscaler_min
    max_replicas    = var.lb_autoscaler_max
    cooldown_period = 120
    mode            = "ON"

    cpu_utilization {
      target = var.lb_cpu_target
    }

    # Client connections per VM (gauge published by the startup script).
    metric {
      name   = local.lb_connections_metric
      target = var.lb_connections_target
      type   = "GAUGE"
    }

    # Scale in slowly: every removed VM drops its WebSockets (clients reconnect).
    scale_in_control {
      max_scaled_in_replicas {
        fixed = 1
      }
      time_window_sec = 600
    }
  }
}
