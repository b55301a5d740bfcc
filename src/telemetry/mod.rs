//! Telemetry, one pattern: every metric family is declared once here ([`CATALOG`]: name, kind,
//! labels, help text, histogram buckets), and every event the program reports is a struct
//! whose `emit()` writes its log line and updates its metrics together ([`processor`],
//! [`serving`]). Nothing else in the crate calls the `metrics` macros (`tests/it/tidy.rs`), and
//! a test checks the catalogue against the README's table.
//!
//! Naming (Prometheus): base units in the name (`_seconds`, `_bytes`), counters end in
//! `_total`, timestamps are `_timestamp_seconds`; latencies are **histograms with explicit
//! buckets** (aggregatable across instances, usable in `histogram_quantile`), never summaries;
//! label values come from bounded sets (configured topics and models, partitions, reason
//! codes), never from ids in the data. Every label set known at start is exported at 0, so a
//! rate or an alert has a series before the first event.
//!
//! Must never: decide anything. Events carry what happened; the caller decides.

pub mod processor;
pub mod serving;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of family a metric is; histograms carry their bucket bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }
}

/// Which process exports a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `banditflow run`.
    Processor,
    /// `banditflow serve`.
    Serving,
    /// Both.
    Both,
    /// `banditflow aggregate`: its own families, the probes' `banditflow_ready`, and the
    /// snapshot-topic subscriber's families, which it shares with serving nodes.
    Aggregator,
}

impl Component {
    pub fn name(&self) -> &'static str {
        match self {
            Component::Processor => "processor",
            Component::Serving => "serving",
            Component::Both => "both",
            Component::Aggregator => "aggregator",
        }
    }

    /// Whether `self`'s process exports families declared for `declared`.
    fn exports(self, declared: Component) -> bool {
        // The aggregator shares the processor's probes (`banditflow_ready`) and the serving
        // nodes' subscriber: it describes every family, and renders only those it emits.
        declared == self || declared == Component::Both || self == Component::Aggregator
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
    pub component: Component,
}

/// Request latencies (seconds): a rank call is ~10 µs–1 ms of CPU plus the Kafka round trip.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Event → visible (seconds): the goal is well under a second; minutes mean trouble.
pub const FRESHNESS_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Transactions and gathering the tasks' state (seconds).
pub const COMMIT_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Restoring a partition from the snapshot topic (seconds).
pub const RESTORE_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

macro_rules! metric {
    ($id:ident, $name:literal, $kind:expr, [$($label:literal),*], $component:ident, $help:literal) => {
        pub const $id: Metric = Metric {
            name: $name,
            kind: $kind,
            labels: &[$($label),*],
            help: $help,
            component: Component::$component,
        };
    };
}

use Kind::{Counter, Gauge, Histogram};

