//! A shard's arms on the snapshot topic as a changelog, so a save costs the arms that changed,
//! not the model's size.
//!
//! A shard is stored as a *head* under `model/<model>/<p>` (a `ModelSnapshot` of format 2:
//! everything but the arms, and an `ArmLog` naming where they are) and *arm segments* under
//! `model/<model>/<p>/<sequence>`: each save writes the arms changed since the previous save
//! as one zstd-compressed `ArmSegment`, in the same transaction as the head. A reader applies
//! the segments in sequence order (the newest version of an arm wins) and accepts the shard
//! only when the segments it holds are exactly the live ones the head names.
//!
//! Reclaiming, as for the attribution buffer's segments (`core::checkpoint`): a segment that
//! holds the newest version of no arm is deleted (tombstone) at the save that makes it so. An
//! arm that stops changing keeps its segment alive, so once the superseded versions outnumber
//! the live ones (plus [`COMPACTION_SLACK`]) the live arms of mostly superseded segments are
//! copied into a segment of their own (at most [`COPIES_PER_SAVE`] per save): the topic holds
//! at most about twice the arms, whatever the traffic's skew.
//!
//! Moving the decay landmark (every 64 half-lives) or changing the half-life rescales every
//! arm, so the save after it writes them all, and every older segment goes.

use std::collections::BTreeMap;

use prost::Message;

use super::checkpoint::{compress, decompress, escape_key_part, segments_digest, unescape_key_part};
use super::model::{ArmStats, HashMap, ModelShard};
use super::pb;
use super::snapshot::{self, DecodedSnapshot, SnapshotError};

/// `ArmStats::stored` of an arm never written to a segment.
pub const NEVER_STORED: u32 = 0;
/// `ArmStats::stored` of an arm changed since the last save (listed in [`ArmLog::dirty`]).
pub const CHANGED: u32 = u32::MAX;

/// Superseded arm versions tolerated beyond the live ones before live arms are copied forward.
pub const COMPACTION_SLACK: u64 = 4_096;
/// Arms copied out of mostly superseded segments per save.
pub const COPIES_PER_SAVE: usize = 50_000;

pub fn segment_key(model: &str, partition: i32, sequence: u32) -> String {
    format!("model/{}/{partition}/{sequence:010}", escape_key_part(model))
}

/// The model id, partition and sequence of a `model/<model>/<p>/<sequence>` key (`None` for
/// any other key, chunks included).
pub fn parse_segment_key(key: &str) -> Option<(String, i32, u32)> {
    let rest = key.strip_prefix("model/")?;
    if rest.contains('#') {
        return None;
    }
    let mut parts = rest.split('/');
    let (model, partition, sequence) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || sequence.len() != 10 {
        return None;
    }
    Some((unescape_key_part(model)?, partition.parse().ok()?, sequence.parse().ok()?))
}

/// How many arms a segment was written with, and of those how many it still holds the newest
/// version of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentUse {
    pub written: u32,
    pub live: u32,
}

/// A processor's bookkeeping of where its shard's arms are stored. Not state: two shards with
/// the same statistics are equal whatever they have stored.
#[derive(Debug, Clone, Default)]
pub struct ArmLog {
    /// The next segment's sequence (sequences start at 1).
    pub next: u32,
    /// Live segments.
    pub segments: BTreeMap<u32, SegmentUse>,
    /// Arms changed since the last save, each listed once (their `stored` is [`CHANGED`]).
    pub dirty: Vec<(String, String)>,
    /// Every arm is to be written (the decay was rescaled, or the shard was restored from a
    /// snapshot that held its arms inline).
    pub all_dirty: bool,
    /// Segments to delete at the next save although they are not empty: the arms of a model
    /// started afresh.
    pub retired: Vec<u32>,
}

impl ArmLog {
    pub fn new() -> ArmLog {
        ArmLog { next: 1, ..ArmLog::default() }
    }

    /// Notes that `arm` (of `segment`, `item`) changed.
    #[inline]
    pub fn touched(&mut self, arm: &mut ArmStats, segment: &str, item: &str) {
        if arm.stored == CHANGED {
            return;
        }
        if let Some(u) = self.segments.get_mut(&arm.stored) {
            u.live = u.live.saturating_sub(1);
        }
        arm.stored = CHANGED;
        if !self.all_dirty {
            self.dirty.push((segment.to_string(), item.to_string()));
        }
    }

