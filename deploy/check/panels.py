#!/usr/bin/env python3
"""Runs a real Prometheus with deploy/prometheus/rules.yml against a synthetic banditflow and asks
it every dashboard query.

Two HTTP servers on 127.0.0.1 play a processor (job "banditflow") and a ranking node (job
"banditflow-serving"): every metric of metrics.py, every label combination, healthy values
(records flowing, nothing failing, the treatment ahead of the holdout). Prometheus scrapes them
every second and evaluates the rules every second; then this script checks that

  - both targets are up and every recording rule and alert evaluates without error,
  - no alert is pending or firing (a healthy system must be quiet),
  - the dashboard's variable queries find values, and every panel query, with $instance and
    $model set to all of them (as Grafana's "All" does) and $__rate_interval to 5s, returns at
    least one series.

What this does not show: that the real binaries export exactly these names and labels (a run
of the binaries under traffic, scraped by the same Prometheus, has to), or how the panels look
(Grafana is not installed here).

    deploy/check/panels.py --prometheus /usr/bin/prometheus
"""

import argparse
import http.server
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import metrics  # noqa: E402

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
RATE_INTERVAL = "5s"
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)

# Counters default to 0/s (failures, evictions, rebalances): healthy. These flow.
COUNTER_RATES = {
    "banditflow_records_total": lambda l: {"applied": 500.0, "invalid": 0.5, "redelivered": 0.0}[l["outcome"]],
    "banditflow_events_total": lambda l: {
        "impressions_learned": 480.0, "impressions_duplicate": 2.0, "impressions_opted_out": 3.0,
        "feedback_attributed": 300.0, "feedback_held": 5.0, "feedback_released": 4.0,
    }.get(l["outcome"], 0.0),
    "banditflow_invalid_records_total": lambda l: 0.25,
    "banditflow_dead_letters_total": lambda l: 0.25,
    "banditflow_transactions_total": lambda l: 1.0 if l["result"] == "committed" else 0.0,
    "banditflow_snapshots_published_total": lambda l: 2.0 if l["result"] == "ok" else 0.0,
    "banditflow_snapshot_written_bytes_total": lambda l: 250_000.0,
    "banditflow_changelog_written_bytes_total": lambda l: 60_000.0,
    "banditflow_changelog_copied_total": lambda l: 20.0,
    "banditflow_serving_requests_total": lambda l: {("rank", "200"): 100.0, ("feedback", "202"): 60.0, ("rank", "422"): 0.5}.get(
        (l["endpoint"], l["status"]), 0.0),
    "banditflow_serving_impressions_total": lambda l: 95.0 if l["variant"] == "treatment" else 5.0,
    "banditflow_serving_feedback_total": lambda l: 15.0,
    "banditflow_serving_model_updates_total": lambda l: 1.0,
    "process_cpu_seconds_total": lambda l: 0.4,
}
# Fraction of observations at or below each bucket of BUCKETS, and observations per second.
HISTOGRAMS = {
    "banditflow_serving_request_seconds": ((0.2, 0.6, 0.9, 0.995, 1, 1, 1, 1, 1, 1, 1), 80.0),
    "banditflow_serving_kafka_ack_seconds": ((0.3, 0.7, 0.95, 0.998, 1, 1, 1, 1, 1, 1, 1), 80.0),
    "banditflow_transaction_duration_seconds": ((0, 0.05, 0.3, 0.9, 0.99, 1, 1, 1, 1, 1, 1), 1.0),
    "banditflow_snapshot_gather_seconds": ((0.1, 0.5, 0.8, 0.99, 1, 1, 1, 1, 1, 1, 1), 1.0),
    "banditflow_event_to_snapshot_seconds": ((0, 0, 0, 0.01, 0.05, 0.4, 0.8, 0.99, 1, 1, 1), 30.0),
    "banditflow_serving_event_to_visible_seconds": ((0, 0, 0, 0.01, 0.05, 0.4, 0.8, 0.99, 1, 1, 1), 20.0),
    "banditflow_partition_restore_seconds": ((0, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 1), 0.0),
}


