//! Saving and restoring a whole partition: the [`PartitionState`] becomes one
//! `PartitionCheckpoint` (attribution buffer, counters, offsets) plus one `ModelSnapshot` per
//! model, all of the same version; restoring needs all of them and checks they agree.
//!
//! `restore(save(state)) == state` exactly (tested), so a partition that moves to another
//! instance, or a process that restarts, continues as if nothing happened.

use std::collections::BTreeMap;

use prost::Message;
use xxhash_rust::xxh3::xxh3_64;

use super::event::{self, Feedback, FeedbackKind, InvalidEvent};
use super::join::{AttributionJoin, Entry, JoinCounters};
use super::params::CoreSpec;
use super::partition::PartitionState;
use super::pb;
use super::snapshot::{self, DecodedSnapshot, SnapshotError, SnapshotMeta};

pub const FORMAT_VERSION: u32 = 1;

/// The encoded parts of a saved partition.
#[derive(Debug, Clone)]
pub struct SavedPartition {
    pub checkpoint: Vec<u8>,
    /// (model id, encoded ModelSnapshot), in configuration order.
    pub models: Vec<(String, Vec<u8>)>,
}

fn invalid(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(msg.into())
}

pub fn shard_meta(spec: &CoreSpec, state: &PartitionState, model_id: &str) -> SnapshotMeta {
    SnapshotMeta {
        model_id: model_id.to_string(),
        source_partition: state.partition,
        version: state.records,
        watermark_ms: state.watermark_ms(spec).unwrap_or(0),
        input_offsets: state.offsets.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect(),
    }
}

fn counters_from(rows: &[pb::Counter]) -> Result<JoinCounters, SnapshotError> {
    let mut c = JoinCounters::default();
    let mut named: BTreeMap<&str, u64> = rows.iter().map(|r| (r.name.as_str(), r.value)).collect();
    let mut take = |name: &str| named.remove(name).unwrap_or(0);
    c.impressions_learned = take("impressions_learned");
    c.impressions_duplicate = take("impressions_duplicate");
    c.impressions_opted_out = take("impressions_opted_out");
    c.impressions_evicted = take("impressions_evicted");
    c.impressions_expired = take("impressions_expired");
    c.feedback_attributed = take("feedback_attributed");
    c.feedback_late_learned = take("feedback_late_learned");
    c.feedback_late_ignored = take("feedback_late_ignored");
    c.feedback_duplicate = take("feedback_duplicate");
    c.feedback_held = take("feedback_held");
    c.feedback_orphaned = take("feedback_orphaned");
    c.feedback_evicted = take("feedback_evicted");
    c.feedback_opted_out = take("feedback_opted_out");
    c.feedback_not_in_slate = take("feedback_not_in_slate");
    match named.keys().next() {
        Some(unknown) => Err(invalid(format!("unknown join counter `{unknown}`"))),
        None => Ok(c),
    }
}

fn kind_code(k: FeedbackKind) -> u32 {
    k.index() as u32
}

pub fn save(spec: &CoreSpec, state: &PartitionState) -> SavedPartition {
    let mut impressions: Vec<pb::BufferedImpression> = state
        .join
        .impressions
        .iter()
        .map(|(id, e)| {
            // Kept in attribution order (itself deterministic), so a restore is exact.
            let seen: Vec<u32> = e.seen.iter().map(|(i, k)| u32::from(*i) * 8 + kind_code(*k)).collect();
            pb::BufferedImpression {
                impression_id: id.clone(),
                event_time_ms: e.time_ms,
                model_id: spec.models.get(e.model).map(|m| m.id.clone()).unwrap_or_default(),
                variant: Some(snapshot::variant_to_pb(&e.variant)),
                segment: e.segment.clone(),
                features: e
                    .features
                    .iter()
                    .map(|(n, v)| pb::Feature { name: n.clone(), value: *v })
                    .collect(),
                slate: e
                    .slate
                    .iter()
                    .map(|(item, pos, p)| pb::SlateItem {
                        item_id: item.clone(),
                        position: *pos,
                        propensity: *p,
                        score: 0.0,
                    })
                    .collect(),
                opted_out: e.opted_out,
                total_reward_micros: e.total_reward_micros,
                seen,
                last_feedback_position: e.last_feedback_position,
            }
        })
        .collect();
    impressions.sort_by(|a, b| a.impression_id.cmp(&b.impression_id));
    let mut held: Vec<pb::HeldFeedback> = state
        .join
        .pending
        .values()
        .flatten()
        .map(|(seq, f)| pb::HeldFeedback { sequence: *seq, feedback: Some(event::feedback_to_pb(f)) })
        .collect();
    held.sort_by_key(|h| h.sequence);
    let mut cp = pb::PartitionCheckpoint {
        format_version: FORMAT_VERSION,
        partition: state.partition,
        records: state.records,
        input_offsets: state
            .offsets
            .iter()
            .map(|((t, p), o)| pb::InputOffset { topic: t.clone(), partition: *p, next_offset: *o })
            .collect(),
        max_event_time_ms: state.join.max_event_time_ms,
        next_sequence: state.join.next_seq,
        impressions,
        held,
        join_counters: state
            .join
            .counters
            .rows()
            .iter()
            .map(|(n, v)| pb::Counter { name: (*n).into(), value: *v })
            .collect(),
        invalid_counts: state
            .invalid
            .iter()
            .map(|(n, v)| pb::Counter { name: (*n).into(), value: *v })
            .collect(),
        models: spec.models.iter().map(|m| m.id.clone()).collect(),
        checksum: 0,
    };
    cp.checksum = xxh3_64(&cp.encode_to_vec());
    let models = spec
        .models
        .iter()
        .zip(&state.models)
        .map(|(m, shard)| (m.id.clone(), snapshot::encode(m, shard, &shard_meta(spec, state, &m.id))))
        .collect();
    SavedPartition { checkpoint: cp.encode_to_vec(), models }
}

