//! Saving and restoring a whole partition. The [`PartitionState`] is stored as records of two
//! compacted topics, all written in one transaction per version. On the snapshot topic, which
//! serving nodes follow:
//!
//! - `checkpoint/<p>`: a `PartitionCheckpoint` header (offsets, counters, watermark input);
//! - `model/<model>/<p>` and `model/<model>/<p>/<sequence>`: each model's head and arm
//!   segments (`core::armlog`).
//!
//! On the changelog topic ([`is_changelog_key`]), which only restoring processors read:
//!
//! - `buf/<p>/<sequence>`: changelog segments of the attribution buffer (`BufferSegment`,
//!   zstd-compressed): the entries written or changed since the previous save, in one record;
//! - `held/<p>/<sequence>`: one `HeldFeedback` per feedback waiting for its impression.
//!
//! Builds before the changelog topic kept `buf/` and `held/` on the snapshot topic: restore
//! reads them there too and the next saves move them ([`JoinChanges::moved`],
//! [`MOVE_BYTES_PER_SAVE`] per save).
//!
//! The buffer is a changelog, so the cost of a save follows the traffic, not the size of the
//! buffer, and it is written in batched, compressed segments rather than a record per
//! impression. Restore applies a partition's segments in sequence order (newest version of a
//! key wins; deleted keys go) and keeps a version only while the restored watermark has not
//! passed the retention end stored with it: released impressions need no record at all.
//!
//! Reclaiming segments on the compacted topic: a segment is deleted (tombstone) once it holds
//! the newest version of no retained entry and its delete markers (if any) can hide nothing
//! any more: no older segment is left, or the watermark passed the retention end of every entry
//! they delete. Entries in old segments that are mostly dead are copied into segments of their own
//! (at most [`COMPACTION_PER_SAVE`] per save) once the dead versions outnumber the live ones,
//! so the topic holds at most about twice the retained entries (plus 64 Ki) whatever the
//! funnel keeps.
//!
//! `restore(save_all(state)) == state` exactly (tested), so a partition that moves to another
//! instance, or a process that restarts, continues as if nothing happened.

use std::collections::BTreeMap;

use prost::Message;
use xxhash_rust::xxh3::xxh3_64;

use super::armlog;
use super::buffer::{Entry, Key, Retention, Slate, UNSAVED};
use super::event::{self, Feedback, FeedbackKind, InvalidEvent, Variant};
use super::join::{AttributionJoin, JoinChanges, JoinCounters};
use super::params::CoreSpec;
use super::partition::PartitionState;
use super::pb;
use super::reconfigure::{self, ModelChange};
use super::snapshot::{self, DecodedSnapshot, SnapshotError, SnapshotMeta};

mod keys;
mod restore;
pub use keys::*;
pub use restore::restore;

/// The checkpoint format this build writes. The policy: a build restores the format before its
/// own and its own (a rolling upgrade, or a rollback by one version, restores every
/// partition); older ones are refused by name (`SnapshotError::CheckpointVersion`) and isolated to their
/// partition. 4: the attribution changelog (`buf/`, `held/`) on the changelog topic (the header
/// is as in 3; the version tells a build before it that the segments it names are not where it
/// looks); 3: per-input event-time clocks and what restore must find (live segments, held
/// records); 2 (still restored, upgraded): the buffer in changelog segments; 1 (still restored,
/// upgraded): a record per buffered impression.
pub const FORMAT_VERSION: u32 = 4;

/// The previous format, still restored.
pub const PREVIOUS_FORMAT_VERSION: u32 = 3;

/// Older formats this build still restores and writes again in its own.
pub const UPGRADED_FORMAT_VERSIONS: [u32; 2] = [2, 1];

/// xxh3-64 of segment sequence numbers in ascending order (u32 little-endian).
pub fn segments_digest(sequences: impl IntoIterator<Item = u32>) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for q in sequences {
        h.update(&q.to_le_bytes());
    }
    h.digest()
}

/// Entries of sparse old segments copied forward per save.
pub const COMPACTION_PER_SAVE: usize = 50_000;