def gauge(name, labels, now, elapsed):
    """A healthy value for a gauge."""
    if name in ("banditflow_variant_impressions", "banditflow_variant_reward", "banditflow_variant_reward_squares"):
        share = {"treatment": 0.9, "holdout": 0.05, "other": 0.05}[labels["variant"]]
        n = share * (100_000 + 240 * elapsed)
        mean, square = {"treatment": (0.5, 1.2), "holdout": (0.4, 0.9), "other": (0.3, 0.6)}[labels["variant"]]
        return {"banditflow_variant_impressions": n, "banditflow_variant_reward": mean * n,
                "banditflow_variant_reward_squares": square * n}[name]
    if name == "banditflow_serving_lift_reward_per_impression":
        return {"estimate": 0.1, "lower": 0.05, "upper": 0.15}[labels["bound"]]
    fixed = {
        "banditflow_ready": 1, "banditflow_serving_ready": 1, "banditflow_serving_subscriber_running": 1, "banditflow_assigned_partitions": 2,
        "banditflow_consumer_lag_records": 120, "banditflow_consumer_lag_seconds": 0.4,
        "banditflow_snapshot_last_success_timestamp_seconds": now - 0.5,
        "banditflow_snapshot_version": 1_000_000 + 500 * elapsed, "banditflow_snapshot_bytes": 48_000,
        "banditflow_buffered_impressions": 350_000, "banditflow_held_feedback": 40,
        "banditflow_watermark_timestamp_seconds": now - 5, "banditflow_changelog_segments": 60,
        "banditflow_model_arms": 20_000, "banditflow_paused_input_partitions": 0,
        "banditflow_behind_input_partitions": 0, "banditflow_serving_model_version": 2_000_000 + 1000 * elapsed,
        "banditflow_serving_model_partitions": 2, "banditflow_serving_snapshot_partitions": 2,
        "banditflow_serving_model_event_timestamp_seconds": now - 1.5,
        "banditflow_serving_model_staleness_seconds": 1.5,
        "banditflow_serving_model_visible_timestamp_seconds": now - 0.5,
        "process_resident_memory_bytes": 300e6, "process_virtual_memory_bytes": 1.2e9,
        "process_open_fds": 40, "process_max_fds": 1_048_576, "process_start_time_seconds": now - elapsed - 60,
        "process_threads": 6, "banditflow_build_info": 1, "banditflow_partition_failed": 0,
        "banditflow_aggregate_model_version": 2_000_000 + 1000 * elapsed,
    }
    return fixed[name]


def combos(labels, examples):
    for values in itertools.product(*(examples[label] for label in labels)):
        yield dict(zip(labels, values))


def render_labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def exposition(job, started):
    now = time.time()
    elapsed = now - started
    lines = []
    for name, (kind, labels, examples) in sorted(metrics.JOBS[job].items()):
        lines.append(f"# TYPE {name} {kind}")
        for combo in combos(labels, examples):
            if kind == "counter":
                rate = COUNTER_RATES.get(name, lambda _: 0.0)(combo)
                lines.append(f"{name}{render_labels(combo)} {rate * elapsed:.6f}")
            elif kind == "gauge":
                lines.append(f"{name}{render_labels(combo)} {gauge(name, combo, now, elapsed):.6f}")
            else:
                fractions, per_second = HISTOGRAMS[name]
                count = per_second * elapsed
                for le, fraction in zip(BUCKETS, fractions):
                    lines.append(f"{name}_bucket{render_labels({**combo, 'le': repr(float(le))})} {fraction * count:.6f}")
                lines.append(f"{name}_bucket{render_labels({**combo, 'le': '+Inf'})} {count:.6f}")
                lines.append(f"{name}_sum{render_labels(combo)} {0.05 * count:.6f}")
                lines.append(f"{name}_count{render_labels(combo)} {count:.6f}")
    return "\n".join(lines) + "\n"


def serve(job, started):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = exposition(job, started).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary, port):
        self.base = f"http://127.0.0.1:{port}"
        # Proxies from the environment would send these requests elsewhere.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.binary = binary

    def get(self, path, **params):
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with self.opener.open(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            return json.load(exc)

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)


