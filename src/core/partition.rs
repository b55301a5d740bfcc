//! The state of one input partition: its attribution join, one model shard per configured
//! model, the input offsets it covers and its invalid-record counts. The offline replay and the
//! Kafka path both feed records through [`PartitionState::apply`], so they learn identically.

use std::collections::BTreeMap;

use super::event::{self, Encoding, Event, InvalidEvent, TopicRole};
use super::join::{AttributionJoin, Outcome};
use super::model::ModelShard;
use super::params::CoreSpec;

/// One input record as the core sees it.
#[derive(Debug, Clone, Copy)]
pub struct InputRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub role: TopicRole,
    pub encoding: Encoding,
    pub payload: &'a [u8],
    /// The Kafka record timestamp (ms), when the record has one: the reference that bounds how
    /// far ahead of it an event may be dated (`limits.max_event_time_skew`).
    pub timestamp_ms: Option<i64>,
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Event(Outcome),
    /// Not decodable or not valid: goes to the dead-letter topic with `reason`.
    Invalid(InvalidEvent),
    /// At or before an offset this state already covers (a redelivery): ignored.
    AlreadyCovered,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PartitionState {
    pub partition: i32,
    pub join: AttributionJoin,
    /// Parallel to `CoreSpec::models`.
    pub models: Vec<ModelShard>,
    /// (topic, partition) → next offset to read.
    pub offsets: BTreeMap<(String, i32), i64>,
    /// Invalid records by reason code.
    pub invalid: BTreeMap<&'static str, u64>,
    pub records: u64,
}

impl PartitionState {
    pub fn new(spec: &CoreSpec, partition: i32) -> PartitionState {
        PartitionState {
            partition,
            join: AttributionJoin::new(),
            models: spec.models.iter().map(ModelShard::new).collect(),
            offsets: BTreeMap::new(),
            invalid: BTreeMap::new(),
            records: 0,
        }
    }

    pub fn apply(&mut self, spec: &CoreSpec, record: InputRecord<'_>) -> Applied {
        // A state covers one or two (topic, partition) pairs: a scan finds the entry without
        // allocating a key per record.
        let next = record.offset.saturating_add(1);
        match self.offsets.iter_mut().find(|((t, p), _)| *p == record.partition && t == record.topic) {
            Some((_, covered)) if record.offset < *covered => return Applied::AlreadyCovered,
            Some((_, covered)) => *covered = next,
            None => {
                self.offsets.insert((record.topic.to_string(), record.partition), next);
            }
        }
        self.records += 1;
        let decoded = event::decode(record.role, record.encoding, record.payload)
            .and_then(|e| check_bounds(spec, record.timestamp_ms, e));
        let result = match decoded {
            Ok(Event::Impression(imp)) => match spec.models.iter().position(|m| m.id == imp.model_id) {
                Some(model) => Ok(self.join.process_impression(spec, &mut self.models, model, imp)),
                None => Err(InvalidEvent::UnknownModel(imp.model_id)),
            },
            Ok(Event::Feedback(fb)) => Ok(self.join.process_feedback(spec, &mut self.models, fb)),
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => Applied::Event(outcome),
            Err(reason) => {
                *self.invalid.entry(reason.code()).or_default() += 1;
                Applied::Invalid(reason)
            }
        }
    }

    pub fn invalid_total(&self) -> u64 {
        self.invalid.values().sum()
    }

    pub fn watermark_ms(&self, spec: &CoreSpec) -> Option<i64> {
        self.join.watermark_ms(spec)
    }
}

/// The bounds `decode` cannot check: id lengths and feature counts from config, and event
/// time against a reference. The reference is the record's Kafka timestamp when it has one
/// (set by the producing client or, with `LogAppendTime`, by the broker — not by the code
/// that fills in `event_time_ms`). A record without a timestamp (a hand-written recording;
/// every Kafka record has one) is not bounded: the partition's own event times are no
/// trustworthy reference, since a quiet partition may legitimately jump by hours.
/// A rejected event moves nothing: it is checked before the join sees it. Serving nodes run
/// the same check on what they log.
pub fn check_bounds(spec: &CoreSpec, timestamp_ms: Option<i64>, e: Event) -> Result<Event, InvalidEvent> {
    event::check_limits(&e, spec.limits.max_id_bytes, spec.limits.max_features)?;
    if let Some(reference_ms) = timestamp_ms.filter(|t| *t > 0) {
        let max_skew_ms = spec.limits.max_event_time_skew_ms;
        if e.time_ms() > reference_ms.saturating_add(max_skew_ms) {
            return Err(InvalidEvent::FutureEventTime { time_ms: e.time_ms(), reference_ms, max_skew_ms });
        }
    }
    Ok(e)
}
