//! The state of one input partition: its attribution join, one model shard per configured
//! model, the input offsets it covers and its invalid-record counts. The offline replay and the
//! Kafka path both feed records through [`PartitionState::apply`], so they learn identically.

use std::collections::BTreeMap;

use super::event::{self, Encoding, EventView, InvalidEvent, TopicRole};
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
    /// The input topics feeding the partition, each with its own event-time clock: the join's
    /// watermark advances to the oldest of the newest event times of the inputs that are not
    /// idle (Flink's two-input operators), so one topic read far ahead of the other cannot
    /// expire the records the other still brings. With one input it is that input's newest
    /// event time. Declared by the edge ([`PartitionState::declare_inputs`]); an undeclared
    /// topic is added on its first valid record.
    pub inputs: Vec<InputClock>,
}

/// One input topic's event-time clock in a partition.
#[derive(Debug, Clone)]
pub struct InputClock {
    pub topic: String,
    /// The newest event time of the input's valid records (stored in the checkpoint).
    pub newest_ms: Option<i64>,
    /// The edge found the input idle (nothing queued, nothing known on the broker, for
    /// `kafka.max_idle`): it does not hold the watermark back until its next record. The
    /// edge's view of the moment, not state: not stored, and not compared.
    pub idle: bool,
}

impl PartialEq for InputClock {
    fn eq(&self, o: &InputClock) -> bool {
        self.topic == o.topic && self.newest_ms == o.newest_ms
    }
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
            inputs: Vec::new(),
        }
    }

    /// Declares the input topics (configuration order), so that an input that has delivered
    /// nothing yet holds the watermark back. Clocks of topics still declared are kept; those of
    /// topics no longer configured (restored from a checkpoint) are dropped, since nothing
    /// would ever move or idle them.
    pub fn declare_inputs<'a>(&mut self, topics: impl IntoIterator<Item = &'a str>) {
        let topics: Vec<&str> = topics.into_iter().collect();
        self.inputs.retain(|c| topics.contains(&c.topic.as_str()));
        for t in topics {
            if !self.inputs.iter().any(|c| c.topic == t) {
                self.inputs.push(InputClock { topic: t.to_string(), newest_ms: None, idle: false });
            }
        }
    }

    /// The edge's view of whether `topic` is idle (see [`InputClock::idle`]). Marking an input
    /// idle may let the watermark advance to the other inputs' clocks; the expiry it allows
    /// happens with the next record.
    pub fn set_idle(&mut self, topic: &str, idle: bool) {
        if let Some(c) = self.inputs.iter_mut().find(|c| c.topic == topic) {
            c.idle = idle;
        }
        if idle {
            if let Some(t) = self.watermark_clock() {
                self.join.advance(t);
            }
        }
    }

    /// Records an event time of `topic` and returns where the watermark's clock may advance
    /// to: the oldest newest time over the inputs not idle, none while one of them has no time.
    fn tick(&mut self, topic: &str, t: i64) -> Option<i64> {
        match self.inputs.iter_mut().find(|c| c.topic == topic) {
            Some(c) => {
                c.newest_ms = Some(c.newest_ms.map_or(t, |n| n.max(t)));
                c.idle = false;
            }
            None => {
                self.inputs.push(InputClock { topic: topic.to_string(), newest_ms: Some(t), idle: false })
            }
        }
        self.watermark_clock()
    }

    fn watermark_clock(&self) -> Option<i64> {
        let mut oldest: Option<i64> = None;
        for c in self.inputs.iter().filter(|c| !c.idle) {
            let n = c.newest_ms?;
            oldest = Some(oldest.map_or(n, |o| o.min(n)));
        }
        oldest
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
        // Protobuf records decode in place (no string copied); the rest, and what that reader
        // leaves to prost, through the owned decoder. Both give the same event or error.
        let result = event::with_view(record.role, record.encoding, record.payload, |decoded| match decoded
            .and_then(|e| check_bounds(spec, record.timestamp_ms, e))?
        {
            EventView::Impression(imp) => match spec.models.iter().position(|m| m.id == imp.model_id) {
                Some(model) => {
                    if let Some(t) = self.tick(record.topic, imp.time_ms) {
                        self.join.advance(t);
                    }
                    Ok(self.join.impression(spec, &mut self.models, model, &imp))
                }
                None => Err(InvalidEvent::UnknownModel(imp.model_id.to_string())),
            },
            EventView::Feedback(fb) => {
                if let Some(t) = self.tick(record.topic, fb.time_ms) {
                    self.join.advance(t);
                }
                Ok(self.join.feedback(spec, &mut self.models, &fb))
            }
        });
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
pub fn check_bounds<'a>(
    spec: &CoreSpec,
    timestamp_ms: Option<i64>,
    e: EventView<'a>,
) -> Result<EventView<'a>, InvalidEvent> {
    event::check_limits(&e, spec.limits.max_id_bytes, spec.limits.max_features)?;
    if let Some(reference_ms) = timestamp_ms.filter(|t| *t > 0) {
        let max_skew_ms = spec.limits.max_event_time_skew_ms;
        if e.time_ms() > reference_ms.saturating_add(max_skew_ms) {
            return Err(InvalidEvent::FutureEventTime { time_ms: e.time_ms(), reference_ms, max_skew_ms });
        }
    }
    Ok(e)
}