/// Largest decompressed segment accepted at restore (a corrupt length cannot exhaust memory).
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// The encoded records of one save.
#[derive(Debug, Clone, Default)]
pub struct SavedPartition {
    pub header: Vec<u8>,
    /// Values to write before the header and the heads: buffer segments, held feedback, arm
    /// segments (key, value).
    pub puts: Vec<(String, Vec<u8>)>,
    /// Keys to delete (tombstones).
    pub deletes: Vec<String>,
    /// Changelog keys an older build stored on the snapshot topic, to delete there: their
    /// values are among `puts` (first), bound for the changelog topic, unless this save
    /// deletes them. At most [`MOVE_BYTES_PER_SAVE`] per save; the rest stay on the snapshot
    /// topic, where restore still finds them, for the next saves.
    pub moved: Vec<String>,
    /// (model id, the shard's head: an encoded ModelSnapshot of format 2 whose arms are in the
    /// arm segments of `puts`, `core::armlog`), in configuration order.
    pub models: Vec<(String, Vec<u8>)>,
}

impl SavedPartition {
    /// The shards of a whole save ([`save_all`], as for an empty store): each model's head with
    /// its arm segments.
    pub fn shards(&self, partition: i32) -> Result<Vec<DecodedSnapshot>, SnapshotError> {
        let heads: Vec<(String, &[u8])> =
            self.models.iter().map(|(m, b)| (model_key(m, partition), b.as_slice())).collect();
        let segments = self.puts.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        armlog::assemble(partition, segments.chain(heads.iter().map(|(k, v)| (k.as_str(), *v))))
    }
}

/// Whether restore found every value the checkpoint says is live (format 3 on): a missing segment
/// or held record would silently lose retained impressions or held feedback.
fn check_complete(cp: &pb::PartitionCheckpoint, found: &[u32], held: usize) -> Result<(), SnapshotError> {
    let p = cp.partition;
    let missing = |what: String| {
        SnapshotError::Missing(format!(
            "{what} (checkpoint/{p} of version {}); was a value deleted from the snapshot topic? \
             (its cleanup.policy must be `compact` alone, without `delete` or retention)",
            cp.records
        ))
    };
    if cp.live_segments as usize != found.len()
        || segments_digest(found.iter().copied()) != cp.live_segments_digest
    {
        let first = cp.first_live_segment;
        if cp.live_segments > 0 && !found.contains(&first) {
            return Err(missing(format!("buffer segment `{}` is missing", segment_key(p, first))));
        }
        let span = match (found.first(), found.last()) {
            (Some(a), Some(b)) => format!(" (found `{}` … `{}`)", segment_key(p, *a), segment_key(p, *b)),
            _ => String::new(),
        };
        return Err(missing(format!(
            "{} live buffer segments from `{}` are recorded, {} found{span}",
            cp.live_segments,
            segment_key(p, first),
            found.len()
        )));
    }
    if cp.held_records != held as u64 {
        return Err(missing(format!(
            "{} held feedback records (`held/{p}/…`) are recorded, {held} found",
            cp.held_records
        )));
    }
    Ok(())
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
    c.feedback_released = take("feedback_released");
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

fn encode_held(seq: u64, f: &Feedback) -> Vec<u8> {
    pb::HeldFeedback { sequence: seq, feedback: Some(event::feedback_to_pb(f)) }.encode_to_vec()
}

fn header(spec: &CoreSpec, state: &PartitionState) -> Vec<u8> {
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
        // Zero counters are left out (restore reads a missing counter as 0): the header is
        // written at every commit, and most counters stay 0.
        join_counters: state
            .join
            .counters
            .rows()
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(n, v)| pb::Counter { name: (*n).into(), value: *v })
            .collect(),
        invalid_counts: state
            .invalid
            .iter()
            .map(|(n, v)| pb::Counter { name: (*n).into(), value: *v })
            .collect(),
        models: spec.models.iter().map(|m| m.id.clone()).collect(),
        next_buffer_segment: state.join.buffer.next_segment,
        checksum: 0,
        input_times: state
            .inputs
            .iter()
            .filter_map(|c| c.newest_ms.map(|t| pb::InputTime { topic: c.topic.clone(), newest_ms: t }))
            .collect(),
        live_segments: state.join.buffer.segments.len() as u32,
        first_live_segment: state.join.buffer.segments.keys().next().copied().unwrap_or(0),
        live_segments_digest: segments_digest(state.join.buffer.segments.keys().copied()),
        held_records: state.join.pending_order.len() as u64,
    };
    cp.checksum = xxh3_64(&cp.encode_to_vec());
    cp.encode_to_vec()
}

