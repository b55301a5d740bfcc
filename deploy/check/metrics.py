"""The metrics banditflow exports, as the rules and the dashboard may use them.

This table is the contract deploy/ is written against: `lint.py` refuses a rule, test series or
dashboard query that names a metric or label not in it, and `panels.py` serves a synthetic
/metrics page made from it (every series with a plausible value) to a real Prometheus that then
answers every dashboard query. When the binaries gain or rename a metric, change it here first.

Each entry: name -> (type, labels, {label: example values}). Histograms are listed by their
base name; the exporter writes _bucket (with `le`), _sum and _count.
"""

PROCESSOR = {
    "banditflow_build_info": ("gauge", ("version", "component"), {"version": ["0.1.0"], "component": ["processor"]}),
    "banditflow_ready": ("gauge", (), {}),
    "banditflow_records_total": (
        "counter",
        ("topic", "outcome"),
        {"topic": ["impressions", "feedback"], "outcome": ["applied", "invalid", "redelivered"]},
    ),
    "banditflow_events_total": (
        "counter",
        ("outcome",),
        {
            "outcome": [
                "impressions_learned", "impressions_duplicate", "impressions_opted_out",
                "impressions_evicted", "impressions_expired", "feedback_attributed",
                "feedback_late_learned", "feedback_late_ignored", "feedback_duplicate",
                "feedback_held", "feedback_orphaned", "feedback_released", "feedback_evicted",
                "feedback_opted_out", "feedback_not_in_slate", "propensities_clipped",
                "rewards_clamped", "arms_rejected", "sums_saturated",
            ]
        },
    ),
    "banditflow_invalid_records_total": ("counter", ("reason",), {"reason": ["bad_json", "bad_protobuf", "future_event_time"]}),
    "banditflow_dead_letters_total": ("counter", ("reason",), {"reason": ["bad_json", "bad_protobuf", "future_event_time"]}),
    "banditflow_consumer_lag_records": ("gauge", ("topic", "partition"), {"topic": ["impressions", "feedback"], "partition": ["0", "1"]}),
    "banditflow_consumer_lag_seconds": ("gauge", ("topic", "partition"), {"topic": ["impressions", "feedback"], "partition": ["0", "1"]}),
    "banditflow_assigned_partitions": ("gauge", (), {}),
    "banditflow_rebalances_total": ("counter", ("kind",), {"kind": ["assign", "revoke", "error"]}),
    "banditflow_session_restarts_total": ("counter", (), {}),
    "banditflow_partition_restores_total": ("counter", ("result",), {"result": ["ok", "failed"]}),
    "banditflow_partition_failed": (
        "gauge",
        ("partition", "reason"),
        {"partition": ["0", "1"], "reason": ["restore_timeout", "undecodable"]},
    ),
    "banditflow_partition_restore_seconds": ("histogram", (), {}),
    "banditflow_transactions_total": ("counter", ("result",), {"result": ["committed", "failed"]}),
    "banditflow_transaction_duration_seconds": ("histogram", (), {}),
    "banditflow_snapshot_gather_seconds": ("histogram", (), {}),
    "banditflow_snapshots_published_total": ("counter", ("model", "result"), {"model": ["home", "search"], "result": ["ok", "failed"]}),
    "banditflow_snapshot_bytes": ("gauge", ("model", "partition"), {"model": ["home", "search"], "partition": ["0", "1"]}),
    "banditflow_snapshot_version": ("gauge", ("model", "partition"), {"model": ["home", "search"], "partition": ["0", "1"]}),
    "banditflow_snapshot_written_bytes_total": ("counter", (), {}),
    "banditflow_changelog_written_bytes_total": ("counter", (), {}),
    "banditflow_snapshot_last_success_timestamp_seconds": ("gauge", (), {}),
    "banditflow_event_to_snapshot_seconds": ("histogram", (), {}),
    "banditflow_buffered_impressions": ("gauge", ("partition",), {"partition": ["0", "1"]}),
    "banditflow_held_feedback": ("gauge", ("partition",), {"partition": ["0", "1"]}),
    "banditflow_buffer_evictions_total": ("counter", ("kind",), {"kind": ["impression", "feedback"]}),
    "banditflow_watermark_timestamp_seconds": ("gauge", ("partition",), {"partition": ["0", "1"]}),
    "banditflow_changelog_segments": ("gauge", ("partition",), {"partition": ["0", "1"]}),
    "banditflow_changelog_copied_total": ("counter", (), {}),
    "banditflow_model_arms": ("gauge", ("model", "partition"), {"model": ["home", "search"], "partition": ["0", "1"]}),
    "banditflow_model_restores_total": (
        "counter",
        ("model", "change"),
        {"model": ["home", "search"], "change": ["unchanged", "read_time", "half_life", "reset", "added", "removed"]},
    ),
    "banditflow_variant_impressions": (
        "gauge",
        ("model", "variant", "partition"),
        {"model": ["home", "search"], "variant": ["treatment", "holdout", "other"], "partition": ["0", "1"]},
    ),
    "banditflow_variant_reward": (
        "gauge",
        ("model", "variant", "partition"),
        {"model": ["home", "search"], "variant": ["treatment", "holdout", "other"], "partition": ["0", "1"]},
    ),
    "banditflow_variant_reward_squares": (
        "gauge",
        ("model", "variant", "partition"),
        {"model": ["home", "search"], "variant": ["treatment", "holdout", "other"], "partition": ["0", "1"]},
    ),
    "banditflow_paused_input_partitions": ("gauge", (), {}),
    "banditflow_behind_input_partitions": ("gauge", (), {}),
    "banditflow_input_pauses_total": ("counter", ("topic",), {"topic": ["impressions", "feedback"]}),
    "banditflow_consumer_errors_total": ("counter", (), {}),
    # `banditflow aggregate` (exported by the aggregator, also under job banditflow).
    "banditflow_aggregate_published_total": ("counter", ("model",), {"model": ["home", "search"]}),
    "banditflow_aggregate_arms_written_total": ("counter", ("model",), {"model": ["home", "search"]}),
    "banditflow_aggregate_bytes_written_total": ("counter", (), {}),
    "banditflow_aggregate_failures_total": ("counter", (), {}),
    "banditflow_aggregate_model_version": ("gauge", ("model",), {"model": ["home", "search"]}),
}