    /// Every arm changed (a rescaled decay).
    pub fn all_changed(&mut self, arms: &mut HashMap<String, HashMap<String, ArmStats>>) {
        self.all_dirty = true;
        self.dirty = Vec::new();
        for u in self.segments.values_mut() {
            u.live = 0;
        }
        for a in arms.values_mut().flat_map(|m| m.values_mut()) {
            a.stored = CHANGED;
        }
    }

    /// What the head says about the stored arms.
    fn to_pb(&self, arms: usize) -> pb::ArmLog {
        pb::ArmLog {
            next_segment: self.next,
            live_segments: self.segments.len() as u32,
            first_live_segment: self.segments.keys().next().copied().unwrap_or(0),
            live_segments_digest: segments_digest(self.segments.keys().copied()),
            arms: arms as u64,
        }
    }
}

/// The snapshot-topic records of one shard's save: its head and the arm segments written and
/// deleted.
#[derive(Debug, Clone, Default)]
pub struct SavedShard {
    pub head: Vec<u8>,
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
    /// Arms written (changed and copied).
    pub arms_written: usize,
}

fn encode_segment(sequence: u32, arms: Vec<pb::ArmStats>) -> Vec<u8> {
    compress(&pb::ArmSegment { sequence, arms }.encode_to_vec())
}

pub fn decode_segment(bytes: &[u8]) -> Result<pb::ArmSegment, SnapshotError> {
    let raw = decompress(bytes, "arm segment")?;
    pb::ArmSegment::decode(raw.as_slice()).map_err(|e| SnapshotError::Decode(e.to_string()))
}

/// Saves what changed in `shard` since its last save: its changed arms (and copies out of
/// mostly superseded segments) in new segments, tombstones for the segments no arm needs any
/// more, and the head. The shard's log records where each arm now is.
pub fn save(
    spec: &super::params::ModelSpec,
    shard: &mut ModelShard,
    meta: &snapshot::SnapshotMeta,
) -> SavedShard {
    save_with(spec, shard, meta, None)
}

/// [`save`], for a merged model (`merged_from` set) as well as a shard.
pub fn save_with(
    spec: &super::params::ModelSpec,
    shard: &mut ModelShard,
    meta: &snapshot::SnapshotMeta,
    merged_from: Option<pb::MergedFrom>,
) -> SavedShard {
    let (model, p) = (meta.model_id.as_str(), meta.source_partition);
    // A shard saved for the first time: every arm is new.
    let mut log = shard.log.take().unwrap_or_else(|| Box::new(ArmLog { all_dirty: true, ..ArmLog::new() }));
    let mut out = SavedShard::default();
    let mut fresh: Vec<(String, String)> = if log.all_dirty {
        shard.arms.iter().flat_map(|(s, m)| m.keys().map(move |i| (s.clone(), i.clone()))).collect()
    } else {
        std::mem::take(&mut log.dirty)
    };
    log.all_dirty = false;
    log.dirty = Vec::new();
    fresh.sort_unstable();
    let copies = plan_copies(&mut log, shard);
    for keys in [fresh, copies] {
        if keys.is_empty() {
            continue;
        }
        let seq = log.next;
        log.next = log.next.saturating_add(1);
        let mut arms = Vec::with_capacity(keys.len());
        for (segment, item) in &keys {
            // A listed arm always exists: arms are never removed from a shard.
            if let Some(a) = shard.arms.get_mut(segment.as_str()).and_then(|m| m.get_mut(item.as_str())) {
                a.stored = seq;
                arms.push(snapshot::arm_to_pb(segment, item, a));
            }
        }
        let n = arms.len() as u32;
        out.arms_written += arms.len();
        log.segments.insert(seq, SegmentUse { written: n, live: n });
        out.puts.push((segment_key(model, p, seq), encode_segment(seq, arms)));
    }
    let empty: Vec<u32> = log.segments.iter().filter(|(_, u)| u.live == 0).map(|(q, _)| *q).collect();
    for q in empty.into_iter().chain(std::mem::take(&mut log.retired)) {
        log.segments.remove(&q);
        out.deletes.push(segment_key(model, p, q));
    }
    let arm_log = log.to_pb(shard.arm_count());
    out.head = match merged_from {
        Some(m) => snapshot::encode_merged_head(spec, shard, meta, arm_log, m),
        None => snapshot::encode_head(spec, shard, meta, arm_log),
    };
    shard.log = Some(log);
    out
}

