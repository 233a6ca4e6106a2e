#!/usr/bin/env python3
"""Static checks of deploy/docker/Dockerfile (there is no Docker engine here):
a rust:1-bookworm builder with cmake and a C/C++ toolchain running
`cargo build --release --locked -p ws-lb -p ws-shard`, a debian:bookworm-slim
runtime with both binaries in /usr/local/bin, a non-root USER and the ports.

Run: python3 deploy/tests/test_dockerfile.py   (exit 0 = all passed)
"""

import re
import sys
from pathlib import Path

from checks import check, report

DOCKERFILE = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"


def instructions(text):
    """(INSTRUCTION, args) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            buf = ""
    return out


def main():
    ins = instructions(DOCKERFILE.read_text())
    froms = [a for i, a in ins if i == "FROM"]
    check("two stages", len(froms) == 2, froms)
    check("builder stage rust:1-bookworm AS builder", froms[:1] == ["rust:1-bookworm AS builder"], froms)
    check("runtime stage debian:bookworm-slim", froms[1:] == ["debian:bookworm-slim"], froms)
    split = next((n for n, (i, a) in enumerate(ins) if i == "FROM" and "bookworm-slim" in a), len(ins))
    builder, runtime = ins[:split], ins[split:]
    runs = " ".join(a for i, a in builder if i == "RUN")
    for pkg in ("cmake", "build-essential"):
        check(f"builder installs {pkg}", re.search(rf"apt-get install\b[^&]*\b{pkg}\b", runs) is not None)
    check("builder runs cargo build --release --locked -p ws-lb -p ws-shard",
          "cargo build --release --locked -p ws-lb -p ws-shard" in runs)
    copies = [a for i, a in runtime if i == "COPY"]
    check("runtime copies both binaries from the builder to /usr/local/bin/",
          any(a.startswith("--from=builder") and "ws-lb" in a and "ws-shard" in a and a.endswith("/usr/local/bin/")
              for a in copies), copies)
    users = [a for i, a in runtime if i == "USER"]
    check("runtime runs as a non-root user", len(users) == 1 and users[0].split(":")[0] not in ("root", "0"), users)
    user_created = " ".join(a for i, a in runtime if i == "RUN")
    check("runtime creates that user", users and users[0].split(":")[0] in user_created, users)
    expose = " ".join(a for i, a in runtime if i == "EXPOSE").split()
    check("EXPOSE 3001 3002-3011 9101 9102", expose == ["3001", "3002-3011", "9101", "9102"], expose)
    check("no ADD of remote URLs", not any(i == "ADD" for i, _ in ins))
    return report("test_dockerfile")


if __name__ == "__main__":
    sys.exit(main())
