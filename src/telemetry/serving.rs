//! Events of `banditflow serve`: one struct per event, whose `emit()` writes the log line and
//! updates the metrics of [`super::CATALOG`] together.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::*;
use crate::config::Config;
use crate::core::event::FeedbackKind;

/// Statuses the API answers (`banditflow_serving_requests_total{status}`).
pub const STATUSES: [u16; 9] = [200, 202, 400, 404, 405, 413, 415, 422, 503];
pub const ENDPOINTS: [&str; 2] = ["rank", "feedback"];
const BOUNDS: [&str; 3] = ["estimate", "lower", "upper"];

/// Every label set known at start, at 0.
pub struct Started<'a> {
    pub config: &'a Config,
    pub topics: &'a [&'a str],
}

impl Started<'_> {
    pub fn emit(self) {
        for e in ENDPOINTS {
            for s in STATUSES {
                counter!(REQUESTS.name, "endpoint" => e, "status" => s.to_string()).absolute(0);
            }
            let _ = histogram!(REQUEST_SECONDS.name, "endpoint" => e);
        }
        for m in &self.config.core.models {
            for v in ["treatment", "holdout"] {
                counter!(SERVING_IMPRESSIONS.name, "model" => m.id.clone(), "variant" => v).absolute(0);
            }
            counter!(MODEL_UPDATES.name, "model" => m.id.clone()).absolute(0);
            counter!(NOT_READY.name, "model" => m.id.clone()).absolute(0);
            counter!(MERGE_FAILURES.name, "model" => m.id.clone()).absolute(0);
        }
        for k in FeedbackKind::ALL {
            counter!(SERVING_FEEDBACK.name, "kind" => k.as_str()).absolute(0);
        }
        for t in self.topics {
            counter!(PRODUCE_FAILURES.name, "topic" => t.to_string()).absolute(0);
            let _ = histogram!(KAFKA_ACK_SECONDS.name, "topic" => t.to_string());
        }
        counter!(BAD_SNAPSHOTS.name).absolute(0);
        counter!(INCOMPLETE_VALUES.name).absolute(0);
        gauge!(SUBSCRIBER_RUNNING.name).set(1.0);
        gauge!(SERVING_READY.name).set(0.0);
        gauge!(SNAPSHOT_PARTITIONS.name).set(0.0);
        let _ = histogram!(EVENT_TO_VISIBLE.name);
        tracing::info!(
            address = %self.config.serving.listen, snapshot_topic = %self.config.kafka.snapshot_topic,
            "serving"
        );
    }
}

/// One API request answered.
pub struct RequestServed {
    pub endpoint: &'static str,
    pub status: u16,
    pub elapsed: Duration,
}

impl RequestServed {
    pub fn emit(self) {
        histogram!(REQUEST_SECONDS.name, "endpoint" => self.endpoint).record(self.elapsed.as_secs_f64());
        counter!(REQUESTS.name, "endpoint" => self.endpoint, "status" => self.status.to_string())
            .increment(1);
        if self.status >= 500 {
            tracing::debug!(endpoint = self.endpoint, status = self.status, "request failed");
        }
    }
}

/// An impression was ranked and acknowledged by Kafka.
pub struct ImpressionLogged<'a> {
    pub model: &'a str,
    pub variant: &'a str,
}

impl ImpressionLogged<'_> {
    pub fn emit(self) {
        counter!(SERVING_IMPRESSIONS.name, "model" => self.model.to_string(), "variant" => self.variant.to_string())
            .increment(1);
    }
}

/// A feedback event was acknowledged by Kafka.
pub struct FeedbackLogged {
    pub kind: FeedbackKind,
}

impl FeedbackLogged {
    pub fn emit(self) {
        counter!(SERVING_FEEDBACK.name, "kind" => self.kind.as_str()).increment(1);
    }
}

/// Kafka did not acknowledge a record: the request is answered 503.
pub struct ProduceFailed<'a> {
    pub topic: &'a str,
    pub error: &'a str,
}

impl ProduceFailed<'_> {
    pub fn emit(self) {
        counter!(PRODUCE_FAILURES.name, "topic" => self.topic.to_string()).increment(1);
        tracing::warn!(topic = self.topic, error = self.error, "record not acknowledged by Kafka");
    }
}

/// Kafka answered a record this node logged: acknowledged it, failed it, or the produce timeout
/// ran out.
pub struct KafkaAnswered<'a> {
    pub topic: &'a str,
    pub elapsed: Duration,
}

impl KafkaAnswered<'_> {
    pub fn emit(self) {
        histogram!(KAFKA_ACK_SECONDS.name, "topic" => self.topic.to_string())
            .record(self.elapsed.as_secs_f64());
    }
}

/// A rank request for a model with no snapshot loaded.
pub struct ModelNotLoaded<'a> {
    pub model: &'a str,
}

impl ModelNotLoaded<'_> {
    pub fn emit(self) {
        counter!(NOT_READY.name, "model" => self.model.to_string()).increment(1);
    }
}