/// Every model's head, and its arm segments into `puts` / `deletes`: what changed since the
/// last save (`whole`: everything, as for an empty store, without touching the logs).
fn save_models(
    spec: &CoreSpec,
    state: &mut PartitionState,
    whole: bool,
    puts: &mut Vec<(String, Vec<u8>)>,
    deletes: &mut Vec<String>,
) -> Vec<(String, Vec<u8>)> {
    let metas: Vec<SnapshotMeta> = spec.models.iter().map(|m| shard_meta(spec, state, &m.id)).collect();
    let mut heads = Vec::with_capacity(spec.models.len());
    for ((m, shard), meta) in spec.models.iter().zip(state.models.iter_mut()).zip(&metas) {
        let saved = if whole { armlog::save_whole(m, shard, meta) } else { armlog::save(m, shard, meta) };
        puts.extend(saved.puts);
        deletes.extend(saved.deletes);
        heads.push((m.id.clone(), saved.head));
    }
    heads
}

/// Names of one segment, numbered in order of first use.
#[derive(Default)]
struct Names<'a> {
    index: rustc_hash::FxHashMap<&'a str, u32>,
    list: Vec<String>,
}

impl<'a> Names<'a> {
    fn of(&mut self, s: &'a str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.list.len() as u32;
        self.list.push(s.to_string());
        self.index.insert(s, i);
        i
    }
}

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;

fn put_varint(out: &mut Vec<u8>, v: u64) {
    prost::encoding::encode_varint(v, out);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from(field << 3 | wire));
}

/// A proto3 integer field (omitted at 0, as prost omits it).
fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_key(out, field, VARINT);
        put_varint(out, v);
    }
}

fn put_len(out: &mut Vec<u8>, field: u32, len: usize) {
    put_key(out, field, LEN);
    put_varint(out, len as u64);
}

/// A packed repeated varint field (omitted when empty).
fn put_packed_varints(out: &mut Vec<u8>, field: u32, values: impl Iterator<Item = u64> + Clone) {
    let len: usize = values.clone().map(prost::encoding::encoded_len_varint).sum();
    if len == 0 {
        return;
    }
    put_len(out, field, len);
    for v in values {
        put_varint(out, v);
    }
}

