#!/usr/bin/env bash
# Checks the monitoring kit in packaging/monitoring/:
#   1. `promtool check rules` on the alert rules;
#   2. `promtool test rules` on their unit tests (every alert fires, and none
#      fires on a healthy cluster);
#   3. the Grafana dashboard is valid JSON with the datasource variable;
#   4. every metric name used in the rules and the dashboard is exported by
#      src/ops/metrics.rs (with `_total` exactly for counters), is a
#      Prometheus built-in (`up`), or is in FUTURE below with its reason.
# Needs python3 and promtool; promtool comes with Debian's `prometheus`
# package, installed here when missing and running as root.
#   scripts/check-monitoring.sh
set -euo pipefail
cd "$(dirname "$0")/.."
kit=packaging/monitoring

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus) ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "check-monitoring: promtool is not installed; install it (e.g. sudo apt-get install --no-install-recommends prometheus, or the promtool binary from https://prometheus.io/download/) and run again" >&2
    exit 1
  fi
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "check-monitoring: python3 is needed to check the dashboard and the metric names" >&2
  exit 1
fi

promtool check rules "$kit/clusterd.rules.yml"
promtool test rules "$kit/clusterd.rules.test.yml"

python3 - "$kit/clusterd.rules.yml" "$kit/grafana-dashboard.json" src/ops/metrics.rs <<'PY'
import json, re, sys

rules_path, dashboard_path, source_path = sys.argv[1:4]

# Names the kit uses before clusterd exports them, and why. The rules using
# them fire once the feature lands; drop an entry when it does (this check
# says so).
FUTURE = {}
BUILTIN = {"up"}

failures = []

def fail(msg):
    failures.append(msg)
    print("check-monitoring: " + msg, file=sys.stderr)

# ---- what the source exports: the name of each registered family and
# whether it is a counter (exported with `_total`) or a gauge.
source = open(source_path).read().split("#[cfg(test)]")[0]
if 'Registry::with_prefix("clusterd")' not in source:
    fail(f"{source_path} no longer registers its metrics under the prefix clusterd")
kinds = {}
last = None
for m in re.finditer(r'(Counter|counter\(|Gauge|gauge\()|"([a-z][a-z0-9_]*)"', source):
    if m.group(1):
        last = "counter" if m.group(1).lower().startswith("counter") else "gauge"
    elif last:
        kinds.setdefault(m.group(2), set()).add(last)

def exported(name):
    """None if clusterd exports `name`, else why not."""
    if not name.startswith("clusterd_"):
        return "not a clusterd_ metric"
    base = name[len("clusterd_"):]
    if base.endswith("_total"):
        stem = base[:-len("_total")]
        if "counter" in kinds.get(stem, ()):
            return None
        if "gauge" in kinds.get(stem, ()):
            return f"{stem} is a gauge: use clusterd_{stem} without _total"
        return f"{source_path} registers no counter {stem!r}"
    if "gauge" in kinds.get(base, ()):
        return None
    if "counter" in kinds.get(base, ()):
        return f"{base} is a counter: use {name}_total"
    return f"{source_path} registers no family {base!r}"

# ---- PromQL expressions of the rules file.
def rule_exprs(path):
    text = open(path).read()
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml:
        doc = yaml.safe_load(text)
        return [(r.get("alert") or r.get("record"), r["expr"])
                for g in doc["groups"] for r in g["rules"]]
    # Without PyYAML: `expr: ...` on one line, or a block scalar (`|`, `>`)
    # on the lines indented deeper than `expr:`.
    out, lines, name = [], text.splitlines(), "?"
    for i, line in enumerate(lines):
        m = re.match(r"\s*- (?:alert|record):\s*(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value[:1] in ("|", ">"):
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt)
            value = "\n".join(block)
        out.append((name, value.strip().strip("'\"")))
    return out

# ---- PromQL expressions of the dashboard, and its shape.
try:
    dashboard = json.load(open(dashboard_path))
except ValueError as e:
    fail(f"{dashboard_path} is not valid JSON: {e}")
    sys.exit(1)

def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))

dash_exprs = []
variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
ds_var = variables.get("DS_PROMETHEUS")
if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
    fail("the dashboard needs a datasource variable DS_PROMETHEUS of type prometheus")
if not ({"node", "instance"} & set(variables)):
    fail("the dashboard needs a node or instance variable")
if not isinstance(dashboard.get("schemaVersion"), int):
    fail("the dashboard has no schemaVersion")
ids = [p.get("id") for p in all_panels(dashboard.get("panels", []))]
if len(ids) != len(set(ids)):
    fail("the dashboard has duplicate panel ids")
for p in all_panels(dashboard.get("panels", [])):
    if p.get("type") == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        fail(f"panel {p.get('title')!r} does not use the ${{DS_PROMETHEUS}} datasource")
    if not p.get("targets"):
        fail(f"panel {p.get('title')!r} has no query")
    for t in p.get("targets", []):
        if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            fail(f"a query of panel {p.get('title')!r} does not use ${{DS_PROMETHEUS}}")
        dash_exprs.append((f"panel {p.get('title')!r}", t.get("expr", "")))
for a in dashboard.get("annotations", {}).get("list", []):
    if a.get("expr"):
        dash_exprs.append((f"annotation {a.get('name')!r}", a["expr"]))
for name, v in variables.items():
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else q
    if v.get("type") == "query":
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q or "")
        if not m:
            fail(f"variable {name!r}: expected label_values(SELECTOR, LABEL), got {q!r}")
            continue
        dash_exprs.append((f"variable {name!r}", m.group(1)))

# ---- metric names in a PromQL expression.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and",
            "or", "unless", "offset", "bool", "atan2", "inf", "nan",
            # aggregation operators, which may stand apart from their `(`
            "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
            "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}

def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # label values
    e = re.sub(r"\$\{?\w+\}?", "", e)                       # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names

used = {}
for where, expr in [(f"rule {n}", e) for n, e in rule_exprs(rules_path)] + dash_exprs:
    names = metric_names(expr)
    if not names:
        fail(f"{where}: found no metric name in {expr!r}")
    for n in names:
        used.setdefault(n, set()).add(where)

for name in sorted(used):
    where = ", ".join(sorted(used[name])[:3]) + (" ..." if len(used[name]) > 3 else "")
    if name in BUILTIN:
        print(f"  {name:42} Prometheus built-in")
        continue
    why = exported(name)
    if name in FUTURE:
        if why is None:
            print(f"  {name:42} exported now: drop it from FUTURE in scripts/check-monitoring.sh")
        else:
            print(f"  {name:42} future: {FUTURE[name]}")
        continue
    if why is None:
        print(f"  {name:42} exported by {source_path}")
    else:
        fail(f"{name} (used in {where}): {why}")
for name in sorted(set(FUTURE) - set(used)):
    print(f"  note: FUTURE lists {name}, which nothing uses any more")

if failures:
    sys.exit(1)
print(f"check-monitoring: {len(used)} metric names in the rules and the dashboard check out")
PY