/// A merged model became visible to ranking.
pub struct ModelUpdated<'a> {
    pub model: &'a str,
    pub version: u64,
    pub partitions: usize,
    /// Newest learned event of the oldest shard (ms; 0: none yet).
    pub event_ms: i64,
    pub visible_ms: i64,
    /// (estimate, lower, upper) of the lift over holdout, when both variants have data.
    pub lift: Option<(f64, f64, f64)>,
}

impl ModelUpdated<'_> {
    pub fn emit(self) {
        let m = self.model.to_string();
        gauge!(MODEL_VERSION.name, "model" => m.clone()).set(self.version as f64);
        gauge!(MODEL_PARTITIONS.name, "model" => m.clone()).set(self.partitions as f64);
        gauge!(MODEL_EVENT_TIME.name, "model" => m.clone()).set(self.event_ms as f64 / 1e3);
        gauge!(MODEL_VISIBLE.name, "model" => m.clone()).set(self.visible_ms as f64 / 1e3);
        counter!(MODEL_UPDATES.name, "model" => m.clone()).increment(1);
        if let Some((e, lo, hi)) = self.lift {
            for (b, v) in BOUNDS.iter().zip([e, lo, hi]) {
                gauge!(LIFT.name, "model" => m.clone(), "bound" => *b).set(v);
            }
        }
        tracing::debug!(
            model = self.model,
            version = self.version,
            partitions = self.partitions,
            "model updated"
        );
    }
}

/// How old a model's slowest partition is, refreshed while the node runs.
pub struct ModelStaleness<'a> {
    pub model: &'a str,
    pub seconds: f64,
}

impl ModelStaleness<'_> {
    pub fn emit(self) {
        gauge!(MODEL_STALENESS.name, "model" => self.model.to_string()).set(self.seconds);
    }
}

/// Records this node logged became visible to ranking (freshness samples, seconds).
pub struct RecordsVisible<'a> {
    pub seconds: &'a [f64],
}

impl RecordsVisible<'_> {
    pub fn emit(self) {
        let h = histogram!(EVENT_TO_VISIBLE.name);
        for s in self.seconds {
            h.record(*s);
        }
    }
}

/// The shards of a model did not merge; the previous model stays.
pub struct MergeFailed<'a> {
    pub model: &'a str,
    pub error: &'a dyn std::fmt::Display,
}

impl MergeFailed<'_> {
    pub fn emit(self) {
        counter!(MERGE_FAILURES.name, "model" => self.model.to_string()).increment(1);
        tracing::warn!(model = self.model, error = %self.error, "shards do not merge yet; keeping the previous model");
    }
}

/// An unreadable value on the snapshot topic; the previous shard stays.
pub struct BadSnapshot<'a> {
    pub key: &'a str,
    pub error: &'a dyn std::fmt::Display,
}

impl BadSnapshot<'_> {
    pub fn emit(self) {
        counter!(BAD_SNAPSHOTS.name).increment(1);
        tracing::error!(key = self.key, error = %self.error, "unreadable value on the snapshot topic; keeping the previous one");
    }
}

/// A chunked value arrived incomplete and never will complete; the previous shard stays.
pub struct IncompleteValue<'a> {
    pub key: &'a str,
    pub error: &'a dyn std::fmt::Display,
}

impl IncompleteValue<'_> {
    pub fn emit(self) {
        counter!(INCOMPLETE_VALUES.name).increment(1);
        tracing::error!(key = self.key, error = %self.error, "incomplete value on the snapshot topic (it cannot complete); keeping the previous shard");
    }
}

/// Whether the snapshot subscriber thread runs.
pub struct SubscriberRunning {
    pub running: bool,
}

impl SubscriberRunning {
    pub fn emit(self) {
        gauge!(SUBSCRIBER_RUNNING.name).set(if self.running { 1.0 } else { 0.0 });
        if !self.running {
            tracing::error!("the snapshot subscriber stopped: the node no longer follows model updates");
        }
    }
}

/// The subscriber follows this many snapshot-topic partitions.
pub struct SnapshotPartitions {
    pub count: usize,
}

impl SnapshotPartitions {
    pub fn emit(self) {
        gauge!(SNAPSHOT_PARTITIONS.name).set(self.count as f64);
    }
}

/// Whether /readyz answers 200; logged when it changes.
pub struct ServingReadiness<'a> {
    pub ready: bool,
    pub reason: &'a str,
    /// Whether it was ready before (None: the first report).
    pub was_ready: Option<bool>,
}

impl ServingReadiness<'_> {
    pub fn emit(self) {
        gauge!(SERVING_READY.name).set(if self.ready { 1.0 } else { 0.0 });
        if self.ready {
            tracing::info!("ready: every snapshot partition read and every model complete");
        } else if self.was_ready == Some(true) {
            tracing::warn!(reason = self.reason, "no longer ready");
        } else {
            tracing::info!(reason = self.reason, "not ready yet");
        }
    }
}
