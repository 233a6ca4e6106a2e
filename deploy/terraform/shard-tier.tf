# ws-shard tier: a regional MIG autoscaled between shard_min_replicas and
# shard_max_replicas VMs on CPU and on client connections per VM. VMs have no
# fixed address: every ws-lb VM keeps its member file equal to the group's
# running VMs (label odin-ws-group; deploy/startup/ws-lb-startup.sh) and ws-lb
# follows the file without a restart. Scale-in drains: the shutdown script sends
# SIGTERM and the shard closes its clients with 1012 over its drain window
# (they reconnect through ws-lb and recover with `since`).

resource "google_compute_instance_template" "shard" {
  name_prefix  = "${local.name}-shard-"
  description  = "ws-shard ${local.shard_args}"
  machine_type = var.shard_machine_type
  region       = var.region
  tags         = ["${local.name}-shard"]

  labels = {
    odin-ws-role  = "shard"
    odin-ws-group = local.shard_group
  }

  disk {
    source_image = var.boot_image
    boot         = true
    auto_delete  = true
    disk_type    = "pd-balanced"
    disk_size_gb = 20
  }

  # No access_config: no external IP.
  network_interface {
    network    = var.network
    subnetwork = var.subnetwork
  }

  service_account {
    email  = google_service_account.shard.email
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
    startup-script  = file("${path.module}/../startup/ws-shard-startup.sh")
    odin-args       = local.shard_args
    odin-env        = ""
    odin-open-ports = local.shard_open_ports
    # Published every 30 s for the autoscaler (ws-shard-startup.sh).
    odin-connections-metric = local.shard_connections_metric
  })

  lifecycle {
    create_before_destroy = true
  }
}

# Autohealing: a shard VM whose shard 0 stops answering /live is recreated (ws-lb's
# member file follows its new address). /live is the process's liveness; /health is 503 while the shard drains
# or re-reads its Kafka history at start (up to kafka_warmup_timeout), neither of which is a
# reason to recreate the VM.
resource "google_compute_health_check" "shard" {
  name                = "${local.name}-shard-hc"
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 3

  http_health_check {
    port         = local.shard_base_port
    request_path = "/live"
  }
}

resource "google_compute_region_instance_group_manager" "shard" {
  name                      = "${local.name}-shard"
  base_instance_name        = "${local.name}-shard"
  region                    = var.region
  distribution_policy_zones = var.zones

  # Initial size; afterwards the autoscaler below owns the size.
  target_size = var.shard_min_replicas

  version {
    name              = "primary"
    instance_template = google_compute_instance_template.shard.self_link_unique
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.shard.id
    initial_delay_sec = 180
  }

  # Shards hold client connections: template changes are rolled out by hand
  # (gcloud ... update-instances / recreate-instances, one VM at a time).
  update_policy {
    type                         = "OPPORTUNISTIC"
    minimal_action               = "REPLACE"
    replacement_method           = "RECREATE"
    instance_redistribution_type = "NONE"
    max_surge_fixed              = 0
    max_unavailable_fixed        = length(var.zones)
  }

  lifecycle {
    ignore_changes = [target_size]
  }
}

resource "google_compute_region_autoscaler" "shard" {
  name   = local.shard_group
  region = var.region
  target = google_compute_region_instance_group_manager.shard.id

  autoscaling_policy {
    min_replicas = var.shard_min_replicas
    max_replicas = var.shard_max_replicas
    # A new VM boots, warms its history from Kafka and ramps up in ws-lb's slow
    # start before its load means anything.
    cooldown_period = 180
    mode            = "ON"

    cpu_utilization {
      target = var.shard_cpu_target
    }

    # Client connections per VM (gauge published by the startup script).
    metric {
      name   = local.shard_connections_metric
      target = local.shard_connections_target
      type   = "GAUGE"
    }

    # Scale in slowly: each removed VM drains its clients with 1012 and they
    # reconnect elsewhere; one VM per 15 minutes keeps the group from flapping.
    scale_in_control {
      max_scaled_in_replicas {
        fixed = 1
      }
      time_window_sec = 900
    }
  }

  lifecycle {
    precondition {
      condition     = var.shard_min_replicas <= var.shard_max_replicas && var.shard_max_replicas * var.shards_per_vm <= 128
      error_message = "Need shard_min_replicas <= shard_max_replicas, and shard_max_replicas x shards_per_vm at most 128 (ws-lb's pool)."
    }
  }
}