def grafana_regex(values):
    """What Grafana puts for a multi-value variable set to All inside =~"…": (a|b) with regex
    metacharacters escaped (a backslash doubled for the PromQL string)."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in sorted(values)]
    return "(" + "|".join(escaped) + ")"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    parser.add_argument("--rules", default=str(DEPLOY / "prometheus" / "rules.yml"))
    parser.add_argument("--dashboard", default=str(DEPLOY / "grafana" / "banditflow.json"))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every query to answer")
    args = parser.parse_args()

    started = time.time()
    servers = {job: serve(job, started) for job in metrics.JOBS}
    work = pathlib.Path(tempfile.mkdtemp(prefix="banditflow-panels-"))
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [os.path.abspath(args.rules)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{server.server_address[1]}"]}]}
            for job, server in servers.items()
        ],
    }
    (work / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [args.prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prometheus(args.prometheus, port)
    failures = []
    try:
        deadline = time.time() + args.timeout
        while True:
            try:
                if prom.query("count(up == 1) == 2")["data"]["result"]:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"Prometheus did not scrape both targets; its log:\n{(work / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.5)

        dashboard = json.loads(pathlib.Path(args.dashboard).read_text())
        variables = {}
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"])
            if not m:
                failures.append(f"variable {var['name']}: unsupported query {var['query']!r}")
                continue
            # Retried for a while: a series appears with the first scrape.
            values = []
            while time.time() < deadline and not values:
                values = prom.get(f"/api/v1/label/{m[2]}/values", **{"match[]": m[1]})["data"]
                time.sleep(0.2 if not values else 0)
            if not values:
                failures.append(f"variable {var['name']}: {var['query']} found no value")
            variables[var["name"]] = grafana_regex(values)
            print(f"  variable ${var['name']} = {values}")

        queries = []
        for p in dashboard["panels"]:
            for t in p.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", RATE_INTERVAL)
                for name, value in variables.items():
                    expr = expr.replace(f"${name}", value)
                queries.append((p["title"], t["refId"], expr))

        # Rate windows and recording rules need a few seconds of samples: retry until every
        # query answers or the deadline passes.
        pending = list(queries)
        answers = {}
        while pending and time.time() < deadline:
            still = []
            for title, ref, expr in pending:
                answer = prom.query(expr)
                if answer.get("status") == "success" and answer["data"]["result"]:
                    answers[(title, ref)] = answer["data"]["result"]
                else:
                    still.append((title, ref, expr))
                    answers[(title, ref)] = answer
            pending = still
            if pending:
                time.sleep(1)
        for title, ref, expr in queries:
            result = answers[(title, ref)]
            if (title, ref, expr) in pending:
                failures.append(f"panel {title!r} query {ref}: no series: {expr}\n    answer: {json.dumps(result)[:300]}")
            else:
                sample = result[0]["value"][1]
                print(f"  ok  {title} [{ref}]: {len(result)} series, e.g. {sample}")

        # Every rule evaluates; a healthy system fires nothing.
        time.sleep(2)
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        count = 0
        for group in groups:
            for rule in group["rules"]:
                count += 1
                if rule.get("health") != "ok":
                    failures.append(f"rule {rule['name']} in {group['name']}: health {rule.get('health')}: {rule.get('lastError')}")
                if rule["type"] == "alerting" and rule.get("alerts"):
                    states = sorted({a["state"] for a in rule["alerts"]})
                    failures.append(f"alert {rule['name']} is {'/'.join(states)} on healthy synthetic metrics")
        print(f"  {count} rules evaluated")
        lifts = prom.query('model:banditflow_lift:estimate')["data"]["result"]
        for series in lifts:
            value = float(series["value"][1])
            if not math.isclose(value, 0.1, rel_tol=1e-6):
                failures.append(f"model:banditflow_lift:estimate{series['metric']} = {value}, expected 0.1 (0.5 − 0.4)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for server in servers.values():
            server.shutdown()
        if failures:
            print(f"Prometheus log kept in {work / 'prometheus.log'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"every dashboard query ({len(queries)}) returned series; every rule healthy, no alert active")
    return 0


if __name__ == "__main__":
    sys.exit(main())