/// Writes one retained impression as a `SegmentEntry` message, byte for byte what prost
/// writes for the same message (fields in tag order, proto3 defaults omitted, repeated
/// scalars packed), without building it: a segment holds tens of thousands of entries, and
/// the message's vectors cost more than the encoding. `slots` is scratch space.
fn write_entry<'a>(
    spec: &'a CoreSpec,
    join: &'a AttributionJoin,
    r: &Retention,
    names: &mut Names<'a>,
    e: &Entry,
    slots: &mut Vec<(u32, u32, f32, u8)>,
    out: &mut Vec<u8>,
) {
    let b = &join.buffer;
    // Names are numbered in the order prost's message was built in: arm, model, segment,
    // items, features.
    let (variant_kind, arm) = match e.variant {
        0 => (pb::VariantKind::Treatment, 0),
        1 => (pb::VariantKind::Holdout, 0),
        n => (pb::VariantKind::Experiment, names.of(b.names.name(n - 2))),
    };
    let model = names.of(spec.models.get(usize::from(e.model)).map_or("", |m| m.id.as_str()));
    let segment = names.of(b.names.name(e.segment));
    slots.clear();
    slots.extend(b.slate(e));
    let first_position = slots.first().map_or(0, |s| s.1);
    let consecutive =
        slots.iter().enumerate().all(|(i, s)| Some(s.1) == first_position.checked_add(i as u32));
    if e.key.0 != 0 {
        put_key(out, 1, FIXED64);
        out.extend_from_slice(&e.key.0.to_le_bytes());
    }
    if e.key.1 != 0 {
        put_key(out, 2, FIXED64);
        out.extend_from_slice(&e.key.1.to_le_bytes());
    }
    put_uint(out, 3, e.time_ms as u64);
    put_uint(out, 4, r.retained_until(e) as u64);
    put_uint(out, 5, u64::from(model));
    put_uint(out, 6, variant_kind as i32 as i64 as u64);
    put_uint(out, 7, u64::from(arm));
    put_uint(out, 8, u64::from(segment));
    let mut items_len = 0;
    for s in slots.iter_mut() {
        // The item's name index replaces its interned id (names numbered in slate order).
        s.0 = names.of(b.names.name(s.0));
        items_len += prost::encoding::encoded_len_varint(u64::from(s.0));
    }
    if items_len > 0 {
        put_len(out, 9, items_len);
        for s in slots.iter() {
            put_varint(out, u64::from(s.0));
        }
    }
    put_uint(out, 10, u64::from(first_position));
    if !consecutive {
        put_packed_varints(out, 11, slots.iter().map(|s| u64::from(s.1)));
    }
    if !slots.is_empty() {
        put_len(out, 12, 4 * slots.len());
        for s in slots.iter() {
            out.extend_from_slice(&s.2.to_le_bytes());
        }
    }
    if slots.iter().any(|s| s.3 != 0) {
        put_len(out, 13, slots.len());
        out.extend(slots.iter().map(|s| s.3));
    }
    put_uint(out, 14, e.total_reward_micros as u64);
    put_uint(out, 15, u64::from(e.opted_out));
    put_uint(out, 16, u64::from(e.depth));
    if let Some(features) = b.features.get(&e.key) {
        for (n, v) in features {
            let name = names.of(n);
            let name_len =
                if name != 0 { 1 + prost::encoding::encoded_len_varint(u64::from(name)) } else { 0 };
            // prost omits a double equal to 0 (so -0.0 too).
            let value_len = if *v != 0.0 { 9 } else { 0 };
            put_len(out, 17, name_len + value_len);
            put_uint(out, 1, u64::from(name));
            if *v != 0.0 {
                put_key(out, 2, FIXED64);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// One compressed segment holding the entries at `slots` (`Buffer::slot_of`, in key order)
/// and the delete markers `deleted`: a `BufferSegment` message written field by field (see
/// [`write_entry`]).
fn encode_segment(
    spec: &CoreSpec,
    join: &AttributionJoin,
    sequence: u32,
    slots: &[u32],
    deleted: &[Key],
) -> Vec<u8> {
    // Scratch space kept per thread: a segment can be megabytes, and buffers allocated
    // afresh at every save came back from the kernel as pages it had to zero.
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let (entries, raw) = &mut *scratch;
            let value = write_segment(spec, join, sequence, slots, deleted, entries, raw);
            // Past 16 MB, give the memory back rather than keep it for the next save.
            for buf in [entries, raw] {
                buf.clear();
                if buf.capacity() > 16 << 20 {
                    *buf = Vec::new();
                }
            }
            value
        }
        Err(_) => write_segment(spec, join, sequence, slots, deleted, &mut Vec::new(), &mut Vec::new()),
    })
}

fn write_segment(
    spec: &CoreSpec,
    join: &AttributionJoin,
    sequence: u32,
    slots: &[u32],
    deleted: &[Key],
    entries: &mut Vec<u8>,
    raw: &mut Vec<u8>,
) -> Vec<u8> {
    let mut names = Names::default();
    // The entries (field 3) first, since the names (field 2, written before them) are known
    // only once every entry has named its strings.
    let mut entry = Vec::with_capacity(256);
    let mut slate = Vec::with_capacity(16);
    let r = AttributionJoin::retention(spec);
    for e in slots.iter().filter_map(|i| join.buffer.at(*i)) {
        entry.clear();
        write_entry(spec, join, &r, &mut names, e, &mut slate, &mut entry);
        put_len(entries, 3, entry.len());
        entries.extend_from_slice(&entry);
    }
    put_uint(raw, 1, u64::from(sequence));
    for n in &names.list {
        put_len(raw, 2, n.len());
        raw.extend_from_slice(n.as_bytes());
    }
    raw.extend_from_slice(entries);
    if !deleted.is_empty() {
        put_len(raw, 4, 16 * deleted.len());
        for k in deleted {
            raw.extend_from_slice(&k.0.to_le_bytes());
            raw.extend_from_slice(&k.1.to_le_bytes());
        }
    }
    compress(raw)
}

/// A segment's value (buffer or arm segment), zstd-compressed.
pub(crate) fn compress(raw: &[u8]) -> Vec<u8> {
    // Level 3 (zstd's default); compressing into memory cannot fail but for allocation. One
    // compression context per thread, reused: a fresh one per segment allocated (and the
    // kernel zeroed) its ~1 MB of tables every time. The output goes to a buffer kept with it
    // (sized for the worst case) and leaves as an exact copy. The bytes are the same either way.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR
        .with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            if c.is_none() {
                *c = Some((zstd::bulk::Compressor::new(3).ok()?, Vec::new()));
            }
            let (compressor, out) = c.as_mut()?;
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
            compressor.compress_to_buffer(raw, out).ok()?;
            let value = out.clone();
            if out.capacity() > 16 << 20 {
                *out = Vec::new();
            }
            Some(value)
        })
        .unwrap_or_else(|| zstd::bulk::compress(raw, 3).unwrap_or_else(|_| raw.to_vec()))
}

