#!/bin/bash
# Unpacks Debian 11's HAProxy 2.2 and OpenSSL 1.1.1w (libssl1.1) into DIR, without
# installing them, so `front_cost.py --haproxy-root DIR` can measure the front on
# OpenSSL 1.1.1 beside the installed HAProxy 2.6 on OpenSSL 3.0. The newest versions are
# read from the bullseye-security package index; the other libraries come from the host.
set -euo pipefail
dest=${1:?usage: fetch_old_haproxy.sh DIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsS --max-time 120 "$mirror/debian-security/dists/bullseye-security/main/binary-amd64/Packages.xz" | xz -d > "$tmp/Packages"
mkdir -p "$dest"
for pkg in haproxy libssl1.1; do
  file=$(awk -v p="$pkg" '$1 == "Package:" { on = ($2 == p) } on && $1 == "Filename:" { print $2; exit }' "$tmp/Packages")
  [ -n "$file" ] || { echo "fetch_old_haproxy: $pkg not in bullseye-security" >&2; exit 1; }
  curl -fsS --max-time 120 -o "$tmp/$pkg.deb" "$mirror/debian-security/$file"
  dpkg -x "$tmp/$pkg.deb" "$dest"
  echo "unpacked $file"
done
LD_LIBRARY_PATH="$dest/usr/lib/x86_64-linux-gnu" "$dest/usr/sbin/haproxy" -vv | grep -E '^HA-Proxy version|^Running on OpenSSL'
