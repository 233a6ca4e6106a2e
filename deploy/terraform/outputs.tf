output "lb_ip" {
  description = "IPv4 address of the HTTPS load balancer: point the A record of var.domain here."
  value       = google_compute_global_address.lb.address
}

output "shard_group" {
  description = "The autoscaled shard instance group; every ws-lb VM lists its running VMs into /var/lib/odin-ws/shards."
  value       = google_compute_region_instance_group_manager.shard.name
}

output "lb_args" {
  description = "Arguments ws-lb runs with."
  value       = local.lb_args
}

output "shard_args" {
  description = "Arguments ws-shard runs with."
  value       = local.shard_args
}

output "websocket_url" {
  description = "Client URL."
  value       = "wss://${var.domain}/ws"
}
