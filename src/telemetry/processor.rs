//! Events of `banditflow run`: one struct per event, whose `emit()` writes the log line and
//! updates the metrics of [`super::CATALOG`] together.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::*;
use crate::config::Config;
use crate::core::event::{InvalidEvent, Variant};
use crate::core::partition::PartitionState;
use crate::core::reconfigure::ModelChange;

/// Outcomes of an input record (`banditflow_records_total{outcome}`).
pub const RECORD_OUTCOMES: [&str; 3] = ["applied", "invalid", "redelivered"];
const REBALANCE_KINDS: [&str; 3] = ["assign", "revoke", "error"];
const RESULTS_OK_FAILED: [&str; 2] = ["ok", "failed"];
const TRANSACTION_RESULTS: [&str; 2] = ["committed", "failed"];
const EVICTION_KINDS: [&str; 2] = ["impression", "feedback"];
/// Variant label values: named experiment arms come from the data, so they share one label.
const VARIANTS: [&str; 3] = ["treatment", "holdout", "other"];
const MODEL_CHANGES: [&str; 6] = ["unchanged", "read_time", "half_life", "reset", "added", "removed"];

fn variant_label(v: &Variant) -> &'static str {
    match v {
        Variant::Treatment => "treatment",
        Variant::Holdout => "holdout",
        Variant::Arm(_) => "other",
    }
}

/// Every label set known at start, at 0: a rate or an alert has a series before the first event.
pub struct Started<'a> {
    pub config: &'a Config,
}

impl Started<'_> {
    pub fn emit(self) {
        let c = self.config;
        for t in &c.topics {
            for o in RECORD_OUTCOMES {
                counter!(RECORDS.name, "topic" => t.name.clone(), "outcome" => o).absolute(0);
            }
            counter!(PAUSES.name, "topic" => t.name.clone()).absolute(0);
        }
        for (name, _) in crate::core::join::JoinCounters::default().rows() {
            counter!(EVENTS.name, "outcome" => name).absolute(0);
        }
        for code in InvalidEvent::CODES {
            counter!(INVALID.name, "reason" => code).absolute(0);
            counter!(DEAD_LETTERS.name, "reason" => code).absolute(0);
        }
        for k in REBALANCE_KINDS {
            counter!(REBALANCES.name, "kind" => k).absolute(0);
        }
        for r in RESULTS_OK_FAILED {
            counter!(RESTORES.name, "result" => r).absolute(0);
            for m in &c.core.models {
                counter!(SNAPSHOTS.name, "model" => m.id.clone(), "result" => r).absolute(0);
            }
        }
        for r in TRANSACTION_RESULTS {
            counter!(TRANSACTIONS.name, "result" => r).absolute(0);
        }
        for k in EVICTION_KINDS {
            counter!(EVICTIONS.name, "kind" => k).absolute(0);
        }
        for m in &c.core.models {
            for change in MODEL_CHANGES {
                counter!(MODEL_RESTORES.name, "model" => m.id.clone(), "change" => change).absolute(0);
            }
        }
        counter!(SESSION_RESTARTS.name).absolute(0);
        counter!(SNAPSHOT_WRITTEN.name).absolute(0);
        counter!(CHANGELOG_WRITTEN.name).absolute(0);
        counter!(COPIED.name).absolute(0);
        counter!(CONSUMER_ERRORS.name).absolute(0);
        gauge!(SNAPSHOT_SUCCESS.name).set(0.0);
        gauge!(ASSIGNED.name).set(0.0);
        gauge!(READY.name).set(0.0);
        gauge!(PAUSED.name).set(0.0);
        gauge!(BEHIND.name).set(0.0);
        // Histograms have no labels to initialise: their _count is 0 until the first sample.
        for h in [RESTORE_SECONDS, TRANSACTION_SECONDS, GATHER_SECONDS, EVENT_TO_SNAPSHOT] {
            let _ = histogram!(h.name);
        }
        tracing::info!(
            group = %c.kafka.group_id, instance = %c.kafka.instance_id,
            topics = ?c.topics.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            models = ?c.core.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            "processor starting"
        );
    }
}

/// The topics could not be checked (broker unreachable, a topic missing or misconfigured):
/// the processor stays up, not ready, and tries again.
pub struct StartBlocked<'a> {
    pub error: &'a anyhow::Error,
    pub retry_in: Duration,
}