/// Takes the stored state of `prev` (a merged model as last saved, with its log) over to
/// `next` (the same model merged again, never saved): an arm equal bit for bit to its saved
/// version keeps its place, every other arm is changed, so the next [`save`] writes only the
/// arms the merge changed. An arm of `prev` that `next` no longer has (a processor started the
/// model afresh) makes the save write every arm and delete every older segment, which drops
/// it for readers; so does a change of parameters (`same_params` false), after which every
/// arm's value may mean something else.
pub fn carry(prev: &mut ModelShard, next: &mut ModelShard, same_params: bool) {
    let Some(mut log) = prev.log.take() else {
        next.log = None;
        return;
    };
    let mut kept = 0usize;
    let mut dirty = Vec::new();
    for (segment, items) in next.arms.iter_mut() {
        let before = prev.arms.get(segment.as_str());
        for (item, a) in items.iter_mut() {
            match before.and_then(|m| m.get(item.as_str())) {
                Some(b) if b.stored != CHANGED && b.stored != NEVER_STORED && b.same_bits(a) => {
                    a.stored = b.stored;
                    kept += 1;
                }
                b => {
                    if let Some(u) = b.and_then(|b| log.segments.get_mut(&b.stored)) {
                        u.live = u.live.saturating_sub(1);
                    }
                    a.stored = CHANGED;
                    dirty.push((segment.clone(), item.clone()));
                }
            }
        }
    }
    // Every arm of `prev` is either kept or changed in `next` unless some went.
    let went = prev.arm_count() > kept + dirty.len() - dirty_new(prev, &dirty);
    if went || !same_params || log.all_dirty {
        log.retired.extend(std::mem::take(&mut log.segments).into_keys());
        log.all_dirty = true;
        log.dirty = Vec::new();
        for a in next.arms.values_mut().flat_map(|m| m.values_mut()) {
            a.stored = CHANGED;
        }
    } else {
        log.dirty = dirty;
    }
    next.log = Some(log);
}

/// How many of `dirty` are not arms of `prev` (new arms).
fn dirty_new(prev: &ModelShard, dirty: &[(String, String)]) -> usize {
    dirty
        .iter()
        .filter(|(s, i)| prev.arms.get(s.as_str()).is_none_or(|m| !m.contains_key(i.as_str())))
        .count()
}

/// Arms to copy forward (taken out of their segments) once superseded versions outnumber live
/// ones: the live arms of segments that hold fewer live arms than half of those written.
fn plan_copies(log: &mut ArmLog, shard: &mut ModelShard) -> Vec<(String, String)> {
    let (written, live) = log
        .segments
        .values()
        .fold((0u64, 0u64), |(w, l), u| (w + u64::from(u.written), l + u64::from(u.live)));
    if written.saturating_sub(live) <= live + COMPACTION_SLACK {
        return Vec::new();
    }
    let sparse: rustc_hash::FxHashSet<u32> =
        log.segments.iter().filter(|(_, u)| u.live > 0 && u.live * 2 < u.written).map(|(q, _)| *q).collect();
    let mut copies = Vec::new();
    for (segment, items) in shard.arms.iter_mut() {
        for (item, a) in items.iter_mut() {
            if copies.len() >= COPIES_PER_SAVE {
                break;
            }
            if sparse.contains(&a.stored) {
                if let Some(u) = log.segments.get_mut(&a.stored) {
                    u.live -= 1;
                }
                a.stored = CHANGED;
                copies.push((segment.clone(), item.clone()));
            }
        }
    }
    copies.sort_unstable();
    copies
}

/// The records of a whole shard as for an empty store (every arm in segment 1), without
/// touching its log.
pub fn save_whole(
    spec: &super::params::ModelSpec,
    shard: &ModelShard,
    meta: &snapshot::SnapshotMeta,
) -> SavedShard {
    let (model, p) = (meta.model_id.as_str(), meta.source_partition);
    let mut arms: Vec<pb::ArmStats> = shard
        .arms
        .iter()
        .flat_map(|(s, m)| m.iter().map(move |(i, a)| snapshot::arm_to_pb(s, i, a)))
        .collect();
    arms.sort_unstable_by(|a, b| (&a.segment, &a.item_id).cmp(&(&b.segment, &b.item_id)));
    let mut log = ArmLog::new();
    let mut out = SavedShard { arms_written: arms.len(), ..SavedShard::default() };
    if !arms.is_empty() {
        let n = arms.len() as u32;
        log.segments.insert(1, SegmentUse { written: n, live: n });
        log.next = 2;
        out.puts.push((segment_key(model, p, 1), encode_segment(1, arms)));
    }
    out.head = snapshot::encode_head(spec, shard, meta, log.to_pb(shard.arm_count()));
    out
}

