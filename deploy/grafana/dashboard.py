#!/usr/bin/env python3
"""Writes deploy/grafana/banditflow.json, the Grafana 10 dashboard of banditflow.

The dashboard is generated so that its panels stay short to read and review here (title, query,
unit), while the JSON carries Grafana's boilerplate. Edit this file, then run

    python3 deploy/grafana/dashboard.py            # rewrites banditflow.json
    python3 deploy/grafana/dashboard.py --check    # exit 1 when banditflow.json is not up to date
    python3 deploy/grafana/dashboard.py --queries  # every panel query: title <TAB> legend <TAB> expr

Rules every query follows (checked by deploy/check/lint.py): the only variables are $instance,
$model and $__rate_interval; every raw metric is filtered by instance=~"$instance" (and
model=~"$model" when it has a model label), recording rules by model; rates and increases are
over $__rate_interval; no comparison filters (a panel shows zeros rather than nothing, so every
query returns a series while both processes run under traffic).
"""

import argparse
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent / "banditflow.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'
IM = 'instance=~"$instance", model=~"$model"'
M = 'model=~"$model"'
PROC = 'job=~"banditflow|banditflow-serving", instance=~"$instance"'


def q(expr, legend=""):
    return (expr, legend)


# (row title, [panels]); a panel: (type, title, description, unit, width, [queries], extra)
ROWS = [
    (
        "Overview",
        [
            ("stat", "Events/s", "Input records consumed per second by the selected processors.", "ops", 4,
             [q(f"sum(rate(banditflow_records_total{{{I}}}[$__rate_interval]))", "events/s")], {}),
            ("stat", "Ready instances", "Processors answering 200 on /readyz, and ranking nodes.", "short", 4,
             [q(f"sum(banditflow_ready{{{I}}})", "processors"),
              q(f"sum(banditflow_serving_ready{{{I}}})", "ranking nodes")], {}),
            ("stat", "Assigned partitions", "Input partitions owned by the selected processors.", "short", 4,
             [q(f"sum(banditflow_assigned_partitions{{{I}}})", "partitions")], {}),
            ("stat", "Max lag", "Age of the oldest unconsumed input record over every partition (0 when caught up).", "s", 4,
             [q(f"max(banditflow_consumer_lag_seconds{{{I}}})", "lag")], {"thresholds": [(0, "green"), (60, "orange"), (600, "red")]}),
            ("stat", "Dead-letter ratio", "Share of consumed records rejected to the dead-letter topic.", "percentunit", 4,
             [q(f"sum(rate(banditflow_dead_letters_total{{{I}}}[$__rate_interval])) / sum(rate(banditflow_records_total{{{I}}}[$__rate_interval]))", "dead letters")],
             {"thresholds": [(0, "green"), (0.01, "red")]}),
            ("stat", "Snapshot age", "Time since the selected processors last committed a snapshot transaction.", "s", 4,
             [q(f"time() - max(banditflow_snapshot_last_success_timestamp_seconds{{{I}}})", "age")],
             {"thresholds": [(0, "green"), (60, "orange"), (300, "red")]}),
        ],
    ),
    (
        "Throughput",
        [
            ("timeseries", "Input records/s by topic and outcome", "applied, invalid (dead-lettered) and redelivered (below a partition's recorded offset, ignored).", "ops", 12,
             [q(f"sum by (topic, outcome) (rate(banditflow_records_total{{{I}}}[$__rate_interval]))", "{{topic}} {{outcome}}")], {}),
            ("timeseries", "Join outcomes/s", "What the attribution join did with each impression and feedback event.", "ops", 12,
             [q(f"sum by (outcome) (rate(banditflow_events_total{{{I}}}[$__rate_interval]))", "{{outcome}}")], {}),
            ("timeseries", "Dead letters/s by reason", "Records written to the dead-letter topic, by rejection reason.", "ops", 12,
             [q(f"sum by (reason) (rate(banditflow_dead_letters_total{{{I}}}[$__rate_interval]))", "{{reason}}")], {}),
            ("timeseries", "Consumer errors and redeliveries/s", "librdkafka consumer errors, and records delivered again below a recorded offset.", "ops", 12,
             [q(f"sum(rate(banditflow_consumer_errors_total{{{I}}}[$__rate_interval]))", "consumer errors"),
              q(f"sum(rate(banditflow_records_total{{outcome=\"redelivered\", {I}}}[$__rate_interval]))", "redelivered")], {}),
        ],
    ),
    (
        "Lag",
        [
            ("timeseries", "Consumer lag per partition (records)", "Records between each input partition's consumer position and its end.", "short", 8,
             [q(f"max by (topic, partition) (banditflow_consumer_lag_records{{{I}}})", "{{topic}}/{{partition}}")], {}),
            ("timeseries", "Consumer lag per partition (seconds)", "Age of each partition's oldest unconsumed record; 0 when caught up.", "s", 8,
             [q(f"max by (topic, partition) (banditflow_consumer_lag_seconds{{{I}}})", "{{topic}}/{{partition}}")], {}),
            ("timeseries", "Paused and behind input partitions", "Partitions paused to let the other input topic catch up (timestamp alignment), and partitions behind their end.", "short", 8,
             [q(f"sum(banditflow_paused_input_partitions{{{I}}})", "paused"),
              q(f"sum(banditflow_behind_input_partitions{{{I}}})", "behind")], {}),
        ],
    ),
    (
        "Consumer group",
        [
            ("timeseries", "Assigned partitions per instance", "Input partitions each processor owns.", "short", 8,
             [q(f"sum by (instance) (banditflow_assigned_partitions{{{I}}})", "{{instance}}")], {}),
            ("timeseries", "Rebalances", "Rebalance callbacks per instance and kind.", "short", 8,
             [q(f"sum by (instance, kind) (increase(banditflow_rebalances_total{{{I}}}[$__rate_interval]))", "{{instance}} {{kind}}")], {}),
            ("timeseries", "Session restarts", "Times a processor dropped its Kafka session and rebuilt its state from Kafka after a failure.", "short", 8,
             [q(f"sum by (instance) (increase(banditflow_session_restarts_total{{{I}}}[$__rate_interval]))", "{{instance}}")], {}),
            ("timeseries", "Partition restores", "Partitions restored from the snapshot topic on assignment, by result; and partitions that cannot be restored now (paused and retried; banditflow_partition_failed names partition and reason).", "short", 6,
             [q(f"sum by (instance, result) (increase(banditflow_partition_restores_total{{{I}}}[$__rate_interval]))", "{{instance}} {{result}}"),
              q(f"sum by (instance) (banditflow_partition_failed{{{I}}}) or 0 * sum by (instance) (banditflow_assigned_partitions{{{I}}})", "failed now {{instance}}")], {}),
            ("timeseries", "Partition restore time p99", "99th percentile of the time to restore a partition.", "s", 6,
             [q(f"histogram_quantile(0.99, sum by (le) (rate(banditflow_partition_restore_seconds_bucket{{{I}}}[$__rate_interval])))", "p99")], {}),
            ("timeseries", "Transactions/s", "Snapshot transactions (snapshots, dead letters and input offsets) by result.", "ops", 6,
             [q(f"sum by (result) (rate(banditflow_transactions_total{{{I}}}[$__rate_interval]))", "{{result}}")], {}),
            ("timeseries", "Transaction duration p99", "99th percentile of the time a snapshot transaction takes.", "s", 6,
             [q(f"histogram_quantile(0.99, sum by (le) (rate(banditflow_transaction_duration_seconds_bucket{{{I}}}[$__rate_interval])))", "p99")], {}),
        ],
    ),
    (
        "Model and snapshots",
        [
            ("timeseries", "Model version", "Input records the newest shard of every partition covers, summed (what the ranking nodes' merged model reports).", "short", 6,
             [q(f"sum by (model) (max by (model, partition) (banditflow_snapshot_version{{{IM}}}))", "{{model}}")], {}),
            ("timeseries", "Snapshot age per instance", "Time since each processor last committed a snapshot transaction.", "s", 6,
             [q(f"time() - max by (instance) (banditflow_snapshot_last_success_timestamp_seconds{{{I}}})", "{{instance}}")], {}),
            ("timeseries", "Event → snapshot freshness", "Time from an input record's timestamp to the commit of a snapshot that includes it (one record in 16 sampled).", "s", 6,
             [q(f"histogram_quantile(0.5, sum by (le) (rate(banditflow_event_to_snapshot_seconds_bucket{{{I}}}[$__rate_interval])))", "p50"),
              q(f"histogram_quantile(0.99, sum by (le) (rate(banditflow_event_to_snapshot_seconds_bucket{{{I}}}[$__rate_interval])))", "p99")], {}),
            ("timeseries", "Arms per model", "(segment, item) arms, summed over partitions.", "short", 6,
             [q(f"sum by (model) (banditflow_model_arms{{{IM}}})", "{{model}}")], {}),
            ("timeseries", "Model bytes per save", "Bytes the last save of each shard wrote (its head and the arm segments of the arms that changed), summed per model.", "bytes", 6,
             [q(f"sum by (model) (banditflow_snapshot_bytes{{{IM}}})", "{{model}}")], {}),
            ("timeseries", "State topic writes", "Bytes written per second to the snapshot topic (model heads, changed arms, checkpoints: what serving nodes read) and to the changelog topic (the attribution buffer's changelog and held feedback: what only a restoring processor reads).", "Bps", 6,
             [q(f"sum(rate(banditflow_snapshot_written_bytes_total{{{I}}}[$__rate_interval]))", "snapshot topic"),
              q(f"sum(rate(banditflow_changelog_written_bytes_total{{{I}}}[$__rate_interval]))", "changelog topic")], {}),
            ("timeseries", "Snapshots published/s", "Shard snapshots published per model and result.", "ops", 6,
             [q(f"sum by (model, result) (rate(banditflow_snapshots_published_total{{{IM}}}[$__rate_interval]))", "{{model}} {{result}}")], {}),
            ("timeseries", "Snapshot gather time p99", "99th percentile of the time the partition tasks take to apply what was queued and encode their snapshots.", "s", 6,
             [q(f"histogram_quantile(0.99, sum by (le) (rate(banditflow_snapshot_gather_seconds_bucket{{{I}}}[$__rate_interval])))", "p99")], {}),
        ],
    ),
    (
        "Merged-model stage (banditflow aggregate)",
        [
            ("timeseries", "Merged model version against the processors'", "Input records the merged model on the merged-model topic covers (what nodes with serving.read_merged rank with), beside the processors' newest shards summed; the gap is what the aggregator has not written yet.", "short", 6,
             [q(f"max by (model) (banditflow_aggregate_model_version{{{IM}}})", "{{model}} merged"),
              q(f"sum by (model) (max by (model, partition) (banditflow_snapshot_version{{{IM}}}))", "{{model}} processors")], {}),
            ("timeseries", "Merged models written/s", "Merged models the aggregator wrote to the merged-model topic, per model (one per snapshot-topic change it merged).", "ops", 6,
             [q(f"sum by (model) (rate(banditflow_aggregate_published_total{{{IM}}}[$__rate_interval]))", "{{model}}")], {}),
            ("timeseries", "Merged arms and bytes written/s", "Merged arms whose value changed and were written, per model; bytes written to the merged-model topic.", "short", 6,
             [q(f"sum by (model) (rate(banditflow_aggregate_arms_written_total{{{IM}}}[$__rate_interval]))", "arms {{model}}"),
              q(f"sum(rate(banditflow_aggregate_bytes_written_total{{{I}}}[$__rate_interval]))", "bytes")], {}),
            ("timeseries", "Aggregator failures", "Aggregator sessions that failed and were rebuilt from both topics (alert BanditflowAggregatorFailing).", "short", 6,
             [q(f"sum(increase(banditflow_aggregate_failures_total{{{I}}}[$__rate_interval]))", "failures")], {}),
        ],
    ),
    (
        "Learning",
        [
            ("timeseries", "Reward per impression by variant", "Mean reward per impression of each variant since the model began (recording rule over the processors' per-partition statistics).", "short", 8,
             [q(f"model_variant:banditflow_reward_per_impression:mean{{{M}}}", "{{model}} {{variant}}")], {}),
            ("timeseries", "Lift over holdout (95 % interval)", "Treatment minus holdout reward per impression, with its Welch 95 % interval (recording rules).", "short", 8,
             [q(f"model:banditflow_lift:estimate{{{M}}}", "{{model}} lift"),
              q(f"model:banditflow_lift:lower{{{M}}}", "{{model}} lower"),
              q(f"model:banditflow_lift:upper{{{M}}}", "{{model}} upper")], {}),
            ("timeseries", "Impressions served/s by variant", "Impressions the ranking nodes logged, treatment and holdout.", "ops", 8,
             [q(f"sum by (model, variant) (rate(banditflow_serving_impressions_total{{{IM}}}[$__rate_interval]))", "{{model}} {{variant}}")], {}),
            ("timeseries", "Lift as ranking nodes see it", "The lift of the merged model the ranking nodes rank with (exact, from the snapshots).", "short", 8,
             [q(f"avg by (model, bound) (banditflow_serving_lift_reward_per_impression{{{IM}}})", "{{model}} {{bound}}")], {}),
            ("timeseries", "Attribution buffer", "Impressions retained for attribution and feedback held for its impression, summed over partitions.", "short", 8,
             [q(f"sum(banditflow_buffered_impressions{{{I}}})", "retained impressions"),
              q(f"sum(banditflow_held_feedback{{{I}}})", "held feedback")], {}),
            ("timeseries", "Buffer evictions/s", "Entries evicted at the memory caps (join.max_impressions, join.max_pending_feedback).", "ops", 8,
             [q(f"sum by (kind) (rate(banditflow_buffer_evictions_total{{{I}}}[$__rate_interval]))", "{{kind}}")], {}),
        ],
    ),
    (
        "Serving",
        [
            ("timeseries", "Request latency p50 / p99", "Time to answer POST /v1/rank and /v1/feedback, including Kafka's acknowledgement of the record; beside it the p99 of Kafka's answer itself (Kafka's part: linger, the broker's append and replication).", "s", 8,
             [q(f"histogram_quantile(0.5, sum by (endpoint, le) (rate(banditflow_serving_request_seconds_bucket{{{I}}}[$__rate_interval])))", "{{endpoint}} p50"),
              q(f"histogram_quantile(0.99, sum by (endpoint, le) (rate(banditflow_serving_request_seconds_bucket{{{I}}}[$__rate_interval])))", "{{endpoint}} p99"),
              q(f"histogram_quantile(0.99, sum by (topic, le) (rate(banditflow_serving_kafka_ack_seconds_bucket{{{I}}}[$__rate_interval])))", "Kafka ack p99 {{topic}}")], {}),
            ("timeseries", "Requests/s by status", "Answers per endpoint and HTTP status.", "reqps", 8,
             [q(f"sum by (endpoint, status) (rate(banditflow_serving_requests_total{{{I}}}[$__rate_interval]))", "{{endpoint}} {{status}}")], {}),
            ("timeseries", "Model staleness", "Now minus the newest learned event of each model's most behind shard, on the most stale node.", "s", 8,
             [q(f"max by (model) (banditflow_serving_model_staleness_seconds{{{IM}}})", "{{model}}")], {}),
            ("timeseries", "Event → visible freshness", "Time from a record a node logged to a model that includes it being visible to its ranking.", "s", 8,
             [q(f"histogram_quantile(0.5, sum by (le) (rate(banditflow_serving_event_to_visible_seconds_bucket{{{I}}}[$__rate_interval])))", "p50"),
              q(f"histogram_quantile(0.99, sum by (le) (rate(banditflow_serving_event_to_visible_seconds_bucket{{{I}}}[$__rate_interval])))", "p99")], {}),
            ("timeseries", "Model version on ranking nodes", "Input records the merged model covers, per model (newest node).", "short", 8,
             [q(f"max by (model) (banditflow_serving_model_version{{{IM}}})", "{{model}}")], {}),
            ("timeseries", "Produce failures and not-ready answers/s", "Records the nodes could not write to Kafka, and requests answered 503 because a model was not loaded.", "ops", 8,
             [q(f"sum by (topic) (rate(banditflow_serving_produce_failures_total{{{I}}}[$__rate_interval]))", "produce failures {{topic}}"),
              q(f"sum by (model) (rate(banditflow_serving_not_ready_total{{{IM}}}[$__rate_interval]))", "not ready {{model}}")], {}),
        ],
    ),
    (
        "Process",
        [
            ("timeseries", "CPU", "CPU cores used per process.", "short", 8,
             [q(f"sum by (instance) (rate(process_cpu_seconds_total{{{PROC}}}[$__rate_interval]))", "{{instance}}")], {}),
            ("timeseries", "Resident memory", "Resident set size per process.", "bytes", 8,
             [q(f"sum by (instance) (process_resident_memory_bytes{{{PROC}}})", "{{instance}}")], {}),
            ("timeseries", "Open file descriptors", "Open file descriptors per process, as a share of its limit.", "percentunit", 8,
             [q(f"sum by (instance) (process_open_fds{{{PROC}}}) / sum by (instance) (process_max_fds{{{PROC}}})", "{{instance}}")], {}),
        ],
    ),
]