impl StartBlocked<'_> {
    pub fn emit(self) {
        tracing::warn!(error = %format!("{:#}", self.error), retry_in = ?self.retry_in, "cannot start consuming yet; retrying");
    }
}

/// Whether /readyz answers 200.
pub struct Readiness {
    pub ready: bool,
}

impl Readiness {
    pub fn emit(self) {
        gauge!(READY.name).set(if self.ready { 1.0 } else { 0.0 });
    }
}

/// librdkafka's statistics for one owned input topic-partition.
pub struct ConsumerLag<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub records: i64,
    pub seconds: f64,
}

impl ConsumerLag<'_> {
    pub fn emit(self) {
        let p = self.partition.to_string();
        gauge!(LAG_RECORDS.name, "topic" => self.topic.to_string(), "partition" => p.clone())
            .set(self.records as f64);
        gauge!(LAG_SECONDS.name, "topic" => self.topic.to_string(), "partition" => p).set(self.seconds);
    }
}

/// A rebalance callback.
pub struct Rebalanced<'a> {
    pub kind: &'static str,
    pub partitions: &'a [i32],
}

impl Rebalanced<'_> {
    pub fn emit(self) {
        counter!(REBALANCES.name, "kind" => self.kind).increment(1);
        if self.kind == "error" {
            tracing::error!(partitions = ?self.partitions, "rebalance error");
        } else {
            tracing::info!(kind = self.kind, partitions = ?self.partitions, "rebalance");
        }
    }
}

/// The partitions of an assignment were restored (or not).
pub struct PartitionsRestored<'a> {
    pub partitions: &'a [(i32, u64)],
    pub failed: usize,
    pub elapsed: Duration,
}

impl PartitionsRestored<'_> {
    pub fn emit(self) {
        for (p, records) in self.partitions {
            tracing::info!(partition = p, records, "partition assigned and restored");
        }
        counter!(RESTORES.name, "result" => "ok").increment(self.partitions.len() as u64);
        counter!(RESTORES.name, "result" => "failed").increment(self.failed as u64);
        histogram!(RESTORE_SECONDS.name).record(self.elapsed.as_secs_f64());
    }
}

/// An assigned partition could not be restored: it stays assigned and paused, and is retried
/// after `retry_in` (`kafka/isolation.rs`).
pub struct PartitionFailed<'a> {
    pub partition: i32,
    pub reason: &'static str,
    pub error: &'a anyhow::Error,
    pub attempts: u32,
    pub retry_in: Duration,
}

impl PartitionFailed<'_> {
    pub fn emit(self) {
        tracing::error!(
            partition = self.partition,
            reason = self.reason,
            attempts = self.attempts,
            retry_in_s = self.retry_in.as_secs_f64(),
            error = %format!("{:#}", self.error),
            "partition failed to restore; paused, the others go on"
        );
        gauge!(PARTITION_FAILED.name, "partition" => self.partition.to_string(), "reason" => self.reason)
            .set(1.0);
    }
}

/// A failed partition was restored (or given up by a rebalance, or failed again for another
/// reason: `quiet`, no log line).
pub struct PartitionRecovered {
    pub partition: i32,
    pub reason: &'static str,
    pub quiet: bool,
}

impl PartitionRecovered {
    pub fn emit(self) {
        if !self.quiet {
            tracing::info!(partition = self.partition, reason = self.reason, "failed partition restored");
        }
        gauge!(PARTITION_FAILED.name, "partition" => self.partition.to_string(), "reason" => self.reason)
            .set(0.0);
    }
}

/// How many input partitions this instance owns now.
pub struct Assigned {
    pub partitions: usize,
}

impl Assigned {
    pub fn emit(self) {
        gauge!(ASSIGNED.name).set(self.partitions as f64);
    }
}

/// A partition left this instance: its per-partition gauges go to 0, so sums over instances
/// count it once (at its new owner).
pub struct PartitionReleased<'a> {
    pub config: &'a Config,
    pub partition: i32,
}