/// Follows one shard's records (its arm segments and heads, in the order they were written)
/// and holds the newest shard whose head found exactly the segments it names: what a serving
/// node and a restore read.
#[derive(Debug, Default)]
pub struct ShardReader {
    /// The newest head with the arms read (`None` before the first head).
    current: Option<DecodedSnapshot>,
    /// Arms read before the first head.
    staged: HashMap<String, HashMap<String, ArmStats>>,
    /// Per segment held: arms written and live.
    uses: BTreeMap<u32, SegmentUse>,
    /// Segment values (decoded) and tombstones read since the last head, in order.
    pending: Vec<(u32, Option<pb::ArmSegment>)>,
    /// Whether `current` is the shard its head describes.
    complete: bool,
    /// Arms of a format-1 snapshot (held inline) not yet superseded by segments.
    inline_arms: bool,
    /// What changed since [`ShardReader::take_changes`] (only once [`ShardReader::track_changes`]
    /// asked for it): the arms applied, or every arm (arms went, or the shard was replaced).
    tracking: bool,
    changed: Vec<(String, String)>,
    changed_all: bool,
}

/// The arms a [`ShardReader`] applied since its changes were last taken.
#[derive(Debug, Default)]
pub struct ShardChanges {
    /// Arms may have gone or the whole shard was replaced: every arm may differ.
    pub all: bool,
    /// Arms written (each may be listed more than once).
    pub arms: Vec<(String, String)>,
}

impl ShardReader {
    /// Starts recording which arms change (for a merge that recomputes only those).
    pub fn track_changes(&mut self) {
        if !self.tracking {
            self.tracking = true;
            self.changed_all = true;
        }
    }

    /// The arms applied since the last call (everything, the first time).
    pub fn take_changes(&mut self) -> ShardChanges {
        ShardChanges { all: std::mem::take(&mut self.changed_all), arms: std::mem::take(&mut self.changed) }
    }

    /// A segment's value (`None`: its tombstone). Applied when the next head arrives.
    pub fn segment(&mut self, sequence: u32, value: Option<&[u8]>) -> Result<(), SnapshotError> {
        let seg = value.map(decode_segment).transpose()?;
        if let Some(s) = &seg {
            if s.sequence != sequence {
                return Err(SnapshotError::Invalid(format!(
                    "arm segment {} stored under sequence {sequence}",
                    s.sequence
                )));
            }
        }
        self.pending.push((sequence, seg));
        Ok(())
    }