/// The inverse of [`compress`], refusing more than 1 GiB; `what` names the value in errors.
pub(crate) fn decompress(bytes: &[u8], what: &str) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let mut raw = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(bytes).map_err(|e| invalid(format!("{what}: {e}")))?;
    decoder.take(MAX_SEGMENT_BYTES + 1).read_to_end(&mut raw).map_err(|e| invalid(format!("{what}: {e}")))?;
    if raw.len() as u64 > MAX_SEGMENT_BYTES {
        return Err(invalid(format!("{what} larger than 1 GiB")));
    }
    Ok(raw)
}

pub fn decode_segment(bytes: &[u8]) -> Result<pb::BufferSegment, SnapshotError> {
    let raw = decompress(bytes, "buffer segment")?;
    pb::BufferSegment::decode(raw.as_slice()).map_err(|e| SnapshotError::Decode(e.to_string()))
}

/// Marks entries of sparse segments for copying once dead versions outnumber live ones.
fn plan_compaction(join: &mut AttributionJoin) {
    let b = &mut join.buffer;
    if !b.compaction.is_empty() {
        return;
    }
    let (written, live) =
        b.segments.values().fold((0u64, 0u64), |(w, l), s| (w + u64::from(s.written), l + u64::from(s.live)));
    if written.saturating_sub(live) <= live + 65_536 {
        return;
    }
    let sparse: rustc_hash::FxHashSet<u32> =
        b.segments.iter().filter(|(_, s)| s.live > 0 && s.live * 2 < s.written).map(|(q, _)| *q).collect();
    if sparse.is_empty() {
        return;
    }
    let mut keys: Vec<Key> = b.entries().filter(|e| sparse.contains(&e.changelog)).map(|e| e.key).collect();
    // Copied in key order, from the end of the list.
    keys.sort_unstable_by(|a, b| b.cmp(a));
    b.compaction = keys;
}

/// Bytes of changelog values one save moves off the snapshot topic (an older build's layout):
/// the move of a large partition is spread over several saves, so no transaction grows with
/// the partition's whole changelog.
pub const MOVE_BYTES_PER_SAVE: usize = 16 << 20;

/// The records for everything that changed since the previous save; takes the changes.
pub fn save_changes(spec: &CoreSpec, state: &mut PartitionState) -> SavedPartition {
    save_changes_moving(spec, state, MOVE_BYTES_PER_SAVE)
}