impl PartitionReleased<'_> {
    pub fn emit(self) {
        let p = self.partition.to_string();
        for t in &self.config.topics {
            gauge!(LAG_RECORDS.name, "topic" => t.name.clone(), "partition" => p.clone()).set(0.0);
            gauge!(LAG_SECONDS.name, "topic" => t.name.clone(), "partition" => p.clone()).set(0.0);
        }
        for g in [BUFFERED, HELD, SEGMENTS] {
            gauge!(g.name, "partition" => p.clone()).set(0.0);
        }
        for m in &self.config.core.models {
            for g in [ARMS, SNAPSHOT_BYTES, SNAPSHOT_VERSION] {
                gauge!(g.name, "model" => m.id.clone(), "partition" => p.clone()).set(0.0);
            }
            for v in VARIANTS {
                for g in [VARIANT_IMPRESSIONS, VARIANT_REWARD, VARIANT_REWARD_SQUARES] {
                    gauge!(g.name, "model" => m.id.clone(), "variant" => v, "partition" => p.clone())
                        .set(0.0);
                }
            }
        }
        tracing::info!(partition = self.partition, "partition released");
    }
}

/// The session was discarded; it is rebuilt from the snapshot topic after `wait`.
pub struct SessionRestarted<'a> {
    pub error: &'a anyhow::Error,
    pub wait: Duration,
}

impl SessionRestarted<'_> {
    pub fn emit(self) {
        counter!(SESSION_RESTARTS.name).increment(1);
        tracing::warn!(error = %format!("{:#}", self.error), wait = ?self.wait, "restarting the session from the last committed snapshots");
    }
}

/// The consumer reported an error while polling.
pub struct ConsumerError<'a> {
    pub error: &'a rdkafka::error::KafkaError,
}

impl ConsumerError<'_> {
    pub fn emit(self) {
        counter!(CONSUMER_ERRORS.name).increment(1);
        tracing::warn!(error = %self.error, "consumer error");
    }
}

/// A model restored under a configuration that may differ from the one it was written with.
pub struct ModelRestored<'a> {
    pub partition: i32,
    pub model: &'a str,
    pub change: &'a ModelChange,
}

impl ModelRestored<'_> {
    pub fn emit(self) {
        let (model, partition) = (self.model, self.partition);
        counter!(MODEL_RESTORES.name, "model" => model.to_string(), "change" => self.change.code())
            .increment(1);
        match self.change {
            ModelChange::Kept { read_time } if read_time.is_empty() => {}
            ModelChange::Kept { read_time } => tracing::info!(
                model, partition, fields = ?read_time,
                "configuration change applies at once (read-time parameters)"
            ),
            ModelChange::HalfLifeChanged { from_ms, to_ms } => tracing::warn!(
                model, partition, from_ms, to_ms,
                "half-life changed: learned statistics keep their current value and decay with the new half-life"
            ),
            ModelChange::Reset { field } => tracing::warn!(
                model, partition, field = field.as_str(),
                "`{field}` changed what this model's statistics mean: the model starts afresh on this partition"
            ),
            ModelChange::Added => tracing::info!(model, partition, "model added: starts empty"),
            ModelChange::Removed => tracing::warn!(
                model,
                partition,
                "model no longer configured: its statistics and buffered impressions are dropped"
            ),
        }
    }
}

/// What a partition task reports at each commit: its counters since the last report (as
/// increments) and its current state (as gauges). One per task, holding what was reported.
pub struct PartitionMeter {
    partition: String,
    counters: crate::core::join::JoinCounters,
    invalid: std::collections::BTreeMap<&'static str, u64>,
    copied: u64,
    /// Per input topic: records applied, invalid, redelivered since the last report.
    pub records: Vec<[u64; 3]>,
}

impl PartitionMeter {
    pub fn new(state: &PartitionState, topics: usize) -> PartitionMeter {
        PartitionMeter {
            partition: state.partition.to_string(),
            counters: state.join.counters.clone(),
            invalid: state.invalid.clone(),
            copied: state.join.buffer.copied,
            records: vec![[0; 3]; topics],
        }
    }