SERVING = {
    "banditflow_build_info": ("gauge", ("version", "component"), {"version": ["0.1.0"], "component": ["serving"]}),
    "banditflow_serving_ready": ("gauge", (), {}),
    "banditflow_serving_requests_total": (
        "counter",
        ("endpoint", "status"),
        {"endpoint": ["rank", "feedback"], "status": ["200", "202", "400", "404", "413", "415", "422", "503"]},
    ),
    "banditflow_serving_request_seconds": ("histogram", ("endpoint",), {"endpoint": ["rank", "feedback"]}),
    "banditflow_serving_kafka_ack_seconds": ("histogram", ("topic",), {"topic": ["impressions", "feedback"]}),
    "banditflow_serving_impressions_total": ("counter", ("model", "variant"), {"model": ["home", "search"], "variant": ["treatment", "holdout"]}),
    "banditflow_serving_feedback_total": ("counter", ("kind",), {"kind": ["click", "add_to_cart", "purchase", "return"]}),
    "banditflow_serving_model_version": ("gauge", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_model_updates_total": ("counter", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_model_partitions": ("gauge", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_snapshot_partitions": ("gauge", (), {}),
    "banditflow_serving_model_event_timestamp_seconds": ("gauge", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_model_staleness_seconds": ("gauge", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_model_visible_timestamp_seconds": ("gauge", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_event_to_visible_seconds": ("histogram", (), {}),
    "banditflow_serving_lift_reward_per_impression": (
        "gauge",
        ("model", "bound"),
        {"model": ["home", "search"], "bound": ["estimate", "lower", "upper"]},
    ),
    "banditflow_serving_produce_failures_total": ("counter", ("topic",), {"topic": ["impressions", "feedback"]}),
    "banditflow_serving_not_ready_total": ("counter", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_merge_failures_total": ("counter", ("model",), {"model": ["home", "search"]}),
    "banditflow_serving_bad_snapshots_total": ("counter", (), {}),
    "banditflow_serving_incomplete_values_total": ("counter", (), {}),
    "banditflow_serving_subscriber_running": ("gauge", (), {}),
}

# Both binaries (metrics-process).
PROCESS = {
    "process_cpu_seconds_total": ("counter", (), {}),
    "process_resident_memory_bytes": ("gauge", (), {}),
    "process_virtual_memory_bytes": ("gauge", (), {}),
    "process_open_fds": ("gauge", (), {}),
    "process_max_fds": ("gauge", (), {}),
    "process_start_time_seconds": ("gauge", (), {}),
    "process_threads": ("gauge", (), {}),
}

# Labels every scraped series has (target labels) and Prometheus' own per-target series.
TARGET_LABELS = ("job", "instance")
SCRAPE_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped")

JOBS = {"banditflow": {**PROCESSOR, **PROCESS}, "banditflow-serving": {**SERVING, **PROCESS}}


def series_names():
    """Every series name a query may select, with the labels it may be matched on."""
    names = {}
    for metrics in JOBS.values():
        for name, (kind, labels, _) in metrics.items():
            allowed = set(labels) | set(TARGET_LABELS)
            if kind == "histogram":
                names.setdefault(name + "_bucket", set()).update(allowed | {"le"})
                names.setdefault(name + "_sum", set()).update(allowed)
                names.setdefault(name + "_count", set()).update(allowed)
            else:
                names.setdefault(name, set()).update(allowed)
    for name in SCRAPE_SERIES:
        names[name] = set(TARGET_LABELS)
    return names
