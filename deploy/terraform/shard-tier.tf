# ws-shard tier: shard_count VMs in a regional *stateful* MIG. Each VM keeps a
# reserved internal address for its whole life (autohealing and updates
# recreate the VM with the same name and IP), because ws-lb is configured with
# the static list of shard URLs built from these addresses.

resource "google_compute_address" "shard" {
  count        = var.shard_count
  name         = "${local.name}-shard-${count.index}"
  region       = var.region
  subnetwork   = var.subnetwork
  address_type = "INTERNAL"
  purpose      = "GCE_ENDPOINT"
  address      = length(var.shard_internal_ips) > 0 ? var.shard_internal_ips[count.index] : null
}

resource "google_compute_instance_template" "shard" {
  name_prefix  = "${local.name}-shard-"
  description  = "ws-shard ${local.shard_args}"
  machine_type = var.shard_machine_type
  region       = var.region
  tags         = ["${local.name}-shard"]

  labels = {
    odin-ws-role = "shard"
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
  })

  lifecycle {
    create_before_destroy = true
  }
}

# Autohealing: a shard VM whose shard 0 stops answering /live is recreated (same name,
# same reserved IP). /live is the process's liveness; /health is 503 while the shard drains
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
  target_size               = var.shard_count

  version {
    name              = "primary"
    instance_template = google_compute_instance_template.shard.self_link_unique
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.shard.id
    initial_delay_sec = 180
  }

  stateful_internal_ip {
    interface_name = "nic0"
    delete_rule    = "NEVER"
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
}

# One per-instance config per reserved address: VM odin-ws-shard-<i> always gets
# address odin-ws-shard-<i>.
resource "google_compute_region_per_instance_config" "shard" {
  count                         = var.shard_count
  region                        = var.region
  region_instance_group_manager = google_compute_region_instance_group_manager.shard.name
  name                          = "${local.name}-shard-${count.index}"

  preserved_state {
    internal_ip {
      interface_name = "nic0"
      auto_delete    = "NEVER"
      ip_address {
        address = google_compute_address.shard[count.index].self_link
      }
    }
  }
}
