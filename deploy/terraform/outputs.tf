output "lb_ip" {
  description = "IPv4 address of the HTTPS load balancer: point the A record of var.domain here."
  value       = google_compute_global_address.lb.address
}

output "shard_addresses" {
  description = "Reserved internal addresses of the shard VMs, in shard order."
  value       = google_compute_address.shard[*].address
}

output "backend_urls" {
  description = "ws-lb backend list: one ws://ADDR:PORT/ws per shard of every shard VM."
  value       = local.backend_urls
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
