# ---------------------------------------------------------------------------
# Project and placement
# ---------------------------------------------------------------------------

variable "project" {
  description = "GCP project id."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project))
    error_message = "project must be a GCP project id (6-30 chars, lowercase letters, digits, hyphens)."
  }
}

variable "region" {
  description = "Region of both managed instance groups and of the shard addresses."
  type        = string
  default     = "us-central1"
}

variable "zones" {
  description = "Zones (inside var.region) the regional MIGs spread their VMs over."
  type        = list(string)
  default     = ["us-central1-a", "us-central1-b", "us-central1-c"]

  validation {
    condition     = length(var.zones) >= 1 && alltrue([for z in var.zones : startswith(z, "${var.region}-")])
    error_message = "zones must be a non-empty list of zones inside var.region."
  }
}

variable "network" {
  description = "VPC network name or self link."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork (in var.region) for both tiers and the reserved shard addresses. It needs Private Google Access (the VMs have no external IP) or a Cloud NAT."
  type        = string
  default     = "default"
}

variable "domain" {
  description = "DNS name served by the HTTPS load balancer; the Google-managed certificate is issued for it once its A record points at the LB IP."
  type        = string

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)+[a-z]{2,}$", var.domain))
    error_message = "domain must be a fully qualified lowercase DNS name, e.g. md.example.com."
  }
}

