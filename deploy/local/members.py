"""How the LB VMs of the local topology learn the shard VMs: as on GCP (deploy/README.md,
"How ws-lb follows the autoscaled shard group").

On GCP every LB VM runs `odin-shard-members` (deploy/startup/ws-lb-startup.sh
`update-shard-members GROUP FIRST:LAST`): every 10 s it lists the instances labelled
`odin-ws-group=GROUP` in status RUNNING through the Compute API, with the VM's token from
the metadata server, and rewrites /var/lib/odin-ws/shards, which ws-lb follows
(`--backend-file`). Here the same script runs, unchanged, in every LB VM's namespace; its
test hooks point it at this module's stand-in for the two Google endpoints it calls
(`ODIN_METADATA_URL`, `ODIN_COMPUTE_URL`), served on the host's bridge address, and its
files go under a per-VM root (`ODIN_ROOT`). The harness tells the stand-in which shard VMs
exist and in which status (RUNNING once created; STOPPING while the shutdown script drains a
VM being deleted; gone after), as the instance group would.
"""

import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROJECT = "odin-local"
ZONE = "zones/local-a"


class ComputeApi:
    """The metadata server (project id, the VM's token) and the Compute API's aggregated
    instance list, filtered like the real one on `labels.odin-ws-group` and `status`."""

    def __init__(self, host, port, group):
        self.group = group
        self.lock = threading.Lock()
        self.instances = {}       # name -> {"ip": ..., "status": ...}
        self.listings = 0
        self.history = []         # (time, name, status)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, ctype="application/json"):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                if u.path.startswith("/computeMetadata/v1/"):
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self.reply(403, "missing Metadata-Flavor")
                    key = u.path[len("/computeMetadata/v1/"):]
                    if key == "project/project-id":
                        return self.reply(200, PROJECT, "text/plain")
                    if key == "instance/service-accounts/default/token":
                        return self.reply(200, json.dumps({"access_token": "local-token", "expires_in": 3599,
                                                           "token_type": "Bearer"}))
                    return self.reply(404, "not set", "text/plain")
                if u.path == f"/compute/v1/projects/{PROJECT}/aggregated/instances":
                    if self.headers.get("Authorization") != "Bearer local-token":
                        return self.reply(401, "{}")
                    q = urllib.parse.parse_qs(u.query)
                    return self.reply(200, json.dumps(api.listing(q.get("filter", [""])[0])))
                return self.reply(404, "{}")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="compute-api")

    def start(self):
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def set(self, name, ip, status):
        """A shard VM of the group is in `status` (None: deleted)."""
        with self.lock:
            if status is None:
                self.instances.pop(name, None)
            else:
                self.instances[name] = {"ip": ip, "status": status}
            self.history.append((time.time(), name, status))

    def listing(self, flt):
        label = re.search(r'labels\.odin-ws-group\s*=\s*"([^"]*)"', flt)
        status = re.search(r'status\s*=\s*"([^"]*)"', flt)
        with self.lock:
            self.listings += 1
            rows = [{"name": n, "status": v["status"], "labels": {"odin-ws-group": self.group},
                     "networkInterfaces": [{"networkIP": v["ip"]}]}
                    for n, v in sorted(self.instances.items())
                    if (label is None or label.group(1) == self.group) and (status is None or status.group(1) == v["status"])]
        return {"items": {ZONE: {"instances": rows}} if rows else {}}
