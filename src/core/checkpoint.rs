//! Saving and restoring a whole partition. The [`PartitionState`] is stored as records of the
//! snapshot topic, all written in one transaction per version:
//!
//! - `checkpoint/<p>`: a `PartitionCheckpoint` header (offsets, counters, watermark input);
//! - `imp/<p>/<impression id>`: one `BufferedImpression` per buffered impression;
//! - `held/<p>/<sequence>`: one `HeldFeedback` per feedback waiting for its impression;
//! - `model/<model>/<p>`: one `ModelSnapshot` per model.
//!
//! Only the buffer entries that changed since the previous save are written (deleted ones get
//! tombstones), like a changelog, so the cost of a save follows the traffic, not the size of
//! the attribution buffer. `restore(save_all(state)) == state` exactly (tested), so a partition
//! that moves to another instance, or a process that restarts, continues as if nothing happened.

use std::collections::BTreeMap;

use prost::Message;
use xxhash_rust::xxh3::xxh3_64;

use super::event::{self, Feedback, FeedbackKind, InvalidEvent};
use super::join::{AttributionJoin, Entry, JoinChanges, JoinCounters};
use super::params::CoreSpec;
use super::partition::PartitionState;
use super::pb;
use super::reconfigure::{self, ModelChange};
use super::snapshot::{self, DecodedSnapshot, SnapshotError, SnapshotMeta};

pub const FORMAT_VERSION: u32 = 1;

pub fn header_key(partition: i32) -> String {
    format!("checkpoint/{partition}")
}

pub fn impression_key(partition: i32, id: &str) -> String {
    format!("imp/{partition}/{}", escape_key_part(id))
}

