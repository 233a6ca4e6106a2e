#!/usr/bin/env python3
"""The Kafka VM's disk for tansu's `s3` storage: a small S3-compatible object server.

tansu (the Kafka-protocol broker of the local topology) keeps its log either in memory (lost
when the broker restarts) or, with its `dynostore` feature, in an S3 bucket. This server is
that bucket, run on the Kafka VM as a separate process: the broker can be killed and started
again and finds its log, committed offsets and topics where it left them, as a Kafka VM finds
its disk after a reboot. The objects live in this process's memory (they survive broker
restarts, not a restart of this process; no scenario restarts it).

It implements the part of the S3 REST API that object_store (tansu's S3 client) uses, with
the costs an index gives: PUT (with If-Match / If-None-Match: conditional writes answer 412),
GET, HEAD, DELETE, multi-object delete, copy, ListObjectsV2 (prefix, delimiter, start-after,
continuation, max-keys) from a sorted key index, so a listing costs what it returns, not the
bucket's size. Buckets exist on first use. Requests are not authenticated (the server listens
on the VM's loopback only).

    s3disk.py --host 127.0.0.1 --port 9000
"""

import argparse
import bisect
import hashlib
import http.server
import re
import socketserver
import sys
import threading
import time
import urllib.parse
from email.utils import formatdate
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


class Bucket:
    def __init__(self):
        self.objects = {}   # key -> (body, etag, mtime)
        self.keys = []      # sorted

    def put(self, key, body):
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        if key not in self.objects:
            bisect.insort(self.keys, key)
        self.objects[key] = (body, etag, time.time())
        return etag

    def delete(self, key):
        if self.objects.pop(key, None) is not None:
            i = bisect.bisect_left(self.keys, key)
            if i < len(self.keys) and self.keys[i] == key:
                del self.keys[i]


class Store:
    def __init__(self):
        self.buckets = {}
        self.lock = threading.Lock()

    def bucket(self, name):
        b = self.buckets.get(name)
        if b is None:
            b = self.buckets[name] = Bucket()
        return b