    /// Emits what changed since the last report.
    pub fn report(&mut self, config: &Config, state: &PartitionState) {
        let spec = &config.core;
        for ((name, now), (_, before)) in state.join.counters.rows().iter().zip(self.counters.rows()) {
            if *now > before {
                counter!(EVENTS.name, "outcome" => *name).increment(now - before);
            }
        }
        let (evicted_imp, evicted_fb) = (
            state.join.counters.impressions_evicted.saturating_sub(self.counters.impressions_evicted),
            state.join.counters.feedback_evicted.saturating_sub(self.counters.feedback_evicted),
        );
        if evicted_imp > 0 {
            counter!(EVICTIONS.name, "kind" => "impression").increment(evicted_imp);
        }
        if evicted_fb > 0 {
            counter!(EVICTIONS.name, "kind" => "feedback").increment(evicted_fb);
        }
        for (code, n) in &state.invalid {
            let before = self.invalid.get(code).copied().unwrap_or(0);
            if *n > before {
                counter!(INVALID.name, "reason" => *code).increment(n - before);
            }
        }
        self.counters = state.join.counters.clone();
        self.invalid = state.invalid.clone();
        for (t, counts) in config.topics.iter().zip(self.records.iter_mut()) {
            for (outcome, n) in RECORD_OUTCOMES.iter().zip(counts.iter_mut()) {
                if *n > 0 {
                    counter!(RECORDS.name, "topic" => t.name.clone(), "outcome" => *outcome).increment(*n);
                    *n = 0;
                }
            }
        }
        let p = &self.partition;
        gauge!(BUFFERED.name, "partition" => p.clone()).set(state.join.buffered_impressions() as f64);
        gauge!(HELD.name, "partition" => p.clone()).set(state.join.pending_feedback() as f64);
        gauge!(SEGMENTS.name, "partition" => p.clone()).set(state.join.buffer.segments.len() as f64);
        let copied = state.join.buffer.copied;
        counter!(COPIED.name).increment(copied.saturating_sub(self.copied));
        self.copied = copied;
        if let Some(wm) = state.watermark_ms(spec) {
            gauge!(WATERMARK.name, "partition" => p.clone()).set(wm as f64 / 1e3);
        }
        for (m, shard) in spec.models.iter().zip(&state.models) {
            gauge!(ARMS.name, "model" => m.id.clone(), "partition" => p.clone())
                .set(shard.arm_count() as f64);
            // Named arms share the label "other": their sums add up.
            let mut sums = [(0u64, 0f64, 0f64); 3];
            for (v, s) in &shard.variants {
                let i = VARIANTS.iter().position(|l| *l == variant_label(v)).unwrap_or(2);
                sums[i].0 += s.impressions;
                sums[i].1 += s.reward_micros as f64 / 1e6;
                sums[i].2 += s.reward_sq_micros2 as f64 / 1e12;
            }
            for (v, (n, r, q)) in VARIANTS.iter().zip(sums) {
                let labels = [("model", m.id.clone()), ("variant", v.to_string()), ("partition", p.clone())];
                gauge!(VARIANT_IMPRESSIONS.name, &labels).set(n as f64);
                gauge!(VARIANT_REWARD.name, &labels).set(r);
                gauge!(VARIANT_REWARD_SQUARES.name, &labels).set(q);
            }
        }
    }
}

/// A shard snapshot written in a transaction.
pub struct PublishedShard<'a> {
    pub model: &'a str,
    pub partition: i32,
    pub bytes: usize,
    /// Input records the shard covers.
    pub version: u64,
}

/// A transaction committed.
pub struct TransactionCommitted<'a> {
    pub elapsed: Duration,
    /// Bytes written to the snapshot topic.
    pub bytes: usize,
    /// Bytes written to the changelog topic.
    pub changelog_bytes: usize,
    pub shards: &'a [PublishedShard<'a>],
    pub dead_letters: &'a [&'static str],
    /// Timestamps (ms) of sampled records the transaction covers, and the commit time (ms).
    pub record_timestamps: &'a [i64],
    pub now_ms: i64,
}