    /// A head (or a format-1 snapshot holding its arms): applies the segments read since the
    /// previous head and checks that exactly the live segments it names are held. Until a head
    /// passes that check the shard is not [`complete`](ShardReader::complete).
    pub fn head(&mut self, head: DecodedSnapshot) -> Result<(), SnapshotError> {
        let Some(log) = head.arm_log else {
            // A whole shard (an older build's): it replaces everything.
            self.changed_all |= self.tracking;
            self.current = Some(head);
            self.staged = HashMap::default();
            self.uses.clear();
            self.pending.clear();
            self.complete = true;
            self.inline_arms = true;
            return Ok(());
        };
        let pending = std::mem::take(&mut self.pending);
        let mut arms = match self.current.as_mut() {
            Some(c) => std::mem::take(&mut c.shard.arms),
            None => std::mem::take(&mut self.staged),
        };
        let dim = snapshot::linear_dim(&head.spec);
        let mut applied = Ok(());
        // The segments written first, then the tombstones, as the processor's transaction has
        // them: a reader that got them in key order would otherwise see a segment deleted
        // before the segment that supersedes its arms, and drop arms only to add them again.
        let (puts, tombstones): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, seg)| seg.is_some());
        for (q, seg) in puts.into_iter().chain(tombstones) {
            applied = applied.and_then(|()| self.apply(&mut arms, q, seg, dim));
        }
        if std::mem::take(&mut self.inline_arms) {
            self.changed_all |= self.tracking;
            // Arms of the whole shard that no segment superseded are gone.
            for items in arms.values_mut() {
                items.retain(|_, a| a.stored != NEVER_STORED);
            }
            arms.retain(|_, m| !m.is_empty());
        }
        let mut next = head;
        next.shard.arm_total = arms.values().map(HashMap::len).sum();
        next.shard.arms = arms;
        let held: Vec<u32> = self.uses.keys().copied().collect();
        self.complete = applied.is_ok()
            && held.len() == log.live_segments as usize
            && segments_digest(held.iter().copied()) == log.live_segments_digest
            && next.shard.arm_total as u64 == log.arms
            && held.last().is_none_or(|q| *q < log.next_segment);
        let result = if let Err(e) = applied {
            Err(e)
        } else if self.complete {
            Ok(())
        } else {
            Err(SnapshotError::Missing(format!(
                "model `{}` partition {} version {}: the head names {} live arm segments from {} \
                 and {} arms; {} segments ({}) and {} arms were found",
                next.meta.model_id,
                next.meta.source_partition,
                next.meta.version,
                log.live_segments,
                log.first_live_segment,
                log.arms,
                held.len(),
                match (held.first(), held.last()) {
                    (Some(a), Some(b)) => format!("{a} … {b}"),
                    _ => "none".into(),
                },
                next.shard.arm_total
            )))
        };
        self.current = Some(next);
        result
    }

    /// Applies one segment (or its tombstone) to `arms`; an arm that does not fit the model
    /// (`linear_dim`) is an error and leaves the rest of the segment unapplied.
    fn apply(
        &mut self,
        arms: &mut HashMap<String, HashMap<String, ArmStats>>,
        q: u32,
        seg: Option<pb::ArmSegment>,
        linear_dim: usize,
    ) -> Result<(), SnapshotError> {
        let Some(seg) = seg else {
            // A tombstone: its segment normally holds no live arm by now; if it does (the
            // model was started afresh), those arms go.
            if self.uses.remove(&q).is_some_and(|u| u.live > 0) {
                self.changed_all |= self.tracking;
                for items in arms.values_mut() {
                    items.retain(|_, a| a.stored != q);
                }
                arms.retain(|_, m| !m.is_empty());
            }
            return Ok(());
        };
        self.uses.entry(q).or_default().written = seg.arms.len() as u32;
        for a in seg.arms {
            let (segment, item, stats) = snapshot::arm_from_pb(a, linear_dim, q)?;
            if self.tracking && !self.changed_all {
                self.changed.push((segment.clone(), item.clone()));
            }
            match arms.entry(segment).or_default().entry(item) {
                hashbrown::hash_map::Entry::Occupied(mut o) => {
                    let old = o.get().stored;
                    if old > q && old != CHANGED {
                        // An older segment read after a newer one: its version is superseded.
                        continue;
                    }
                    if let Some(u) = self.uses.get_mut(&old) {
                        u.live = u.live.saturating_sub(1);
                    }
                    o.insert(stats);
                }
                hashbrown::hash_map::Entry::Vacant(v) => {
                    v.insert(stats);
                }
            }
            if let Some(u) = self.uses.get_mut(&q) {
                u.live += 1;
            }
        }
        Ok(())
    }

    /// The shard, if its newest head found every segment it names.
    pub fn complete(&self) -> Option<&DecodedSnapshot> {
        self.current.as_ref().filter(|_| self.complete)
    }

    /// The shard and, for a processor, its log (where each arm is stored), if complete.
    pub fn into_shard(self) -> Option<DecodedSnapshot> {
        if !self.complete {
            return None;
        }
        let mut s = self.current?;
        if let Some(l) = &s.arm_log {
            let mut log = ArmLog::new();
            log.next = l.next_segment.max(1);
            log.segments = self.uses;
            s.shard.log = Some(Box::new(log));
        }
        Some(s)
    }

    /// Live segments held.
    pub fn live_segments(&self) -> impl Iterator<Item = u32> + '_ {
        self.uses.keys().copied()
    }
}

/// Assembles shards from stored values (key → value of a compacted topic) of `partition`:
/// each model's head and its arm segments in sequence order. A shard whose head does not find
/// its segments is an error naming what is missing.
pub fn assemble<'a>(
    partition: i32,
    values: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<DecodedSnapshot>, SnapshotError> {
    let mut heads: BTreeMap<String, &[u8]> = BTreeMap::new();
    let mut segments: BTreeMap<String, BTreeMap<u32, &[u8]>> = BTreeMap::new();
    for (key, value) in values {
        if let Some((m, p)) = super::checkpoint::parse_model_key(key) {
            if p == partition {
                heads.insert(m, value);
            }
        } else if let Some((m, p, q)) = parse_segment_key(key) {
            if p == partition {
                segments.entry(m).or_default().insert(q, value);
            }
        }
    }
    let mut out = Vec::with_capacity(heads.len());
    for (model, head) in heads {
        let mut r = ShardReader::default();
        for (q, v) in segments.remove(&model).unwrap_or_default() {
            r.segment(q, Some(v))?;
        }
        r.head(snapshot::decode(head)?)?;
        out.extend(r.into_shard());
    }
    Ok(out)
}