metric!(
    BUILD_INFO,
    "banditflow_build_info",
    Gauge,
    ["version", "component"],
    Both,
    "Always 1; the labels say which version and component runs."
);
metric!(READY, "banditflow_ready", Gauge, [], Processor, "1 when /readyz answers 200, else 0: a processor has joined the group and restored every assigned partition; an aggregator has read the snapshot topic and written every model.");
metric!(RECORDS, "banditflow_records_total", Counter, ["topic", "outcome"], Processor, "Input records consumed, by topic and outcome (applied, invalid: dead-lettered, redelivered: below the state's offset, skipped).");
metric!(
    EVENTS,
    "banditflow_events_total",
    Counter,
    ["outcome"],
    Processor,
    "Attribution outcomes of valid events (impressions learned, feedback attributed, held, orphaned, …)."
);
metric!(
    INVALID,
    "banditflow_invalid_records_total",
    Counter,
    ["reason"],
    Processor,
    "Input records rejected by validation, by reason code."
);
metric!(
    DEAD_LETTERS,
    "banditflow_dead_letters_total",
    Counter,
    ["reason"],
    Processor,
    "Records written to the dead-letter topic in committed transactions, by reason code."
);
metric!(LAG_RECORDS, "banditflow_consumer_lag_records", Gauge, ["topic", "partition"], Processor, "Records on the broker not yet consumed, per input topic-partition this instance owns (from librdkafka's statistics).");
metric!(LAG_SECONDS, "banditflow_consumer_lag_seconds", Gauge, ["topic", "partition"], Processor, "Age of the unconsumed backlog: now minus the timestamp of the last record consumed (since assignment when none was), 0 when caught up.");
metric!(
    ASSIGNED,
    "banditflow_assigned_partitions",
    Gauge,
    [],
    Processor,
    "Input partitions this instance owns."
);
metric!(
    REBALANCES,
    "banditflow_rebalances_total",
    Counter,
    ["kind"],
    Processor,
    "Consumer group rebalance callbacks, by kind (assign, revoke, error)."
);
metric!(
    SESSION_RESTARTS,
    "banditflow_session_restarts_total",
    Counter,
    [],
    Processor,
    "Consumer sessions discarded and rebuilt from the snapshot topic after a failure (or a failed start)."
);
metric!(
    RESTORES,
    "banditflow_partition_restores_total",
    Counter,
    ["result"],
    Processor,
    "Assigned partitions restored from the snapshot topic, by result (ok, failed)."
);
metric!(
    RESTORE_SECONDS,
    "banditflow_partition_restore_seconds",
    Histogram(RESTORE_BUCKETS),
    [],
    Processor,
    "Time to restore the partitions of one assignment from the snapshot topic."
);
metric!(TRANSACTIONS, "banditflow_transactions_total", Counter, ["result"], Processor, "Kafka transactions (snapshots, changelog, dead letters and input offsets), by result (committed, failed).");
metric!(
    TRANSACTION_SECONDS,
    "banditflow_transaction_duration_seconds",
    Histogram(COMMIT_BUCKETS),
    [],
    Processor,
    "Duration of one transaction, begin to commit."
);
metric!(
    GATHER_SECONDS,
    "banditflow_snapshot_gather_seconds",
    Histogram(COMMIT_BUCKETS),
    [],
    Processor,
    "Time the partition tasks took to apply what was queued and encode their changes for a commit."
);
metric!(
    SNAPSHOTS,
    "banditflow_snapshots_published_total",
    Counter,
    ["model", "result"],
    Processor,
    "Shard snapshots written, by model and result (ok: committed, failed: in a failed transaction)."
);
metric!(
    SNAPSHOT_BYTES,
    "banditflow_snapshot_bytes",
    Gauge,
    ["model", "partition"],
    Processor,
    "Bytes the last committed transaction that saved the shard wrote for it: its head and the arm segments of the arms that changed."
);
metric!(
    SNAPSHOT_VERSION,
    "banditflow_snapshot_version",
    Gauge,
    ["model", "partition"],
    Processor,
    "Input records the last committed shard snapshot covers (its version)."
);
metric!(
    SNAPSHOT_WRITTEN,
    "banditflow_snapshot_written_bytes_total",
    Counter,
    [],
    Processor,
    "Bytes written to the snapshot topic in committed transactions (model heads and arm segments, checkpoints)."
);
metric!(
    CHANGELOG_WRITTEN,
    "banditflow_changelog_written_bytes_total",
    Counter,
    [],
    Processor,
    "Bytes written to the changelog topic in committed transactions (the attribution buffer's segments, held feedback)."
);
metric!(
    SNAPSHOT_SUCCESS,
    "banditflow_snapshot_last_success_timestamp_seconds",
    Gauge,
    [],
    Processor,
    "Unix time of the last committed transaction (0 before the first)."
);
metric!(
    EVENT_TO_SNAPSHOT,
    "banditflow_event_to_snapshot_seconds",
    Histogram(FRESHNESS_BUCKETS),
    [],
    Processor,
    "Input record timestamp to the commit of the snapshot that covers it (one record in 16 by offset)."
);
metric!(
    BUFFERED,
    "banditflow_buffered_impressions",
    Gauge,
    ["partition"],
    Processor,
    "Impressions retained for attribution."
);
metric!(
    HELD,
    "banditflow_held_feedback",
    Gauge,
    ["partition"],
    Processor,
    "Feedback waiting for its impression (grace)."
);
metric!(EVICTIONS, "banditflow_buffer_evictions_total", Counter, ["kind"], Processor, "Entries evicted at the memory caps, by kind (impression: join.max_impressions, feedback: join.max_pending_feedback).");
metric!(
    WATERMARK,
    "banditflow_watermark_timestamp_seconds",
    Gauge,
    ["partition"],
    Processor,
    "Event-time watermark of the partition."
);
metric!(
    SEGMENTS,
    "banditflow_changelog_segments",
    Gauge,
    ["partition"],
    Processor,
    "Attribution changelog segments stored on the changelog topic."
);
metric!(
    COPIED,
    "banditflow_changelog_copied_total",
    Counter,
    [],
    Processor,
    "Changelog entries copied out of sparse segments (compaction)."
);
metric!(
    ARMS,
    "banditflow_model_arms",
    Gauge,
    ["model", "partition"],
    Processor,
    "(segment, item) arms a model's shard holds."
);
metric!(
    PARTITION_FAILED,
    "banditflow_partition_failed",
    Gauge,
    ["partition", "reason"],
    Processor,
    "1 while an assigned partition cannot be restored (paused, retried with backoff; the others go on), by reason: restore_timeout, snapshot_unreadable, undecodable, format_version, incomplete, no_snapshot_partition, not_copartitioned."
);
metric!(MODEL_RESTORES, "banditflow_model_restores_total", Counter, ["model", "change"], Processor, "Model shards restored, by what a configuration change did to them (unchanged, read_time, half_life, reset, added, removed).");
metric!(VARIANT_IMPRESSIONS, "banditflow_variant_impressions", Gauge, ["model", "variant", "partition"], Processor, "Impressions learned per variant (treatment, holdout, other: named arms), cumulative; sums over partitions give the model's.");
metric!(
    VARIANT_REWARD,
    "banditflow_variant_reward",
    Gauge,
    ["model", "variant", "partition"],
    Processor,
    "Sum of reward (config units) per variant, cumulative."
);
metric!(VARIANT_REWARD_SQUARES, "banditflow_variant_reward_squares", Gauge, ["model", "variant", "partition"], Processor, "Sum over impressions of the squared per-impression reward, per variant: with the two above it gives the lift's Welch interval.");
metric!(
    PAUSED,
    "banditflow_paused_input_partitions",
    Gauge,
    [],
    Processor,
    "Input topic-partitions paused while their partition task waits for the other topic."
);
metric!(
    BEHIND,
    "banditflow_behind_input_partitions",
    Gauge,
    [],
    Processor,
    "Aligned input topic-partitions known to have records on the broker not yet delivered."
);
metric!(
    PAUSES,
    "banditflow_input_pauses_total",
    Counter,
    ["topic"],
    Processor,
    "Times an input topic-partition was paused to let the other topic catch up."
);
metric!(
    CONSUMER_ERRORS,
    "banditflow_consumer_errors_total",
    Counter,
    [],
    Processor,
    "Errors the consumer reported while polling."
);
metric!(SERVING_READY, "banditflow_serving_ready", Gauge, [], Serving, "1 when /readyz answers 200: every snapshot partition read to its end at start, every model covering all partitions, producer and subscriber healthy.");
metric!(
    REQUESTS,
    "banditflow_serving_requests_total",
    Counter,
    ["endpoint", "status"],
    Serving,
    "API requests by endpoint (rank, feedback) and HTTP status."
);
metric!(
    REQUEST_SECONDS,
    "banditflow_serving_request_seconds",
    Histogram(LATENCY_BUCKETS),
    ["endpoint"],
    Serving,
    "API request latency, including the Kafka acknowledgement of the logged record."
);
metric!(
    KAFKA_ACK_SECONDS,
    "banditflow_serving_kafka_ack_seconds",
    Histogram(LATENCY_BUCKETS),
    ["topic"],
    Serving,
    "From handing a logged record (impression or feedback) to the producer to Kafka's answer (its acknowledgement, an error or the produce timeout), which the request waits for: the part of the request latency that is Kafka's (linger, the broker's append and replication)."
);
metric!(
    SERVING_IMPRESSIONS,
    "banditflow_serving_impressions_total",
    Counter,
    ["model", "variant"],
    Serving,
    "Impressions ranked and logged (acknowledged by Kafka), by model and variant."
);
metric!(
    SERVING_FEEDBACK,
    "banditflow_serving_feedback_total",
    Counter,
    ["kind"],
    Serving,
    "Feedback events logged through POST /v1/feedback, by kind."
);
metric!(
    MODEL_VERSION,
    "banditflow_serving_model_version",
    Gauge,
    ["model"],
    Serving,
    "Input records the merged model has learned from (its version)."
);
metric!(
    MODEL_UPDATES,
    "banditflow_serving_model_updates_total",
    Counter,
    ["model"],
    Serving,
    "Merged models made visible to ranking."
);
metric!(
    MODEL_PARTITIONS,
    "banditflow_serving_model_partitions",
    Gauge,
    ["model"],
    Serving,
    "Partition shards merged into the model."
);
metric!(
    SNAPSHOT_PARTITIONS,
    "banditflow_serving_snapshot_partitions",
    Gauge,
    [],
    Serving,
    "Snapshot-topic partitions the subscriber follows."
);
metric!(
    MODEL_EVENT_TIME,
    "banditflow_serving_model_event_timestamp_seconds",
    Gauge,
    ["model"],
    Serving,
    "Newest learned event of the model's oldest shard: the model is as fresh as its most behind partition."
);
metric!(
    MODEL_STALENESS,
    "banditflow_serving_model_staleness_seconds",
    Gauge,
    ["model"],
    Serving,
    "Now minus banditflow_serving_model_event_timestamp_seconds, refreshed continuously."
);
metric!(
    MODEL_VISIBLE,
    "banditflow_serving_model_visible_timestamp_seconds",
    Gauge,
    ["model"],
    Serving,
    "Unix time the current merged model became visible to ranking."
);
metric!(EVENT_TO_VISIBLE, "banditflow_serving_event_to_visible_seconds", Histogram(FRESHNESS_BUCKETS), [], Serving, "A record this node logged (impression or feedback) to the moment a merged model covering it became visible to ranking (one in 16).");
metric!(LIFT, "banditflow_serving_lift_reward_per_impression", Gauge, ["model", "bound"], Serving, "Lift of treatment over holdout in reward per impression from the merged model, with its Welch 95 % interval (bound: estimate, lower, upper).");
metric!(
    PRODUCE_FAILURES,
    "banditflow_serving_produce_failures_total",
    Counter,
    ["topic"],
    Serving,
    "Records Kafka did not acknowledge (the request answered 503)."
);
metric!(
    NOT_READY,
    "banditflow_serving_not_ready_total",
    Counter,
    ["model"],
    Serving,
    "Rank requests answered 503 because no snapshot of the model was loaded."
);
metric!(
    AGGREGATE_PUBLISHED,
    "banditflow_aggregate_published_total",
    Counter,
    ["model"],
    Aggregator,
    "Merged models written to the merged-model topic by `banditflow aggregate`."
);
metric!(
    AGGREGATE_ARMS,
    "banditflow_aggregate_arms_written_total",
    Counter,
    ["model"],
    Aggregator,
    "Merged arms written to the merged-model topic (the arms whose merged value changed)."
);
metric!(
    AGGREGATE_BYTES,
    "banditflow_aggregate_bytes_written_total",
    Counter,
    [],
    Aggregator,
    "Bytes of merged heads and arm segments written to the merged-model topic."
);
metric!(
    AGGREGATE_FAILURES,
    "banditflow_aggregate_failures_total",
    Counter,
    [],
    Aggregator,
    "Aggregator sessions that failed (a transaction, the subscriber, a restore); each is rebuilt from the topics."
);
metric!(
    AGGREGATE_MODEL_VERSION,
    "banditflow_aggregate_model_version",
    Gauge,
    ["model"],
    Aggregator,
    "Version (input records learned, summed over partitions) of the newest merged model written."
);
metric!(
    MERGE_FAILURES,
    "banditflow_serving_merge_failures_total",
    Counter,
    ["model"],
    Serving,
    "Model updates whose shards did not merge (the previous model stays)."
);
metric!(
    BAD_SNAPSHOTS,
    "banditflow_serving_bad_snapshots_total",
    Counter,
    [],
    Serving,
    "Unreadable or undecodable values on the snapshot topic (the previous shard stays)."
);
metric!(
    INCOMPLETE_VALUES,
    "banditflow_serving_incomplete_values_total",
    Counter,
    [],
    Serving,
    "Chunked values on the snapshot topic that arrived incomplete (a chunk missing, a wrong length or checksum) and never will complete (the previous shard stays)."
);
metric!(
    SUBSCRIBER_RUNNING,
    "banditflow_serving_subscriber_running",
    Gauge,
    [],
    Serving,
    "1 while the snapshot subscriber thread runs; 0 once it has stopped (the node then stops being ready)."
);

