#!/usr/bin/env python3
"""Consistency checks of deploy/ that no tool does by itself.

  alerts      every alert has labels.severity (critical|warning|info) and annotations summary,
              description and runbook_url; the runbook_url points at the heading named after the
              alert in deploy/README.md (GitHub's anchor), and that heading exists; rules.test.yml
              has a case where the alert fires and one where it does not.
  records     recording rules are named level:metric:operations, and an aggregation keeps
              exactly the level's labels (plus job).
  metrics     every metric a rule, a test series or a panel selects is one banditflow exports
              (check/metrics.py) or a recording rule, matched only on labels it has.
  dashboard   the variables instance and model (label_values queries as documented), unique
              integer panel ids, no null anywhere, options on every panel; every query uses only
              $instance, $model and $__rate_interval, filters raw metrics by instance (and model
              where they have one) and recording rules by model, takes rates over
              $__rate_interval and filters nothing out with a comparison.
  kubernetes  every kustomization.yaml (kubernetes/, overlays/*/) lists exactly the manifests
              beside it.
  compose     docker-compose.yml: depends_on names services, bind-mounted files and the build's
              Dockerfile exist, published ports are bound to 127.0.0.1.
  config      the banditflow.toml files of compose and of the ConfigMap parse, and name only
              sections and fields that config/default.toml (or, for models, an example) has:
              the binary refuses unknown fields at start.

    python3 deploy/check/lint.py        # from anywhere; exit 1 on any finding
"""