STORE = Store()


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "s3disk"
    # Headers and body go out in one write, and without Nagle: a response split in two
    # writes would otherwise wait for the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # one line per request would cost more than the request
        pass

    # ---- helpers -----------------------------------------------------------------

    def target(self):
        u = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(u.path)
        parts = path.lstrip("/").split("/", 1)
        bucket = parts[0]
        key = parts[1] if len(parts) > 1 else ""
        q = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
        return bucket, key, q

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        if "aws-chunked" in (self.headers.get("Content-Encoding") or "") or \
                (self.headers.get("x-amz-content-sha256") or "").startswith("STREAMING-"):
            data = dechunk(data)
        return data

    def send(self, status, body=b"", headers=None, head=False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n")
        if body and not head:
            self._headers_buffer.append(body)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def error(self, status, code, head=False):
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message></Error>'
        self.send(status, body.encode(), {"Content-Type": "application/xml"}, head)

    # ---- verbs -------------------------------------------------------------------

    def do_PUT(self):
        bucket, key, q = self.target()
        data = self.body()
        with STORE.lock:
            b = STORE.bucket(bucket)
            if not key:
                return self.send(200)
            cur = b.objects.get(key)
            inm, im = self.headers.get("If-None-Match"), self.headers.get("If-Match")
            if inm is not None and (inm.strip() == "*" and cur is not None or cur is not None and cur[1] == inm.strip()):
                return self.error(412, "PreconditionFailed")
            if im is not None and (cur is None or (im.strip() != "*" and cur[1] != im.strip())):
                return self.error(412 if cur is not None else 404, "PreconditionFailed" if cur is not None else "NoSuchKey")
            src = self.headers.get("x-amz-copy-source")
            if src:
                sb, _, sk = urllib.parse.unquote(src).lstrip("/").partition("/")
                s = STORE.bucket(sb).objects.get(sk)
                if s is None:
                    return self.error(404, "NoSuchKey")
                etag = b.put(key, s[0])
                body = f'<CopyObjectResult><LastModified>{iso(time.time())}</LastModified><ETag>{escape(etag)}</ETag></CopyObjectResult>'
                return self.send(200, body.encode(), {"Content-Type": "application/xml", "ETag": etag})
            etag = b.put(key, data)
        self.send(200, b"", {"ETag": etag})

    def get_or_head(self, head):
        bucket, key, q = self.target()
        if not key:
            if head:
                return self.send(200, head=True)
            return self.list(bucket, q)
        with STORE.lock:
            obj = STORE.bucket(bucket).objects.get(key)
        if obj is None:
            return self.error(404, "NoSuchKey", head)
        body, etag, mtime = obj
        inm, im = self.headers.get("If-None-Match"), self.headers.get("If-Match")
        if im is not None and im.strip() not in ("*", etag):
            return self.error(412, "PreconditionFailed", head)
        if inm is not None and inm.strip() in ("*", etag):
            return self.send(304, b"", {"ETag": etag}, head)
        headers = {"ETag": etag, "Last-Modified": formatdate(mtime, usegmt=True),
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
        if m and body:
            size = len(body)
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            end = min(end, size - 1)
            if start > end:
                return self.error(416, "InvalidRange", head)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self.send(206, body[start:end + 1], headers, head)
        self.send(200, body, headers, head)

    def do_GET(self):
        self.get_or_head(False)

    def do_HEAD(self):
        self.get_or_head(True)

    def do_DELETE(self):
        bucket, key, q = self.target()
        with STORE.lock:
            if key:
                STORE.bucket(bucket).delete(key)
            else:
                STORE.buckets.pop(bucket, None)
        self.send(204)

    def do_POST(self):
        bucket, key, q = self.target()
        data = self.body()
        if "delete" not in q:
            return self.error(501, "NotImplemented")
        keys = [unescape_xml(k) for k in re.findall(r"<Key>(.*?)</Key>", data.decode())]
        with STORE.lock:
            b = STORE.bucket(bucket)
            for k in keys:
                b.delete(k)
        out = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
        self.send(200, f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{NS}">{out}</DeleteResult>'.encode(),
                  {"Content-Type": "application/xml"})

    def list(self, bucket, q):
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        max_keys = min(int(q.get("max-keys") or 1000), 1000)
        after = q.get("continuation-token") or q.get("start-after") or ""
        contents, prefixes, truncated, last = [], [], False, None
        with STORE.lock:
            b = STORE.bucket(bucket)
            i = bisect.bisect_left(b.keys, max(prefix, after))
            seen_prefixes = set()
            while i < len(b.keys):
                k = b.keys[i]
                i += 1
                if not k.startswith(prefix):
                    break
                if after and k <= after:
                    continue
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                if delim:
                    j = k.find(delim, len(prefix))
                    if j >= 0:
                        cp = k[:j + len(delim)]
                        if cp not in seen_prefixes:
                            seen_prefixes.add(cp)
                            prefixes.append(cp)
                        last = k
                        continue
                body, etag, mtime = b.objects[k]
                contents.append((k, len(body), etag, mtime))
                last = k
        parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{NS}"><Name>{escape(bucket)}</Name>'
                 f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
                 f"<MaxKeys>{max_keys}</MaxKeys>"
                 + (f"<Delimiter>{escape(delim)}</Delimiter>" if delim else "")
                 + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated and last is not None:
            parts.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
        for k, size, etag, mtime in contents:
            parts.append(f"<Contents><Key>{escape(k)}</Key><LastModified>{iso(mtime)}</LastModified>"
                         f"<ETag>{escape(etag)}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>")
        for cp in prefixes:
            parts.append(f"<CommonPrefixes><Prefix>{escape(cp)}</Prefix></CommonPrefixes>")
        parts.append("</ListBucketResult>")
        self.send(200, "".join(parts).encode(), {"Content-Type": "application/xml"})


def unescape_xml(s):
    return s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'").replace("&amp;", "&")


def dechunk(data):
    """The body of an aws-chunked upload (`<hex size>;chunk-signature=...\\r\\n<data>\\r\\n` ...)."""
    out, i = bytearray(), 0
    while i < len(data):
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            break
        out += data[j + 2:j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    a = p.parse_args()
    srv = Server((a.host, a.port), Handler)
    print(f"s3disk listening on {a.host}:{a.port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