/// Every family banditflow exports (process metrics come from `metrics-process`).
pub const CATALOG: &[Metric] = &[
    BUILD_INFO,
    READY,
    RECORDS,
    EVENTS,
    INVALID,
    DEAD_LETTERS,
    LAG_RECORDS,
    LAG_SECONDS,
    ASSIGNED,
    REBALANCES,
    SESSION_RESTARTS,
    RESTORES,
    PARTITION_FAILED,
    RESTORE_SECONDS,
    TRANSACTIONS,
    TRANSACTION_SECONDS,
    GATHER_SECONDS,
    SNAPSHOTS,
    SNAPSHOT_BYTES,
    SNAPSHOT_VERSION,
    SNAPSHOT_WRITTEN,
    CHANGELOG_WRITTEN,
    SNAPSHOT_SUCCESS,
    EVENT_TO_SNAPSHOT,
    BUFFERED,
    HELD,
    EVICTIONS,
    WATERMARK,
    SEGMENTS,
    COPIED,
    ARMS,
    MODEL_RESTORES,
    VARIANT_IMPRESSIONS,
    VARIANT_REWARD,
    VARIANT_REWARD_SQUARES,
    PAUSED,
    BEHIND,
    PAUSES,
    CONSUMER_ERRORS,
    AGGREGATE_PUBLISHED,
    AGGREGATE_ARMS,
    AGGREGATE_BYTES,
    AGGREGATE_FAILURES,
    AGGREGATE_MODEL_VERSION,
    SERVING_READY,
    REQUESTS,
    REQUEST_SECONDS,
    KAFKA_ACK_SECONDS,
    SERVING_IMPRESSIONS,
    SERVING_FEEDBACK,
    MODEL_VERSION,
    MODEL_UPDATES,
    MODEL_PARTITIONS,
    SNAPSHOT_PARTITIONS,
    MODEL_EVENT_TIME,
    MODEL_STALENESS,
    MODEL_VISIBLE,
    EVENT_TO_VISIBLE,
    LIFT,
    PRODUCE_FAILURES,
    NOT_READY,
    MERGE_FAILURES,
    BAD_SNAPSHOTS,
    INCOMPLETE_VALUES,
    SUBSCRIBER_RUNNING,
];