def thresholds(steps):
    # Grafana treats the first step as the base (−∞) whatever its value; the schema forbids the
    # null Grafana itself writes there.
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def panel(pid, kind, title, description, unit, grid, queries, extra):
    targets = []
    for i, (expr, legend) in enumerate(queries):
        targets.append({
            "refId": chr(ord("A") + i),
            "datasource": DS,
            "editorMode": "code",
            "expr": expr,
            "legendFormat": legend or "__auto",
            "range": True,
        })
    defaults = {"unit": unit}
    # No field overrides: the schema this dashboard is checked against wants an object for every
    # override matcher's options and property value, where Grafana writes strings and numbers.
    overrides = []
    if kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
        if "thresholds" in extra:
            defaults["color"] = {"mode": "thresholds"}
            defaults["thresholds"] = thresholds(extra["thresholds"])
        else:
            defaults["color"] = {"mode": "fixed", "fixedColor": "text"}
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
    return {
        "type": kind,
        "id": pid,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": grid,
        "transparent": False,
        "transformations": [],
        "options": options,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "targets": targets,
    }


def variable(name, label, query):
    return {
        "id": name,
        "type": "query",
        "name": name,
        "label": label,
        "hide": 0,
        "skipUrlSync": False,
        "datasource": DS,
        "query": query,
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


def dashboard():
    panels = []
    pid = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({
            "type": "row",
            "id": pid,
            "title": row_title,
            "collapsed": False,
            "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        })
        pid += 1
        y += 1
        x = 0
        height = 4 if all(p[0] == "stat" for p in row_panels) else 8
        for kind, title, description, unit, width, queries, extra in row_panels:
            if x + width > 24:
                x = 0
                y += height
            grid = {"h": height, "w": width, "x": x, "y": y}
            panels.append(panel(pid, kind, title, description, unit, grid, queries, extra))
            pid += 1
            x += width
        y += height
    return {
        "uid": "banditflow",
        "title": "banditflow",
        "description": "banditflow processors (banditflow run) and ranking nodes (banditflow serve): throughput, lag, consumer group, snapshots, learning, serving. Needs the recording rules of deploy/prometheus/rules.yml.",
        "tags": ["banditflow", "kafka", "bandits"],
        "style": "dark",
        "timezone": "",
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "refresh": "30s",
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "id": "datasource",
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "hide": 0,
                    "skipUrlSync": False,
                    "query": "prometheus",
                    "regex": "",
                    "refresh": 1,
                    "options": [],
                },
                variable("instance", "Instance", "label_values(banditflow_build_info, instance)"),
                variable("model", "Model", "label_values(banditflow_snapshot_version, model)"),
            ]
        },
        "panels": panels,
    }


def render():
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 when banditflow.json differs from what this writes")
    group.add_argument("--queries", action="store_true", help="print every panel query: title, legend, expr (tab-separated)")
    args = parser.parse_args()
    if args.queries:
        for row_title, row_panels in ROWS:
            for _, title, _, _, _, queries, _ in row_panels:
                for expr, legend in queries:
                    print(f"{title}\t{legend}\t{expr}")
        return 0
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is not what deploy/grafana/dashboard.py writes: run it and commit the result", file=sys.stderr)
            return 1
        print(f"{OUT.name} is up to date ({sum(len(p[5]) for _, r in ROWS for p in r)} queries)")
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