/// Rebuilds a partition from its checkpoint and the model snapshots of the same version.
/// Models configured now but absent from the checkpoint start empty; a model in the checkpoint
/// that is no longer configured is an error (its statistics would silently vanish).
pub fn restore(
    spec: &CoreSpec,
    checkpoint: &[u8],
    models: &[DecodedSnapshot],
) -> Result<PartitionState, SnapshotError> {
    let mut cp =
        pb::PartitionCheckpoint::decode(checkpoint).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if cp.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: cp.format_version });
    }
    let stored = cp.checksum;
    cp.checksum = 0;
    let computed = xxh3_64(&cp.encode_to_vec());
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let mut state = PartitionState::new(spec, cp.partition);
    state.records = cp.records;
    for o in &cp.input_offsets {
        state.offsets.insert((o.topic.clone(), o.partition), o.next_offset);
    }
    for id in &cp.models {
        if spec.model(id).is_none() {
            return Err(invalid(format!("checkpoint holds model `{id}`, which is not configured any more")));
        }
    }
    for (i, m) in spec.models.iter().enumerate() {
        let found = models.iter().find(|s| s.meta.model_id == m.id);
        match found {
            Some(s) => {
                if s.meta.version != cp.records || s.meta.source_partition != cp.partition {
                    return Err(invalid(format!(
                        "model `{}` snapshot is version {} of partition {}, checkpoint is version {} of partition {}",
                        m.id, s.meta.version, s.meta.source_partition, cp.records, cp.partition
                    )));
                }
                if s.spec != *m {
                    return Err(invalid(format!(
                        "model `{}` was learned with other parameters than configured now",
                        m.id
                    )));
                }
                state.models[i] = s.shard.clone();
            }
            None if cp.models.contains(&m.id) => {
                return Err(invalid(format!(
                    "model `{}` snapshot of version {} is missing",
                    m.id, cp.records
                )))
            }
            None => {}
        }
    }
    let mut join = AttributionJoin::new();
    join.max_event_time_ms = cp.max_event_time_ms;
    join.next_seq = cp.next_sequence;
    join.counters = counters_from(&cp.join_counters)?;
    for b in cp.impressions {
        let model =
            spec.models.iter().position(|m| m.id == b.model_id).ok_or_else(|| {
                invalid(format!("buffered impression of unconfigured model `{}`", b.model_id))
            })?;
        let mut seen = Vec::with_capacity(b.seen.len());
        for code in &b.seen {
            let kind = FeedbackKind::ALL
                .get((code % 8) as usize)
                .ok_or_else(|| invalid("bad feedback kind in checkpoint"))?;
            let idx = u16::try_from(code / 8).map_err(|_| invalid("bad slate index in checkpoint"))?;
            seen.push((idx, *kind));
        }
        let entry = Entry {
            time_ms: b.event_time_ms,
            model,
            variant: snapshot::variant_from_pb(b.variant.as_ref())?,
            segment: b.segment,
            features: b.features.into_iter().map(|f| (f.name, f.value)).collect(),
            slate: b.slate.into_iter().map(|s| (s.item_id, s.position, s.propensity)).collect(),
            opted_out: b.opted_out,
            total_reward_micros: b.total_reward_micros,
            seen,
            last_feedback_position: b.last_feedback_position,
        };
        join.impression_order.insert((entry.time_ms, b.impression_id.clone()));
        join.impressions.insert(b.impression_id, entry);
    }
    for h in cp.held {
        let f = h.feedback.ok_or_else(|| invalid("held feedback without body"))?;
        let kind = FeedbackKind::ALL
            .into_iter()
            .find(|k| k.to_pb() as i32 == f.kind)
            .ok_or_else(|| invalid("held feedback of unknown kind"))?;
        let fb = Feedback {
            impression_id: f.impression_id,
            item_id: f.item_id,
            position: f.position,
            kind,
            value: f.value,
            time_ms: f.event_time_ms,
        };
        join.pending_order.insert((fb.time_ms, fb.impression_id.clone(), h.sequence));
        join.pending.entry(fb.impression_id.clone()).or_default().push((h.sequence, fb));
    }
    state.join = join;
    for c in cp.invalid_counts {
        let code = InvalidEvent::code_named(&c.name)
            .ok_or_else(|| invalid(format!("unknown invalid reason `{}`", c.name)))?;
        state.invalid.insert(code, c.value);
    }
    Ok(state)
}