/// [`save_changes`], moving at most `move_bytes` of changelog values off the snapshot topic
/// (at least one value while any is left); the rest stays pending for the next saves.
pub fn save_changes_moving(spec: &CoreSpec, state: &mut PartitionState, move_bytes: usize) -> SavedPartition {
    let mut changes = std::mem::take(&mut state.join.changes);
    let p = state.partition;
    let mut pending = std::mem::take(&mut changes.moved);
    let (mut count, mut bytes) = (0, 0);
    for (_, v) in &pending {
        if count > 0 && bytes + v.len() > move_bytes {
            break;
        }
        bytes += v.len();
        count += 1;
    }
    let later = pending.split_off(count);
    let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut deletes: Vec<String> = Vec::new();
    plan_compaction(&mut state.join);
    let buf = &mut state.join.buffer;
    let mut fresh: Vec<Key> = buf.dirty.drain().collect();
    fresh.sort_unstable();
    // Copies go into a segment of their own: they are the long-lived entries (clicked,
    // purchased), and mixed with fresh impressions (mostly released within hours) they would
    // be copied again as soon as those are gone.
    let mut copies = Vec::new();
    for _ in 0..COMPACTION_PER_SAVE {
        match buf.compaction.pop() {
            Some(k) if buf.contains(k) && fresh.binary_search(&k).is_err() => copies.push(k),
            Some(_) => {}
            None => break,
        }
    }
    copies.sort_unstable();
    copies.dedup();
    buf.copied += copies.len() as u64;
    let deleted = std::mem::take(&mut buf.deleted);
    for (keys, deleted) in [(fresh, deleted), (copies, Vec::new())] {
        if keys.is_empty() && deleted.is_empty() {
            continue;
        }
        let seq = state.join.buffer.next_segment;
        let deleted_keys: Vec<Key> = deleted.iter().map(|d| d.0).collect();
        let slots: Vec<u32> = keys.iter().filter_map(|k| state.join.buffer.slot_of(*k)).collect();
        let value = encode_segment(spec, &state.join, seq, &slots, &deleted_keys);
        let buf = &mut state.join.buffer;
        buf.next_segment = seq.wrapping_add(1);
        buf.segments.entry(seq).or_default().markers_until = deleted.iter().map(|d| d.1).max();
        for &i in &slots {
            buf.stored_in(i, seq);
        }
        puts.push((segment_key(p, seq), value));
    }
    // Segments no retained entry needs, in order: a segment with delete markers goes once
    // no older segment is left or the watermark passed the retention end of what they delete.
    let wm = state.join.watermark_ms(spec);
    let buf = &mut state.join.buffer;
    let seqs: Vec<u32> = buf.segments.keys().copied().collect();
    for q in seqs {
        let oldest = buf.segments.keys().next() == Some(&q);
        let reclaim = buf.segments.get(&q).is_some_and(|s| {
            s.live == 0 && s.markers_until.is_none_or(|until| oldest || wm.is_some_and(|w| w > until))
        });
        if reclaim {
            buf.segments.remove(&q);
            deletes.push(segment_key(p, q));
        }
    }
    // Held feedback written since the last save, in sequence order (the pending map is read
    // only when there is some: it may hold a million events).
    if !changes.held_written.is_empty() {
        let held: BTreeMap<u64, &Feedback> = state
            .join
            .pending
            .values()
            .flatten()
            .filter(|(s, _)| changes.held_written.contains(s))
            .map(|(s, f)| (*s, f))
            .collect();
        for (seq, f) in held {
            puts.push((held_key(p, seq), encode_held(seq, f)));
        }
    }
    deletes.extend(changes.held_deleted.iter().map(|s| held_key(p, *s)));
    deletes.extend(changes.models_retired.iter().map(|m| model_key(m, p)));
    deletes.extend(changes.keys_deleted.iter().cloned());
    let models = save_models(spec, state, false, &mut puts, &mut deletes);
    // Changelog values moved off the snapshot topic go first (anything written under the same
    // key comes after them). A value still on the snapshot topic that this save deletes (a
    // segment it reclaims) is deleted there and not written; the others wait for later saves.
    let mut moved = Vec::new();
    if !pending.is_empty() || !later.is_empty() {
        let gone: rustc_hash::FxHashSet<&str> = deletes.iter().map(String::as_str).collect();
        let mut front = Vec::with_capacity(pending.len() + puts.len());
        for (k, v) in pending {
            if !gone.contains(k.as_str()) {
                front.push((k.clone(), v));
            }
            moved.push(k);
        }
        let mut waiting = Vec::with_capacity(later.len());
        for (k, v) in later {
            if gone.contains(k.as_str()) {
                moved.push(k);
            } else {
                waiting.push((k, v));
            }
        }
        front.append(&mut puts);
        puts = front;
        if !waiting.is_empty() {
            state.join.changes.moved = waiting;
            state.join.changes.dirty = true;
        }
    }
    SavedPartition { header: header(spec, state), puts, deletes, moved, models }
}

/// The records for the whole state (the buffer in one segment), as for an empty store.
pub fn save_all(spec: &CoreSpec, state: &PartitionState) -> SavedPartition {
    let p = state.partition;
    let mut keys: Vec<Key> = state.join.buffer.entries().map(|e| e.key).collect();
    keys.sort_unstable();
    let seq = state.join.buffer.next_segment.saturating_sub(1);
    let slots: Vec<u32> = keys.iter().filter_map(|k| state.join.buffer.slot_of(*k)).collect();
    let mut puts = vec![(segment_key(p, seq), encode_segment(spec, &state.join, seq, &slots, &[]))];
    puts.extend(state.join.pending.values().flatten().map(|(s, f)| (held_key(p, *s), encode_held(*s, f))));
    puts.sort();
    let mut state_for_header = state.clone();
    state_for_header.join.buffer.next_segment = seq + 1;
    // The one segment written holds every entry.
    let only = super::buffer::SegmentUse {
        live: keys.len() as u32,
        written: keys.len() as u32,
        ..Default::default()
    };
    state_for_header.join.buffer.segments = BTreeMap::from([(seq, only)]);
    let mut deletes = Vec::new();
    let models = save_models(spec, &mut state_for_header, true, &mut puts, &mut deletes);
    SavedPartition { header: header(spec, &state_for_header), puts, deletes, moved: Vec::new(), models }
}