/// An id as one segment of a snapshot-topic key: `%`, `/` and `#` are percent-encoded, so that
/// `/` only ever separates segments and `#` only ever marks a chunk (`core::blob`), whatever
/// the id holds. Ids without those characters are unchanged.
pub fn escape_key_part(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.contains(['%', '/', '#']) {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The inverse of [`escape_key_part`]; `None` for text it cannot have produced.
pub fn unescape_key_part(part: &str) -> Option<String> {
    if part.contains(['/', '#']) {
        return None;
    }
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "2F" => '/',
            "23" => '#',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Whether `part` is a key segment as [`escape_key_part`] writes it. Keys written by versions
/// that did not escape (ids with `%` or `/`) are not, and are rewritten at restore.
pub fn is_escaped_key_part(part: &str) -> bool {
    unescape_key_part(part).is_some_and(|id| escape_key_part(&id) == part)
}

/// The model id and partition of a `model/<model>/<p>` key (`None` for any other key, chunks
/// included).
pub fn parse_model_key(key: &str) -> Option<(String, i32)> {
    let rest = key.strip_prefix("model/")?;
    let (model, partition) = rest.split_once('/')?;
    if partition.contains('#') {
        return None;
    }
    // A key written before ids were escaped holds the raw id (any but `/`, which model ids
    // never had): read it as such, so an upgrade restores it (and rewrites it escaped).
    let id = unescape_key_part(model).unwrap_or_else(|| model.to_string());
    Some((id, partition.parse().ok()?))
}

pub fn held_key(partition: i32, sequence: u64) -> String {
    format!("held/{partition}/{sequence:020}")
}

pub fn model_key(model: &str, partition: i32) -> String {
    format!("model/{}/{partition}", escape_key_part(model))
}

/// The encoded records of one save.
#[derive(Debug, Clone, Default)]
pub struct SavedPartition {
    pub header: Vec<u8>,
    /// Buffer entries to write: (key, value).
    pub puts: Vec<(String, Vec<u8>)>,
    /// Buffer entries to delete (tombstones).
    pub deletes: Vec<String>,
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
    c.propensities_clipped = take("propensities_clipped");
    c.rewards_clamped = take("rewards_clamped");
    c.arms_rejected = take("arms_rejected");
    c.sums_saturated = take("sums_saturated");
    match named.keys().next() {
        Some(unknown) => Err(invalid(format!("unknown join counter `{unknown}`"))),
        None => Ok(c),
    }
}

fn kind_code(k: FeedbackKind) -> u32 {
    k.index() as u32
}

/// One `BufferedImpression` record: the hottest encode of the Kafka path (one per buffered
/// impression and change), written straight from the entry's borrowed strings instead of
/// cloning them into a `pb::BufferedImpression` first. The bytes are exactly prost's for that
/// message (tested against it): fields in tag order, proto3 defaults left out, `seen` packed.
fn encode_impression(spec: &CoreSpec, id: &str, e: &Entry) -> Vec<u8> {
    encode_buffered(spec.models.get(e.model).map_or("", |m| m.id.as_str()), id, e)
}

fn encode_buffered(model_id: &str, id: &str, e: &Entry) -> Vec<u8> {
    use wire::*;
    let (kind, arm) = match &e.variant {
        event::Variant::Treatment => (pb::VariantKind::Treatment, ""),
        event::Variant::Holdout => (pb::VariantKind::Holdout, ""),
        event::Variant::Arm(a) => (pb::VariantKind::Experiment, a.as_str()),
    };
    let variant_len = int_len(1, kind as i32 as u64) + string_len(2, arm);
    let feature_len = |n: &str, v: f64| string_len(1, n) + double_len(2, v);
    let item_len =
        |item: &str, pos: u32, p: f64| string_len(1, item) + int_len(2, pos.into()) + double_len(3, p);
    // `seen` is kept in attribution order (itself deterministic), so a restore is exact.
    let seen = |(i, k): &(u16, FeedbackKind)| u64::from(u32::from(*i) * 8 + kind_code(*k));
    let seen_len: usize = e.seen.iter().map(|x| varint_len(seen(x))).sum();
    let len = string_len(1, id)
        + int_len(2, e.time_ms as u64)
        + string_len(3, model_id)
        + message_len(4, variant_len)
        + string_len(5, &e.segment)
        + e.features.iter().map(|(n, v)| message_len(6, feature_len(n, *v))).sum::<usize>()
        + e.slate.iter().map(|(i, pos, p)| message_len(7, item_len(i, *pos, *p))).sum::<usize>()
        + int_len(8, u64::from(e.opted_out))
        + int_len(9, e.total_reward_micros as u64)
        + if seen_len > 0 { message_len(10, seen_len) } else { 0 }
        + int_len(11, e.last_feedback_position.into());
    let mut b = Vec::with_capacity(len);
    string(&mut b, 1, id);
    int(&mut b, 2, e.time_ms as u64);
    string(&mut b, 3, model_id);
    message_header(&mut b, 4, variant_len);
    int(&mut b, 1, kind as i32 as u64);
    string(&mut b, 2, arm);
    string(&mut b, 5, &e.segment);
    for (n, v) in &e.features {
        message_header(&mut b, 6, feature_len(n, *v));
        string(&mut b, 1, n);
        double(&mut b, 2, *v);
    }
    for (i, pos, p) in &e.slate {
        message_header(&mut b, 7, item_len(i, *pos, *p));
        string(&mut b, 1, i);
        int(&mut b, 2, (*pos).into());
        double(&mut b, 3, *p);
    }
    int(&mut b, 8, u64::from(e.opted_out));
    int(&mut b, 9, e.total_reward_micros as u64);
    if seen_len > 0 {
        message_header(&mut b, 10, seen_len);
        for x in &e.seen {
            varint(&mut b, seen(x));
        }
    }
    int(&mut b, 11, e.last_feedback_position.into());
    debug_assert_eq!(b.len(), len);
    b
}

/// The few protobuf wire primitives [`encode_buffered`] needs, with prost's rules: scalar
/// fields equal to their default are not written, integers are varints (negative `int64` as
/// ten bytes), doubles are 8 little-endian bytes.
mod wire {
    pub fn varint(b: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            b.push((v as u8) | 0x80);
            v >>= 7;
        }
        b.push(v as u8);
    }

    pub fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    fn key(b: &mut Vec<u8>, tag: u32, wire_type: u32) {
        varint(b, u64::from(tag << 3 | wire_type));
    }

    fn key_len(tag: u32) -> usize {
        varint_len(u64::from(tag << 3))
    }

    pub fn int(b: &mut Vec<u8>, tag: u32, v: u64) {
        if v != 0 {
            key(b, tag, 0);
            varint(b, v);
        }
    }

    pub fn int_len(tag: u32, v: u64) -> usize {
        if v != 0 {
            key_len(tag) + varint_len(v)
        } else {
            0
        }
    }

    pub fn double(b: &mut Vec<u8>, tag: u32, v: f64) {
        if v != 0.0 {
            key(b, tag, 1);
            b.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn double_len(tag: u32, v: f64) -> usize {
        if v != 0.0 {
            key_len(tag) + 8
        } else {
            0
        }
    }

    pub fn string(b: &mut Vec<u8>, tag: u32, s: &str) {
        if !s.is_empty() {
            message_header(b, tag, s.len());
            b.extend_from_slice(s.as_bytes());
        }
    }

    pub fn string_len(tag: u32, s: &str) -> usize {
        if s.is_empty() {
            0
        } else {
            message_len(tag, s.len())
        }
    }

    /// Key and length of a length-delimited field (always written, even when empty).
    pub fn message_header(b: &mut Vec<u8>, tag: u32, len: usize) {
        key(b, tag, 2);
        varint(b, len as u64);
    }

    pub fn message_len(tag: u32, len: usize) -> usize {
        key_len(tag) + varint_len(len as u64) + len
    }
}

fn encode_held(seq: u64, f: &Feedback) -> Vec<u8> {
    pb::HeldFeedback { sequence: seq, feedback: Some(event::feedback_to_pb(f)) }.encode_to_vec()
}

fn header_and_models(spec: &CoreSpec, state: &PartitionState) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
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
        impressions: Vec::new(),
        held: Vec::new(),
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
    (cp.encode_to_vec(), models)
}

/// The records for everything that changed since the previous save; takes the changes.
pub fn save_changes(spec: &CoreSpec, state: &mut PartitionState) -> SavedPartition {
    let changes = std::mem::take(&mut state.join.changes);
    let p = state.partition;
    let mut puts = Vec::new();
    // Sorted, so the same changes always give the same records.
    let mut written: Vec<&String> = changes.impressions_written.iter().collect();
    written.sort_unstable();
    for id in written {
        if let Some(e) = state.join.impressions.get(id) {
            puts.push((impression_key(p, id), encode_impression(spec, id, e)));
        }
    }
    let held: BTreeMap<u64, &Feedback> =
        state.join.pending.values().flatten().map(|(s, f)| (*s, f)).collect();
    let mut held_written: Vec<u64> = changes.held_written.iter().copied().collect();
    held_written.sort_unstable();
    for seq in &held_written {
        if let Some(f) = held.get(seq) {
            puts.push((held_key(p, *seq), encode_held(*seq, f)));
        }
    }
    let mut deletes: Vec<String> =
        changes.impressions_deleted.iter().map(|id| impression_key(p, id)).collect();
    deletes.extend(changes.held_deleted.iter().map(|s| held_key(p, *s)));
    deletes.extend(changes.models_retired.iter().map(|m| model_key(m, p)));
    deletes.extend(changes.keys_deleted.iter().cloned());
    let (header, models) = header_and_models(spec, state);
    SavedPartition { header, puts, deletes, models }
}

/// The records for the whole state (sorted), as for an empty store.
pub fn save_all(spec: &CoreSpec, state: &PartitionState) -> SavedPartition {
    let p = state.partition;
    let mut puts: Vec<(String, Vec<u8>)> = state
        .join
        .impressions
        .iter()
        .map(|(id, e)| (impression_key(p, id), encode_impression(spec, id, e)))
        .collect();
    puts.extend(state.join.pending.values().flatten().map(|(s, f)| (held_key(p, *s), encode_held(*s, f))));
    puts.sort();
    let (header, models) = header_and_models(spec, state);
    SavedPartition { header, puts, deletes: Vec::new(), models }
}

/// Rebuilds a partition from its header, its buffer entries (values of `imp/…` and `held/…`
/// keys) and the model snapshots of the header's version, under the parameters configured now.
/// Configuration changes never fail a restore: each model's outcome is returned
/// ([`ModelChange`], classes in `core::reconfigure`). A model reset or removed loses its
/// buffered impressions too (their deletion is recorded in the join's changes, so the next save
/// writes tombstones); a removed model's snapshot record is deleted likewise.
pub fn restore(
    spec: &CoreSpec,
    header: &[u8],
    impressions: &[Vec<u8>],
    held: &[Vec<u8>],
    models: &[DecodedSnapshot],
) -> Result<(PartitionState, Vec<(String, ModelChange)>), SnapshotError> {
    let decode_err = |e: prost::DecodeError| SnapshotError::Decode(e.to_string());
    let mut cp = pb::PartitionCheckpoint::decode(header).map_err(decode_err)?;
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
    let mut report = Vec::new();
    // Buffered impressions of these models are dropped.
    let mut dropped: Vec<String> = Vec::new();
    let mut changes = JoinChanges::default();
    for id in &cp.models {
        if spec.model(id).is_none() {
            report.push((id.clone(), ModelChange::Removed));
            dropped.push(id.clone());
            changes.models_retired.push(id.clone());
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
                if let Some(field) = reconfigure::reset_field(&s.spec, m) {
                    report.push((m.id.clone(), ModelChange::Reset { field }));
                    dropped.push(m.id.clone());
                    continue;
                }
                let mut shard = s.shard.clone();
                if s.spec.half_life_ms != m.half_life_ms {
                    let at = cp.max_event_time_ms.or(shard.landmark_ms).unwrap_or(0);
                    shard.change_half_life(s.spec.half_life_ms, m.half_life_ms, at);
                    report.push((
                        m.id.clone(),
                        ModelChange::HalfLifeChanged { from_ms: s.spec.half_life_ms, to_ms: m.half_life_ms },
                    ));
                }
                let read_time = reconfigure::read_time_fields(&s.spec, m);
                if !read_time.is_empty() || s.spec.half_life_ms == m.half_life_ms {
                    report.push((m.id.clone(), ModelChange::Kept { read_time }));
                }
                state.models[i] = shard;
            }
            None if cp.models.contains(&m.id) => {
                return Err(invalid(format!(
                    "model `{}` snapshot of version {} is missing",
                    m.id, cp.records
                )))
            }
            None => report.push((m.id.clone(), ModelChange::Added)),
        }
    }
    let mut join = AttributionJoin::new();
    join.max_event_time_ms = cp.max_event_time_ms;
    join.next_seq = cp.next_sequence;
    join.counters = counters_from(&cp.join_counters)?;
    let mut buffered = std::mem::take(&mut cp.impressions);
    for raw in impressions {
        buffered.push(pb::BufferedImpression::decode(raw.as_slice()).map_err(decode_err)?);
    }
    let mut held_all = std::mem::take(&mut cp.held);
    for raw in held {
        held_all.push(pb::HeldFeedback::decode(raw.as_slice()).map_err(decode_err)?);
    }
    // Held feedback is kept per impression in arrival (sequence) order.
    held_all.sort_by_key(|h| h.sequence);
    for b in buffered {
        if dropped.contains(&b.model_id) {
            changes.impressions_deleted.insert(b.impression_id);
            continue;
        }
        let model = spec.models.iter().position(|m| m.id == b.model_id).ok_or_else(|| {
            invalid(format!(
                "buffered impression of model `{}`, which the checkpoint does not list",
                b.model_id
            ))
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
    for h in held_all {
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
    // Anything but an unchanged model means the stored records are out of date.
    changes.dirty = report.iter().any(|(_, c)| c.code() != "unchanged");
    join.changes = changes;
    state.join = join;
    // Caps lowered since the save apply at once.
    state.join.enforce_caps(spec);
    for c in cp.invalid_counts {
        let code = InvalidEvent::code_named(&c.name)
            .ok_or_else(|| invalid(format!("unknown invalid reason `{}`", c.name)))?;
        state.invalid.insert(code, c.value);
    }
    Ok((state, report))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::core::event::Variant;

    /// The straightforward encoding through prost's generated struct: the reference.
    fn encode_with_prost(model_id: &str, id: &str, e: &Entry) -> Vec<u8> {
        pb::BufferedImpression {
            impression_id: id.to_string(),
            event_time_ms: e.time_ms,
            model_id: model_id.to_string(),
            variant: Some(snapshot::variant_to_pb(&e.variant)),
            segment: e.segment.clone(),
            features: e.features.iter().map(|(n, v)| pb::Feature { name: n.clone(), value: *v }).collect(),
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
            // Kept in attribution order (itself deterministic), so a restore is exact.
            seen: e.seen.iter().map(|(i, k)| u32::from(*i) * 8 + kind_code(*k)).collect(),
            last_feedback_position: e.last_feedback_position,
        }
        .encode_to_vec()
    }

    fn variant() -> impl Strategy<Value = Variant> {
        prop_oneof![Just(Variant::Treatment), Just(Variant::Holdout), "[a-z]{0,12}".prop_map(Variant::Arm)]
    }

    fn kind() -> impl Strategy<Value = FeedbackKind> {
        prop_oneof![
            Just(FeedbackKind::Click),
            Just(FeedbackKind::AddToCart),
            Just(FeedbackKind::Purchase),
            Just(FeedbackKind::Return),
        ]
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![Just(0.0), Just(-0.0), any::<f64>(), -1e6..1e6f64]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            (any::<i64>(), 0usize..3, variant(), "[a-zé-]{0,20}"),
            prop::collection::vec(("[a-z]{0,8}", float()), 0..4),
            prop::collection::vec(("[a-z0-9-]{0,200}", any::<u32>(), float()), 0..20),
            (any::<bool>(), any::<i64>(), prop::collection::vec((any::<u16>(), kind()), 0..40), any::<u32>()),
        )
            .prop_map(
                |((time_ms, model, variant, segment), features, slate, (opted_out, total, seen, last))| {
                    Entry {
                        time_ms,
                        model,
                        variant,
                        segment,
                        features,
                        slate,
                        opted_out,
                        total_reward_micros: total,
                        seen,
                        last_feedback_position: last,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// The hand-written encoding is prost's, byte for byte, and decodes back with prost.
        #[test]
        fn buffered_impression_bytes_equal_prost(
            model in "[a-z]{0,10}",
            id in "[a-z0-9-]{0,140}",
            e in entry(),
        ) {
            let ours = encode_buffered(&model, &id, &e);
            prop_assert_eq!(&ours, &encode_with_prost(&model, &id, &e));
            prop_assert!(pb::BufferedImpression::decode(ours.as_slice()).is_ok());
        }
    }
}