import json
import tomllib
import pathlib
import re
import sys

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import metrics  # noqa: E402

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
RUNBOOK_BASE = "https://github.com/banditflow/banditflow/blob/main/deploy/README.md#"
SEVERITIES = {"critical", "warning", "info"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "Inf", "NaN"}
RECORD_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+$")

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def github_anchor(heading):
    """The id GitHub gives a Markdown heading: lower case, punctuation but - and _ dropped,
    spaces to hyphens."""
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def selectors(expr):
    """(metric name or None, [matched label names]) of every selector in a PromQL expression,
    found lexically (enough for the expressions written here)."""
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}", s):
        labels = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", m.group(2))
        found.append((m.group(1), labels))
    bare = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{[^}]*\}", " ", s)
    bare = re.sub(r"\"[^\"]*\"", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    for m in re.finditer(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()", bare):
        if m.group(1) not in KEYWORDS:
            found.append((m.group(1), []))
    return found


def level_labels(record):
    return set(record.split(":")[0].split("_")) | {"job"}


def check_selectors(where, expr, known, records):
    for name, labels in selectors(expr):
        if name is None:
            problem(where, f"a selector without a metric name: {expr!r}")
            continue
        if name in records:
            allowed = level_labels(name)
        elif name in known:
            allowed = known[name]
        else:
            problem(where, f"unknown metric {name!r} (not in deploy/check/metrics.py nor a recording rule)")
            continue
        for label in labels:
            if label not in allowed:
                problem(where, f"{name} has no label {label!r} (it has {', '.join(sorted(allowed))})")


def load_rules():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts, records = {}, {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                if rule["alert"] in alerts:
                    problem("rules.yml", f"alert {rule['alert']} defined twice")
                alerts[rule["alert"]] = rule
            else:
                if rule["record"] in records:
                    problem("rules.yml", f"recording rule {rule['record']} defined twice")
                records[rule["record"]] = rule
    return alerts, records


def readme_anchors():
    anchors = {}
    for line in (DEPLOY / "README.md").read_text().splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            anchors.setdefault(github_anchor(m.group(2)), m.group(2))
    return anchors


def check_alerts(alerts, records, known):
    anchors = readme_anchors()
    for name, rule in alerts.items():
        where = f"rules.yml alert {name}"
        severity = rule.get("labels", {}).get("severity")
        if severity not in SEVERITIES:
            problem(where, f"labels.severity is {severity!r}, not one of {sorted(SEVERITIES)}")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not str(annotations.get(key, "")).strip():
                problem(where, f"annotation {key} missing")
        url = annotations.get("runbook_url", "")
        expected = RUNBOOK_BASE + github_anchor(name)
        if url != expected:
            problem(where, f"runbook_url is {url!r}, expected {expected!r}")
        anchor = url.rpartition("#")[2]
        if anchor not in anchors:
            problem(where, f"runbook anchor #{anchor} matches no heading of deploy/README.md")
        elif anchors[anchor] != name:
            problem(where, f"the heading for #{anchor} reads {anchors[anchor]!r}, not the alert name")
        check_selectors(where, rule["expr"], known, records)
    for name, rule in records.items():
        where = f"rules.yml record {name}"
        if not RECORD_NAME.match(name):
            problem(where, "not named level:metric:operations")
        m = re.search(r"\bby\s*\(([^)]*)\)", rule["expr"])
        if m:
            kept = {label.strip() for label in m.group(1).split(",") if label.strip()} - {"le"}
            if kept != level_labels(name):
                problem(where, f"aggregates by ({', '.join(sorted(kept))}) but its level says {sorted(level_labels(name))}")
        check_selectors(where, rule["expr"], known, records)


def check_tests(alerts, records, known):
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.test.yml").read_text())
    fires, quiet = set(), set()
    for i, test in enumerate(doc["tests"]):
        for series in test.get("input_series", []):
            m = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{.*\})?\s*$", series["series"])
            if not m:
                problem(f"rules.test.yml test {i}", f"cannot read series {series['series']!r}")
                continue
            check_selectors(f"rules.test.yml test {i}", series["series"], known, {})
        for case in test.get("alert_rule_test", []):
            name = case["alertname"]
            if name not in alerts:
                problem(f"rules.test.yml test {i}", f"alert {name} is not in rules.yml")
            (fires if case.get("exp_alerts") else quiet).add(name)
    for name in alerts:
        if name not in fires:
            problem("rules.test.yml", f"no case where {name} fires")
        if name not in quiet:
            problem("rules.test.yml", f"no case where {name} does not fire")


def walk_nulls(node, path, where):
    if node is None:
        problem(where, f"null at {path}")
    elif isinstance(node, dict):
        for key, value in node.items():
            walk_nulls(value, f"{path}.{key}", where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            walk_nulls(value, f"{path}[{i}]", where)


def check_dashboard(records, known):
    where = "grafana/banditflow.json"
    dash = json.loads((DEPLOY / "grafana" / "banditflow.json").read_text())
    walk_nulls(dash, "$", where)
    if not 36 <= dash.get("schemaVersion", 0) <= 38:
        problem(where, f"schemaVersion {dash.get('schemaVersion')} is not a Grafana 10 one (36–38)")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    wanted = {
        "instance": "label_values(banditflow_build_info, instance)",
        "model": "label_values(banditflow_snapshot_version, model)",
    }
    for name, query in wanted.items():
        v = variables.get(name)
        if v is None:
            problem(where, f"no template variable {name}")
        elif v.get("query") != query:
            problem(where, f"variable {name} queries {v.get('query')!r}, expected {query!r}")
    if "instance" in variables and not (variables["instance"].get("multi") and variables["instance"].get("includeAll")):
        problem(where, "variable instance must be multi-value with All")
    ids = set()
    panels = list(dash["panels"])
    for p in dash["panels"]:
        panels.extend(p.get("panels", []))
    for p in panels:
        title = p.get("title", "?")
        pid = p.get("id")
        if not isinstance(pid, int):
            problem(where, f"panel {title!r} has no integer id")
        elif pid in ids:
            problem(where, f"panel id {pid} used twice")
        ids.add(pid)
        if p["type"] == "row":
            continue
        if "options" not in p:
            problem(where, f"panel {title!r} has no options")
        if not p.get("targets"):
            problem(where, f"panel {title!r} has no query")
        for t in p.get("targets", []):
            check_panel_query(f"{where} panel {title!r} [{t.get('refId')}]", t.get("expr", ""), records, known)


def check_panel_query(where, expr, records, known):
    used = set(re.findall(r"\$\{?(\w+)", expr))
    if used - {"instance", "model", "__rate_interval"}:
        problem(where, f"uses variables {sorted(used - {'instance', 'model', '__rate_interval'})}")
    for window in re.findall(r"\[([^\]]*)\]", expr):
        if window != "$__rate_interval":
            problem(where, f"range [{window}] instead of [$__rate_interval]")
    # Comparisons outside label matchers and strings filter series out.
    bare = re.sub(r"\{[^}]*\}", "{}", expr)
    if re.search(r"(==|!=|>=|<=|>|<)", bare):
        problem(where, f"compares (filters series out): {expr}")
    for name, labels in selectors(expr):
        if name in records:
            if "model" in level_labels(name) and "model" not in labels:
                problem(where, f"{name} not filtered by model=~\"$model\"")
        elif name in known:
            if "instance" not in labels:
                problem(where, f"{name} not filtered by instance=~\"$instance\"")
            if "model" in known[name] and "model" not in labels:
                problem(where, f"{name} has a model label but is not filtered by model=~\"$model\"")
        for m in re.finditer(r"(instance|model)\s*(=~|=|!=|!~)\s*\"([^\"]*)\"", expr):
            if m.group(2) != "=~" or m.group(3) != f"${m.group(1)}":
                problem(where, f'{m.group(0)} instead of {m.group(1)}=~"${m.group(1)}"')
    check_selectors(where, expr, known, records)


def check_kustomization():
    # The base and every overlay of it (deploy/overlays/*/).
    for path in [DEPLOY / "kubernetes" / "kustomization.yaml", *sorted(DEPLOY.glob("overlays/*/kustomization.yaml"))]:
        base = path.parent
        where = str(path.relative_to(DEPLOY))
        kust = yaml.safe_load(path.read_text())
        listed = set(kust.get("resources", []))
        present = {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}
        for name in sorted(r for r in listed - present if not (base / r).is_dir()):
            problem(where, f"lists {name}, which does not exist")
        for name in sorted(present - listed):
            problem(where, f"does not list {name}")


def check_compose():
    path = DEPLOY / "docker-compose.yml"
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services", {})
    for name, svc in services.items():
        where = f"docker-compose.yml service {name}"
        deps = svc.get("depends_on", {})
        for dep in (deps if isinstance(deps, list) else deps.keys()):
            if dep not in services:
                problem(where, f"depends on unknown service {dep}")
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                if not (path.parent / source).exists():
                    problem(where, f"mounts {source}, which does not exist")
        build = svc.get("build")
        if isinstance(build, dict):
            context = path.parent / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.exists():
                problem(where, f"builds with {dockerfile}, which does not exist")
        for port in svc.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problem(where, f"publishes {port} beyond 127.0.0.1")


# Tables whose keys are free-form or name feedback kinds.
FREE_FORM = {("kafka", "properties")}


def check_config_keys(where, config, reference, path=()):
    for key, value in config.items():
        here = path + (key,)
        if path + (key,) in FREE_FORM:
            continue
        if key not in reference:
            problem(where, f"unknown config field {'.'.join(here)}")
        elif isinstance(value, dict) and isinstance(reference[key], dict):
            check_config_keys(where, value, reference[key], here)


def check_configs():
    root = DEPLOY.parent
    default = tomllib.loads((root / "config" / "default.toml").read_text())
    model_keys = set()
    for path in [root / "config" / "default.toml", *sorted((root / "config" / "examples").glob("*.toml"))]:
        for model in tomllib.loads(path.read_text()).get("models", []):
            model_keys |= set(model)
    topic_keys = {key for topic in default["input"]["topics"] for key in topic}
    reference = {k: v for k, v in default.items() if k != "models"}
    # Optional fields default.toml documents commented out (`# name = value` in a section).
    section = None
    for line in (root / "config" / "default.toml").read_text().splitlines():
        if m := re.match(r"^\[([a-z_.]+)\]\s*$", line):
            section = m.group(1).split(".")
        elif (m := re.match(r"^# ([a-z_]+) = \S", line)) and section and section[0] != "models":
            table = reference
            for part in section:
                table = table.setdefault(part, {})
            table.setdefault(m.group(1), None)
    configmap = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    sources = {
        "compose/banditflow.toml": (DEPLOY / "compose" / "banditflow.toml").read_text(),
        "kubernetes/configmap.yaml banditflow.toml": configmap["data"]["banditflow.toml"],
    }
    for where, text in sources.items():
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            problem(where, f"not TOML: {exc}")
            continue
        check_config_keys(where, {k: v for k, v in config.items() if k != "models"}, reference)
        for i, model in enumerate(config.get("models", [])):
            for key in set(model) - model_keys:
                problem(where, f"unknown config field models[{i}].{key}")
        for i, topic in enumerate(config.get("input", {}).get("topics", [])):
            for key in set(topic) - topic_keys:
                problem(where, f"unknown config field input.topics[{i}].{key}")


def main():
    known = metrics.series_names()
    alerts, records = load_rules()
    check_alerts(alerts, records, known)
    check_tests(alerts, records, known)
    check_dashboard(records, known)
    check_kustomization()
    check_compose()
    check_configs()
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{len(alerts)} alerts (each with severity, summary, description, runbook_url, a README section, "
          f"a firing and a quiet test case), {len(records)} recording rules, dashboard queries, kustomization, "
          f"compose file and banditflow.toml files consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