variable "enable_http_redirect" {
  description = "Also listen on port 80 and redirect every request to HTTPS."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

variable "boot_image" {
  description = "Boot image of both tiers. The startup scripts run the container on Container-Optimized OS (cos-cloud) and install var.release_url with systemd on Debian images."
  type        = string
  default     = "cos-cloud/cos-stable"
}

variable "container_image" {
  description = "odin-ws container image (deploy/docker/Dockerfile) holding both ws-lb and ws-shard, e.g. us-central1-docker.pkg.dev/PROJECT/odin/odin-ws:1.0.0. Used on Container-Optimized OS."
  type        = string

  validation {
    condition     = length(var.container_image) > 0 && !endswith(var.container_image, ":latest")
    error_message = "container_image must be set and pinned to a tag or digest (not :latest)."
  }
}

variable "release_url" {
  description = "Release tarball (bin/ws-lb, bin/ws-shard, systemd/*.service) for Debian boot images; gs:// or https://. Unused on Container-Optimized OS."
  type        = string
  default     = ""
}

# ---------------------------------------------------------------------------
# Shard tier
# ---------------------------------------------------------------------------

variable "shard_min_replicas" {
  description = "Shard VMs the autoscaled group never goes below (also its initial size)."
  type        = number
  default     = 7

  validation {
    condition     = var.shard_min_replicas >= 1 && floor(var.shard_min_replicas) == var.shard_min_replicas
    error_message = "shard_min_replicas must be a whole number of at least 1."
  }
}

variable "shard_max_replicas" {
  description = "Shard VMs the autoscaled group never goes above. shard_max_replicas x shards_per_vm must fit ws-lb's pool (128 shards)."
  type        = number
  default     = 10

  validation {
    condition     = floor(var.shard_max_replicas) == var.shard_max_replicas && var.shard_max_replicas >= 1 && var.shard_max_replicas <= 128
    error_message = "shard_max_replicas must be a whole number from 1 to 128."
  }
}

variable "shard_cpu_target" {
  description = "Shard group autoscaler: target CPU utilization (0-1)."
  type        = number
  default     = 0.6
}

variable "shard_connections_target" {
  description = "Shard group autoscaler: client connections per VM it aims at (0 = 70 % of shards_per_vm x shard_max_connections)."
  type        = number
  default     = 0
}

variable "shards_per_vm" {
  description = "ws-shard --shards: shard listeners per VM, on ports 3002 .. 3002 + shards_per_vm - 1."
  type        = number
  default     = 4

  validation {
    # 10 keeps the ports inside 3002-3011, the range the container image exposes.
    condition     = var.shards_per_vm >= 1 && var.shards_per_vm <= 10 && floor(var.shards_per_vm) == var.shards_per_vm
    error_message = "shards_per_vm must be a whole number from 1 to 10."
  }
}

variable "shard_max_connections" {
  description = "ws-shard --max-connections: connection slots per shard."
  type        = number
  default     = 6000

  validation {
    condition     = var.shard_max_connections >= 1 && var.shard_max_connections <= 200000
    error_message = "shard_max_connections must be between 1 and 200000."
  }
}

variable "kafka_brokers" {
  description = "ws-shard --kafka-brokers (host:port,...). Empty: no Kafka consumer."
  type        = string
  default     = ""
}

variable "kafka_topics" {
  description = "ws-shard --kafka-topics."
  type        = list(string)
  default     = ["trades", "book"]
}

variable "kafka_start" {
  description = "ws-shard --kafka-start: where a (re)started shard begins each partition. back:N re-reads the last N records so the history of a shard VM that was restarted or recreated holds what its reconnecting clients ask for with `since` (latest would leave it empty, and they would get recovered:false)."
  type        = string
  default     = "back:1000"

  validation {
    condition     = can(regex("^(latest|back:[0-9]+)$", var.kafka_start))
    error_message = "kafka_start must be latest or back:<n>."
  }
}

variable "shard_machine_type" {
  description = "Machine type of the shard VMs."
  type        = string
  default     = "n2-standard-8"
}

# ---------------------------------------------------------------------------
# LB tier
# ---------------------------------------------------------------------------

variable "lb_machine_type" {
  description = "Machine type of the ws-lb VMs."
  type        = string
  default     = "n2-standard-4"
}

variable "lb_target_size" {
  description = "Initial size of the ws-lb MIG (the autoscaler owns the size afterwards)."
  type        = number
  default     = 10

  validation {
    condition     = var.lb_target_size >= var.lb_autoscaler_min && var.lb_target_size <= var.lb_autoscaler_max
    error_message = "lb_target_size must lie within [lb_autoscaler_min, lb_autoscaler_max]."
  }
}

variable "lb_autoscaler_min" {
  description = "Autoscaler lower bound for the ws-lb MIG."
  type        = number
  default     = 10

  validation {
    condition     = var.lb_autoscaler_min >= 1 && var.lb_autoscaler_min <= var.lb_autoscaler_max
    error_message = "lb_autoscaler_min must be >= 1 and <= lb_autoscaler_max."
  }
}

variable "lb_autoscaler_max" {
  description = "Autoscaler upper bound for the ws-lb MIG."
  type        = number
  default     = 20

  validation {
    condition     = var.lb_autoscaler_max <= 100
    error_message = "lb_autoscaler_max must be <= 100."
  }
}

variable "lb_cpu_target" {
  description = "Autoscaler CPU utilisation target (0..1) for the ws-lb MIG."
  type        = number
  default     = 0.6

  validation {
    condition     = var.lb_cpu_target > 0 && var.lb_cpu_target < 1
    error_message = "lb_cpu_target must be between 0 and 1 (exclusive)."
  }
}

variable "lb_connections_target" {
  description = "Autoscaler target of client connections per ws-lb VM (metric custom.googleapis.com/ws_lb_active_connections)."
  type        = number
  default     = 20000

  validation {
    condition     = var.lb_connections_target > 0
    error_message = "lb_connections_target must be positive."
  }
}

variable "allowed_origins" {
  description = "ws-lb --allowed-origins (Origin header allow list)."
  type        = list(string)
  default     = ["https://app.example.com"]

  validation {
    condition     = length(var.allowed_origins) > 0 && alltrue([for o in var.allowed_origins : can(regex("^https?://[^/,\\s]+$", o))])
    error_message = "allowed_origins must be a non-empty list of scheme://host[:port] origins."
  }
}

variable "circuit_breaker" {
  description = "ws-lb circuit breaker environment (CIRCUIT_BREAKER_FAILURE_THRESHOLD, CIRCUIT_BREAKER_TIMEOUT, CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS); defaults as documented in docs/runbook.md."
  type = object({
    failure_threshold   = number
    timeout             = string
    half_open_max_calls = number
  })
  default = {
    failure_threshold   = 10
    timeout             = "30s"
    half_open_max_calls = 5
  }
}

variable "prometheus_source_ranges" {
  description = "CIDR ranges allowed to scrape the admin ports 9101/9102. Empty: no rule (scrape from inside the VMs' service accounts only)."
  type        = list(string)
  default     = []
}
