#!/usr/bin/env python3
"""Prints every metric name that deploy/prometheus/alerts.yml and
deploy/grafana/odin-ws.json reference, one per line, sorted and unique.

Names are the identifiers starting with ws_, process_ or tokio_ in the PromQL expressions (alert
`expr`, panel target `expr`, template variable queries), with string literals
removed first. Histogram series suffixes are mapped to the histogram's name:
_bucket always, _sum/_count when the same base also appears as _bucket or
ends in _seconds (so a counter such as ws_handshake_retry_count keeps its name).

    python3 deploy/tests/metrics_used.py
    python3 deploy/tests/metrics_used.py --against deploy/tests/exported_metrics.txt
        # also exit 1 listing the names missing from that file (one name a line)
"""

import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "odin-ws.json"

STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
IDENT = re.compile(r"(?<![A-Za-z0-9_:])(?:ws|process|tokio)_[A-Za-z0-9_:]*")


def alert_exprs():
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield str(rule["expr"])


def dashboard_exprs():
    doc = json.loads(DASHBOARD.read_text())

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(doc.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                yield t["expr"]
    for v in doc.get("templating", {}).get("list", []):
        query = v.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if v.get("type") == "query" and isinstance(query, str):
            yield query


def names(exprs):
    raw = set()
    for expr in exprs:
        raw.update(IDENT.findall(STRINGS.sub('""', expr)))
    bucketed = {n[: -len("_bucket")] for n in raw if n.endswith("_bucket")}
    out = set()
    for n in raw:
        if n.endswith("_bucket"):
            n = n[: -len("_bucket")]
        else:
            for suffix in ("_sum", "_count"):
                base = n[: -len(suffix)]
                if n.endswith(suffix) and (base in bucketed or base.endswith("_seconds")):
                    n = base
                    break
        out.add(n)
    return sorted(out)


def main(argv):
    used = names(list(alert_exprs()) + list(dashboard_exprs()))
    if argv[:1] == ["--against"] and len(argv) == 2:
        known = {line.strip() for line in Path(argv[1]).read_text().splitlines()
                 if line.strip() and not line.startswith("#")}
        missing = [n for n in used if n not in known]
        for n in missing:
            print(f"not exported: {n}", file=sys.stderr)
        return 1 if missing else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(used))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