/// The process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …),
/// refreshed before every scrape.
pub struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

impl Exporter {
    /// The metrics page: process metrics refreshed, then every family rendered.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }
}

/// Installs the global recorder with every histogram's buckets, describes every family of
/// `component` (help text) and exports `banditflow_build_info`. Returns `None` when a recorder
/// was already installed (a second call in one process, as the demo and tests do).
pub fn install(component: Component) -> anyhow::Result<Option<std::sync::Arc<Exporter>>> {
    let mut builder = PrometheusBuilder::new();
    for m in CATALOG {
        if let Kind::Histogram(buckets) = m.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(m.name.to_string()), buckets)?;
        }
    }
    let handle = match builder.install_recorder() {
        Ok(h) => h,
        Err(metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    describe(component);
    let process = metrics_process::Collector::default();
    process.describe();
    metrics::gauge!(BUILD_INFO.name, "version" => env!("CARGO_PKG_VERSION"), "component" => component.name())
        .set(1.0);
    Ok(Some(std::sync::Arc::new(Exporter { handle, process })))
}

/// Help text (and unit) of every family of `component`.
fn describe(component: Component) {
    for m in CATALOG.iter().filter(|m| component.exports(m.component)) {
        let unit = if m.name.ends_with("_seconds") {
            Some(metrics::Unit::Seconds)
        } else if m.name.ends_with("_bytes") || m.name.ends_with("_bytes_total") {
            Some(metrics::Unit::Bytes)
        } else {
            None
        };
        match (m.kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram(_), Some(u)) => metrics::describe_histogram!(m.name, u, m.help),
            (Kind::Histogram(_), None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}