impl TransactionCommitted<'_> {
    pub fn emit(self) {
        counter!(TRANSACTIONS.name, "result" => "committed").increment(1);
        histogram!(TRANSACTION_SECONDS.name).record(self.elapsed.as_secs_f64());
        counter!(SNAPSHOT_WRITTEN.name).increment(self.bytes as u64);
        counter!(CHANGELOG_WRITTEN.name).increment(self.changelog_bytes as u64);
        gauge!(SNAPSHOT_SUCCESS.name).set(self.now_ms as f64 / 1e3);
        for s in self.shards {
            let (m, p) = (s.model.to_string(), s.partition.to_string());
            counter!(SNAPSHOTS.name, "model" => m.clone(), "result" => "ok").increment(1);
            gauge!(SNAPSHOT_BYTES.name, "model" => m.clone(), "partition" => p.clone()).set(s.bytes as f64);
            gauge!(SNAPSHOT_VERSION.name, "model" => m, "partition" => p).set(s.version as f64);
        }
        for reason in self.dead_letters {
            counter!(DEAD_LETTERS.name, "reason" => *reason).increment(1);
        }
        let fresh = histogram!(EVENT_TO_SNAPSHOT.name);
        for ts in self.record_timestamps {
            fresh.record((self.now_ms - ts).max(0) as f64 / 1e3);
        }
        tracing::debug!(
            elapsed = ?self.elapsed, bytes = self.bytes, shards = self.shards.len(),
            dead_letters = self.dead_letters.len(), "transaction committed"
        );
    }
}

/// A transaction failed: the session is rebuilt from what was committed.
pub struct TransactionFailed<'a> {
    pub error: &'a anyhow::Error,
    pub models: &'a [&'a str],
}

impl TransactionFailed<'_> {
    pub fn emit(self) {
        counter!(TRANSACTIONS.name, "result" => "failed").increment(1);
        for m in self.models {
            counter!(SNAPSHOTS.name, "model" => m.to_string(), "result" => "failed").increment(1);
        }
        tracing::error!(error = %format!("{:#}", self.error), "transaction failed");
    }
}

/// The tasks reported for a commit.
pub struct Gathered {
    pub elapsed: Duration,
}

impl Gathered {
    pub fn emit(self) {
        histogram!(GATHER_SECONDS.name).record(self.elapsed.as_secs_f64());
    }
}

/// Aligned inputs: how many are paused and how many are behind.
pub struct InputsAligned {
    pub paused: usize,
    pub behind: usize,
}

impl InputsAligned {
    pub fn emit(self) {
        gauge!(PAUSED.name).set(self.paused as f64);
        gauge!(BEHIND.name).set(self.behind as f64);
    }
}

/// An input topic-partition was paused (or resumed) for alignment.
pub struct InputPaused<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub paused: bool,
}

impl InputPaused<'_> {
    pub fn emit(self) {
        if self.paused {
            counter!(PAUSES.name, "topic" => self.topic.to_string()).increment(1);
            tracing::debug!(
                topic = %self.topic, partition = self.partition,
                "paused: the partition task waits for another topic that is behind"
            );
        } else {
            tracing::debug!(topic = %self.topic, partition = self.partition, "resumed");
        }
    }
}

/// `banditflow aggregate` wrote merged models in one transaction.
pub struct MergedPublished<'a> {
    /// (model, version, arms written, bytes written) per model; a removed model has version 0.
    pub models: &'a [(&'a str, u64, usize, usize)],
    pub elapsed: Duration,
}

impl MergedPublished<'_> {
    pub fn emit(self) {
        let mut bytes = 0;
        for (model, version, arms, b) in self.models {
            counter!(AGGREGATE_PUBLISHED.name, "model" => model.to_string()).increment(1);
            counter!(AGGREGATE_ARMS.name, "model" => model.to_string()).increment(*arms as u64);
            gauge!(AGGREGATE_MODEL_VERSION.name, "model" => model.to_string()).set(*version as f64);
            bytes += b;
            tracing::debug!(model, version, arms, bytes = b, "merged model written");
        }
        counter!(AGGREGATE_BYTES.name).increment(bytes as u64);
        tracing::debug!(
            models = self.models.len(),
            bytes,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "merged models committed"
        );
    }
}

/// The aggregator started: its failure and byte counters exist from then on (a rate over them
/// reads 0, not nothing, until the first failure or write).
pub struct AggregatorStarted;

impl AggregatorStarted {
    pub fn emit(self) {
        counter!(AGGREGATE_FAILURES.name).absolute(0);
        counter!(AGGREGATE_BYTES.name).absolute(0);
    }
}

/// An aggregator session failed; the next one is rebuilt from the topics.
pub struct AggregateFailed<'a> {
    pub error: &'a anyhow::Error,
}

impl AggregateFailed<'_> {
    pub fn emit(self) {
        counter!(AGGREGATE_FAILURES.name).increment(1);
        tracing::error!(error = %format!("{:#}", self.error), "aggregator session failed; starting again from the topics");
    }
}
