//! Model shards on the snapshot topic as heads and arm segments (`core::armlog`): a save writes
//! the arms that changed, a reader that follows the records (as a serving node does) or reads
//! the compacted topic from the start (as a restore does) holds exactly the processor's shard,
//! superseded versions stay bounded, and a model started afresh takes its old arms with it.
//! The oracle for "what changed" is the events themselves: the items they placed or clicked.

use std::collections::{BTreeMap, BTreeSet};

use banditflow::core::armlog::{self, ShardReader};
use banditflow::core::checkpoint::{self, SavedPartition};
use banditflow::core::event::{Event, FeedbackKind, Variant};
use banditflow::core::params::CoreSpec;
use banditflow::core::partition::PartitionState;
use banditflow::core::snapshot::{self, SnapshotError};

use crate::support::*;

/// The snapshot topic's partition 0 as records in the order a transaction writes them.
#[derive(Default)]
struct Log {
    records: Vec<(String, Option<Vec<u8>>)>,
}

impl Log {
    fn append(&mut self, saved: &SavedPartition) {
        for (k, v) in &saved.puts {
            self.records.push((k.clone(), Some(v.clone())));
        }
        for k in &saved.deletes {
            self.records.push((k.clone(), None));
        }
        self.records.push((checkpoint::header_key(0), Some(saved.header.clone())));
        for (m, v) in &saved.models {
            self.records.push((checkpoint::model_key(m, 0), Some(v.clone())));
        }
    }

    /// What log compaction leaves: the newest record of each key at its offset, tombstones
    /// gone (past `delete.retention.ms`).
    fn compacted(&self) -> Log {
        let last: BTreeMap<&str, usize> =
            self.records.iter().enumerate().map(|(i, (k, _))| (k.as_str(), i)).collect();
        let records = self
            .records
            .iter()
            .enumerate()
            .filter(|(i, (k, v))| last[k.as_str()] == *i && v.is_some())
            .map(|(_, r)| r.clone())
            .collect();
        Log { records }
    }

    fn latest(&self) -> BTreeMap<String, Vec<u8>> {
        self.compacted().records.into_iter().filter_map(|(k, v)| Some((k, v?))).collect()
    }
}

/// One reader per model, fed the records from `from` on, in order.
#[derive(Default)]
struct Follower {
    readers: BTreeMap<String, ShardReader>,
    read: usize,
}

impl Follower {
    fn follow(&mut self, log: &Log) {
        for (key, value) in &log.records[self.read..] {
            if let Some((m, _, q)) = armlog::parse_segment_key(key) {
                self.readers.entry(m).or_default().segment(q, value.as_deref()).expect("a segment decodes");
            } else if let Some((m, _)) = checkpoint::parse_model_key(key) {
                let head = snapshot::decode(value.as_deref().expect("heads are never deleted here"))
                    .expect("a head decodes");
                self.readers.entry(m).or_default().head(head).expect("the head finds its segments");
            }
        }
        self.read = log.records.len();
    }

    fn assert_holds(&self, spec: &CoreSpec, state: &PartitionState, what: &str) {
        for (m, shard) in spec.models.iter().zip(&state.models) {
            let got = self.readers[&m.id].complete().unwrap_or_else(|| panic!("{what}: {} incomplete", m.id));
            assert!(&got.shard == shard, "{what}: model {} differs from the processor's shard", m.id);
        }
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const ITEMS: u64 = 3_000;
const HOT: u64 = 20;

/// Skewed traffic: a slate of one of 20 hot items and two of 3,000; a click on one item in
/// four. Event time advances 3 minutes per impression, so the run crosses the decay landmark
/// of the 1-day half-life (every 64 days).
fn traffic(n: usize) -> Vec<Event> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(n * 2);
    for i in 0..n {
        let t = T0 + i as i64 * 3 * MIN;
        let id = format!("imp-{i}");
        let items = [
            format!("hot-{}", rng.below(HOT)),
            format!("it-{}", rng.below(ITEMS)),
            format!("it-{}", rng.below(ITEMS)),
        ];
        if items[1] == items[2] {
            continue;
        }
        let refs: Vec<&str> = items.iter().map(String::as_str).collect();
        for m in ["pbm", "lin", "est"] {
            let imp = impression(&format!("{id}-{m}"), m, t, Variant::Treatment, "s", &refs);
            out.push(Event::Impression(imp));
        }
        if rng.below(4) == 0 {
            let pos = rng.below(3) as usize;
            for m in ["pbm", "lin", "est"] {
                let f =
                    feedback(&format!("{id}-{m}"), &items[pos], pos as u32 + 1, FeedbackKind::Click, t + 1);
                out.push(Event::Feedback(f));
            }
        }
    }
    out
}

/// The (segment, item) arms of model `pbm` the events place or click.
fn touched(events: &[Event]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for e in events {
        match e {
            Event::Impression(i) if i.model_id == "pbm" => {
                out.extend(i.slate.iter().map(|s| (i.segment.clone(), s.item_id.clone())));
            }
            Event::Feedback(f) if f.impression_id.ends_with("-pbm") => {
                out.insert(("s".into(), f.item_id.clone()));
            }
            _ => {}
        }
    }
    out
}

/// The arms of the first arm segment `saved` writes for `model`.
fn fresh_arms(saved: &SavedPartition, model: &str) -> Option<BTreeSet<(String, String)>> {
    let (_, v) =
        saved.puts.iter().find(|(k, _)| armlog::parse_segment_key(k).is_some_and(|(m, _, _)| m == model))?;
    let seg = armlog::decode_segment(v).expect("decodes");
    Some(seg.arms.into_iter().map(|a| (a.segment, a.item_id)).collect())
}

#[test]
fn a_save_writes_what_changed_and_every_reader_holds_the_processors_shard() {
    let spec = unbounded_spec();
    let events = traffic(30_000);
    let mut state = PartitionState::new(&spec, 0);
    let mut log = Log::default();
    let mut follower = Follower::default();
    let (mut saves, mut rescaled, mut copied) = (0, 0, 0);
    let mut later_bytes = Vec::new();
    for (n, chunk) in events.chunks(60).enumerate() {
        let landmark = state.models[0].landmark_ms;
        for (i, e) in chunk.iter().enumerate() {
            apply_event(&mut state, &spec, e, (n * 60 + i) as i64, None);
        }
        let saved = checkpoint::save_changes(&spec, &mut state);
        saves += 1;
        let arm_bytes: usize = saved
            .puts
            .iter()
            .filter(|(k, _)| armlog::parse_segment_key(k).is_some())
            .map(|(_, v)| v.len())
            .sum();
        // What the first segment of `pbm` holds: exactly the arms these events touched, or
        // every arm when the decay landmark moved (every decayed sum was rescaled).
        let fresh = fresh_arms(&saved, "pbm").unwrap_or_default();
        if state.models[0].landmark_ms != landmark && landmark.is_some() {
            rescaled += 1;
            assert_eq!(fresh.len(), state.models[0].arm_count(), "save {saves}: a rescale writes every arm");
        } else {
            assert_eq!(fresh, touched(chunk), "save {saves}: the arms written are the arms touched");
        }
        if n > 20 {
            later_bytes.push(arm_bytes);
        }
        let pbm = saved
            .puts
            .iter()
            .filter(|(k, _)| armlog::parse_segment_key(k).is_some_and(|(m, _, _)| m == "pbm"));
        if pbm.count() == 2 {
            copied += 1;
        }
        // Superseded versions stay bounded: at most about twice the arms.
        for (m, shard) in spec.models.iter().zip(&state.models) {
            let l = shard.log.as_ref().expect("a saved shard has a log");
            let written: u64 = l.segments.values().map(|u| u64::from(u.written)).sum();
            let live: u64 = l.segments.values().map(|u| u64::from(u.live)).sum();
            assert_eq!(live, shard.arm_count() as u64, "save {saves}: every arm of {} is live once", m.id);
            assert!(
                written <= 2 * live + armlog::COMPACTION_SLACK + 400,
                "save {saves}: {} holds {written} versions of {live} arms",
                m.id
            );
        }
        log.append(&saved);
        follower.follow(&log);
        follower.assert_holds(&spec, &state, &format!("follower at save {saves}"));
        if saves % 50 == 0 {
            let mut fresh = Follower::default();
            fresh.follow(&log.compacted());
            fresh.assert_holds(&spec, &state, &format!("reader of the compacted topic at save {saves}"));
        }
    }
    assert!(rescaled >= 1, "the run crosses a decay landmark");
    assert!(copied >= 1, "the run copies arms out of superseded segments");
    let arms = state.models[0].arm_count();
    assert!(arms > 2_500, "{arms} arms");
    // A save that touches ~50 arms per model writes a few kilobytes, not the model.
    later_bytes.sort_unstable();
    let median = later_bytes[later_bytes.len() / 2];
    let whole: usize = checkpoint::save_all(&spec, &state)
        .puts
        .iter()
        .filter(|(k, _)| armlog::parse_segment_key(k).is_some())
        .map(|(_, v)| v.len())
        .sum();
    assert!(median * 20 < whole, "median save {median} bytes against {whole} for the whole models");
    // The shard assembled from the compacted topic encodes to the bytes of the processor's.
    let latest = log.latest();
    let shards =
        armlog::assemble(0, latest.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).expect("assembles");
    assert_eq!(shards.len(), spec.models.len());
    for (m, shard) in spec.models.iter().zip(&state.models) {
        let s = shards.iter().find(|s| s.meta.model_id == m.id).expect("assembled");
        let meta = checkpoint::shard_meta(&spec, &state, &m.id);
        let same = snapshot::encode(&s.spec, &s.shard, &s.meta) == snapshot::encode(m, shard, &meta);
        assert!(same, "model {}: the assembled shard encodes to other bytes", m.id);
    }
}

#[test]
fn a_model_started_afresh_takes_its_arms_with_it_and_a_missing_segment_is_named() {
    let spec = unbounded_spec();
    let events = traffic(2_000);
    let mut state = PartitionState::new(&spec, 0);
    let mut log = Log::default();
    for (n, chunk) in events.chunks(100).enumerate() {
        for (i, e) in chunk.iter().enumerate() {
            apply_event(&mut state, &spec, e, (n * 100 + i) as i64, None);
        }
        log.append(&checkpoint::save_changes(&spec, &mut state));
    }
    let mut follower = Follower::default();
    follower.follow(&log);
    let old: Vec<String> = log
        .latest()
        .keys()
        .filter(|k| armlog::parse_segment_key(k).is_some_and(|(m, _, _)| m == "pbm"))
        .cloned()
        .collect();
    assert!(!old.is_empty());

    // A changed reward scale starts `pbm` afresh: its next save deletes every old segment.
    let mut changed = spec.clone();
    changed.models[0].rewards.scale = 4.0;
    let store = log.latest();
    let h = &store[&checkpoint::header_key(0)];
    let models =
        armlog::assemble(0, store.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).expect("assembles");
    let pick = |prefix: &str| -> Vec<Vec<u8>> {
        store.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect()
    };
    let (mut restored, report) =
        checkpoint::restore(&changed, h, &pick("buf/"), &[], &pick("held/"), &models).expect("restores");
    assert_eq!(report[0].1.code(), "reset");
    let next = checkpoint::save_changes(&changed, &mut restored);
    let mut deleted: Vec<String> =
        next.deletes.iter().filter(|k| armlog::parse_segment_key(k).is_some()).cloned().collect();
    deleted.sort();
    assert_eq!(deleted, old, "the reset model's segments are deleted");
    log.append(&next);
    follower.follow(&log);
    follower.assert_holds(&changed, &restored, "after the reset");
    assert_eq!(follower.readers["pbm"].complete().map(|s| s.shard.arm_count()), Some(0));
    assert!(follower.readers["lin"].complete().is_some_and(|s| s.shard.arm_count() > 2_000));

    // A live segment missing from the topic (a `delete` cleanup policy) is named, not skipped.
    let mut store = log.latest();
    let lost = store
        .keys()
        .find(|k| armlog::parse_segment_key(k).is_some_and(|(m, _, _)| m == "lin"))
        .cloned()
        .expect("a segment of lin");
    store.remove(&lost);
    let err =
        armlog::assemble(0, store.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).expect_err("refused");
    assert!(matches!(&err, SnapshotError::Missing(m) if m.contains("model `lin`")), "{err}");
}

/// The aggregator's write path (`armlog::carry` then `armlog::save_with`) against the offline
/// merge: three partitions learn skewed traffic; after every round their shards are merged,
/// the merged model is saved as the aggregator saves it, and a reader of those records (and
/// one of the compacted log) must hold the offline merge, byte for byte. Arms written per
/// round must be those whose merged value changed (the arms touched), except when the decay
/// landmark moved (every arm), or when arms went (a round merging two partitions only).
#[test]
fn the_merged_model_is_written_as_what_changed_and_read_back_as_the_offline_merge() {
    let spec = unbounded_spec();
    let events = traffic(6_000);
    let mut states: Vec<PartitionState> = (0..3).map(|p| PartitionState::new(&spec, p)).collect();
    let mut written: BTreeMap<String, snapshot::DecodedSnapshot> = BTreeMap::new();
    let mut log = Log::default();
    let mut follower = Follower::default();
    let (mut rounds, mut rewritten, mut partial, mut incremental) = (0, 0, 0, 0);
    // The merge recomputed only where an arm changed (`merge_heads` + `merge_arm`), per model.
    let mut inc: BTreeMap<String, snapshot::DecodedSnapshot> = BTreeMap::new();
    let mut before_round: Vec<Vec<banditflow::core::model::ModelShard>> =
        states.iter().map(|s| s.models.clone()).collect();
    let mut parts_before = 3;
    for (n, chunk) in events.chunks(150).enumerate() {
        for (i, e) in chunk.iter().enumerate() {
            // Partition by impression (an impression and its feedback together).
            let id = match e {
                Event::Impression(imp) => &imp.impression_id,
                Event::Feedback(f) => &f.impression_id,
            };
            let p = (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % 3) as usize;
            apply_event(&mut states[p], &spec, e, (n * 150 + i) as i64, None);
        }
        rounds += 1;
        // Every 40th round merges partitions 0 and 1 only: the arms only partition 2 holds go.
        let merged_parts = if n % 40 == 39 { 2 } else { 3 };
        partial += usize::from(merged_parts == 2);
        for (mi, m) in spec.models.iter().enumerate() {
            let shards = shards_of(&spec, &states[..merged_parts], mi);
            let offline = snapshot::merge(&shards).expect("merges");
            // The incremental merge: the arms any shard changed this round, folded again.
            let refs: Vec<&snapshot::DecodedSnapshot> = shards.iter().collect();
            let landmarks_before: Vec<Option<i64>> =
                before_round[..merged_parts].iter().map(|ms| ms[mi].landmark_ms).collect();
            let landmarks_now: Vec<Option<i64>> = shards.iter().map(|s| s.shard.landmark_ms).collect();
            match inc.remove(&m.id) {
                Some(mut prev) if merged_parts == parts_before && landmarks_before == landmarks_now => {
                    let mut keys = BTreeSet::new();
                    for (p, s) in shards.iter().enumerate() {
                        for (seg, items) in &s.shard.arms {
                            for (item, a) in items {
                                let old = before_round[p][mi].arms.get(seg).and_then(|x| x.get(item));
                                if old.is_none_or(|o| !o.same_bits(a)) {
                                    keys.insert((seg.clone(), item.clone()));
                                }
                            }
                        }
                    }
                    let mut head = snapshot::merge_heads(&refs).expect("merges");
                    let groups = snapshot::merge_groups(&refs);
                    for (seg, item) in keys {
                        match snapshot::merge_arm(&groups, &seg, &item) {
                            Some(a) => {
                                prev.shard.arms.entry(seg).or_default().insert(item, a);
                            }
                            None => {
                                prev.shard.arms.get_mut(&seg).map(|x| x.remove(&item));
                            }
                        }
                    }
                    head.shard.arms = std::mem::take(&mut prev.shard.arms);
                    head.shard.arm_total = head.shard.arms.values().map(|x| x.len()).sum();
                    let same = snapshot::encode(&head.spec, &head.shard, &head.meta)
                        == snapshot::encode(&offline.spec, &offline.shard, &offline.meta);
                    assert!(same, "round {rounds}: the incremental merge of {} differs from the merge", m.id);
                    assert_eq!(head.merged_from, offline.merged_from);
                    incremental += 1;
                    inc.insert(m.id.clone(), head);
                }
                _ => {
                    inc.insert(m.id.clone(), offline.clone());
                }
            }
            let mut next = offline.clone();
            next.shard.log = None;
            let before = written.get(&m.id).map(|w| (w.shard.landmark_ms, w.shard.clone()));
            if let Some(prev) = written.get_mut(&m.id) {
                armlog::carry(&mut prev.shard, &mut next.shard, true);
            }
            let from = next.merged_from.clone().expect("a merge names its shards");
            assert_eq!(from.partitions, (0..merged_parts as i32).collect::<Vec<_>>());
            let saved = armlog::save_with(&next.spec, &mut next.shard, &next.meta, Some(from.clone()));
            // Which arms the save wrote: exactly those whose merged value changed (bit for bit),
            // or all of them when the landmark moved or arms went.
            if let Some((landmark, prev)) = before {
                let changed: usize = offline
                    .shard
                    .arms
                    .iter()
                    .flat_map(|(s, items)| items.iter().map(move |(i, a)| (s, i, a)))
                    .filter(|(s, i, a)| {
                        prev.arms
                            .get(s.as_str())
                            .and_then(|x| x.get(i.as_str()))
                            .is_none_or(|b| !b.same_bits(a))
                    })
                    .count();
                let went = prev.arm_count()
                    > offline.shard.arm_count() - (changed - changed_existing(&prev, &offline));
                if landmark != offline.shard.landmark_ms || went {
                    rewritten += 1;
                    assert_eq!(saved.arms_written, offline.shard.arm_count(), "round {rounds}: every arm");
                } else {
                    assert_eq!(
                        saved.arms_written, changed,
                        "round {rounds} ({}): the arms that changed",
                        m.id
                    );
                    // Between landmarks an untouched arm keeps its bits: what changed is what
                    // the round's events touched.
                    // (Not after a partial round: partition 2's arms come back.)
                    if m.id == "pbm" && n % 40 != 0 {
                        assert_eq!(changed, touched(chunk).len(), "round {rounds}: the arms touched");
                    }
                }
            }
            for (k, v) in &saved.puts {
                log.records.push((k.clone(), Some(v.clone())));
            }
            for k in &saved.deletes {
                log.records.push((k.clone(), None));
            }
            log.records.push((checkpoint::model_key(&m.id, -1), Some(saved.head.clone())));
            next.meta.source_partition = -1;
            written.insert(m.id.clone(), next);
        }
        before_round = states.iter().map(|s| s.models.clone()).collect();
        parts_before = merged_parts;
        follower.follow(&log);
        let check = |f: &Follower, what: &str| {
            for (mi, m) in spec.models.iter().enumerate() {
                let got =
                    f.readers[&m.id].complete().unwrap_or_else(|| panic!("{what}: {} incomplete", m.id));
                let shards = shards_of(&spec, &states[..merged_parts], mi);
                let offline = snapshot::merge(&shards).expect("merges");
                // What a serving node does with it: merge the one merged shard.
                let node = snapshot::merge(std::slice::from_ref(got)).expect("merges");
                let want = snapshot::encode(&offline.spec, &offline.shard, &offline.meta);
                assert!(
                    snapshot::encode(&node.spec, &node.shard, &node.meta) == want,
                    "{what}: model {} differs from the offline merge",
                    m.id
                );
                assert_eq!(node.merged_from, offline.merged_from, "{what}: {}", m.id);
            }
        };
        check(&follower, &format!("follower at round {rounds}"));
        if rounds % 30 == 0 {
            let mut fresh = Follower::default();
            fresh.follow(&log.compacted());
            check(&fresh, &format!("reader of the compacted topic at round {rounds}"));
        }
    }
    assert!(partial >= 2 && rewritten >= partial, "{partial} partial merges, {rewritten} rewrites");
    assert!(incremental > 300, "{incremental} incremental merges");
}

/// Model `mi`'s shard of each of `states`, as the snapshot topic would hold them.
fn shards_of(spec: &CoreSpec, states: &[PartitionState], mi: usize) -> Vec<snapshot::DecodedSnapshot> {
    let m = &spec.models[mi];
    states
        .iter()
        .map(|st| snapshot::DecodedSnapshot {
            meta: checkpoint::shard_meta(spec, st, &m.id),
            spec: m.clone(),
            shard: st.models[mi].clone(),
            legacy: None,
            arm_log: None,
            merged_from: None,
        })
        .collect()
}

/// How many of the arms of `next` that differ from `prev` exist in `prev`.
fn changed_existing(prev: &banditflow::core::model::ModelShard, next: &snapshot::DecodedSnapshot) -> usize {
    next.shard
        .arms
        .iter()
        .flat_map(|(s, items)| items.iter().map(move |(i, a)| (s, i, a)))
        .filter(|(s, i, a)| {
            prev.arms.get(s.as_str()).and_then(|x| x.get(i.as_str())).is_some_and(|b| !b.same_bits(a))
        })
        .count()
}

/// `merge_arm` is `ModelShard::merge`'s arithmetic for one arm, including when the shards'
/// decay landmarks differ (the accumulator is rescaled as a later landmark arrives): shards
/// learned 0, 70 and 140 days apart (the 1-day half-life's landmark moves every 64 days),
/// merged in an order that rescales both the accumulator and the shards added.
#[test]
fn one_arm_merged_alone_equals_the_whole_merge_across_decay_landmarks() {
    let spec = unbounded_spec();
    let events = traffic(900);
    let offsets = [70 * DAY, 0, 250 * DAY, 0];
    let states: Vec<PartitionState> = offsets
        .iter()
        .enumerate()
        .map(|(p, shift)| {
            let mut st = PartitionState::new(&spec, p as i32);
            for (i, e) in events.iter().enumerate().filter(|(i, _)| i % 4 == p) {
                let mut e = e.clone();
                match &mut e {
                    Event::Impression(imp) => imp.time_ms += shift,
                    Event::Feedback(f) => f.time_ms += shift,
                }
                apply_event(&mut st, &spec, &e, i as i64, None);
            }
            st
        })
        .collect();
    let mut decaying = 0;
    for (mi, m) in spec.models.iter().enumerate() {
        let landmarks: BTreeSet<Option<i64>> = states.iter().map(|s| s.models[mi].landmark_ms).collect();
        let each: Vec<Option<i64>> = states.iter().map(|s| s.models[mi].landmark_ms).collect();
        if m.half_life_ms > 0 {
            assert_eq!(landmarks.len(), 3, "model {}: three landmarks: {each:?}", m.id);
            decaying += 1;
        }
        let mut whole = banditflow::core::model::ModelShard::new(m);
        for st in &states {
            whole.merge(m, &st.models[mi]);
        }
        let mut arms = 0;
        for (seg, items) in &whole.arms {
            for (item, a) in items {
                let one =
                    banditflow::core::model::merge_arm(m, states.iter().map(|s| &s.models[mi]), seg, item)
                        .expect("the arm is held");
                assert!(one.same_bits(a), "model {} arm {seg}/{item}", m.id);
                arms += 1;
            }
        }
        assert!(arms > 500, "{arms} arms");
    }
    assert!(decaying >= 1, "a decaying model");
}

/// The merge is a tree of groups of `snapshot::MERGE_GROUP` partitions: 40 partitions (three
/// groups; decay landmarks 0, 70 and 250 days apart within and between groups) merged at once
/// equal, byte for byte, the merge of each group's merge, which is what an aggregation divided
/// by group computes; in any order the shards are given. Every arm computed alone
/// (`snapshot::merge_arm`) equals the whole merge's, and one group's merge is the plain fold of
/// its shards in partition order (so up to 16 partitions the merge is what it always was).
#[test]
fn the_merge_of_the_groups_merges_equals_the_merge_of_every_shard() {
    use banditflow::core::model::ModelShard;
    let spec = unbounded_spec();
    let n = 40;
    assert_eq!(snapshot::MERGE_GROUP, 16);
    let events = traffic(6_000);
    let shift = |p: usize| match p % 7 {
        0 => 70 * DAY,
        3 => 250 * DAY,
        _ => 0,
    };
    let states: Vec<PartitionState> = (0..n)
        .map(|p| {
            let mut st = PartitionState::new(&spec, p as i32);
            for (i, e) in events.iter().enumerate().filter(|(i, _)| i % n == p) {
                let mut e = e.clone();
                match &mut e {
                    Event::Impression(imp) => imp.time_ms += shift(p),
                    Event::Feedback(f) => f.time_ms += shift(p),
                }
                apply_event(&mut st, &spec, &e, i as i64, None);
            }
            st
        })
        .collect();
    let enc = |d: &snapshot::DecodedSnapshot| snapshot::encode(&d.spec, &d.shard, &d.meta);
    let mut order_mattered = 0;
    for (mi, m) in spec.models.iter().enumerate() {
        let shards = shards_of(&spec, &states, mi);
        let refs: Vec<&snapshot::DecodedSnapshot> = shards.iter().collect();
        let whole = snapshot::merge_refs(&refs).expect("merges");
        assert_eq!(whole.merged_from.as_ref().map(|f| f.partitions.len()), Some(n));
        // Divided by group, then the groups' merges merged (given in reverse, too).
        let groups: Vec<snapshot::DecodedSnapshot> =
            refs.chunks(16).map(|g| snapshot::merge_refs(g).expect("group merges")).collect();
        assert_eq!(groups.len(), 3);
        let staged = snapshot::merge(&groups).expect("merges");
        assert!(enc(&staged) == enc(&whole), "model {}: the merge of the groups' merges differs", m.id);
        assert_eq!(staged.merged_from, whole.merged_from);
        let reversed: Vec<snapshot::DecodedSnapshot> = groups.iter().rev().cloned().collect();
        assert!(
            enc(&snapshot::merge(&reversed).expect("merges")) == enc(&whole),
            "model {}: given in reverse",
            m.id
        );
        let shuffled: Vec<&snapshot::DecodedSnapshot> = (0..n).map(|i| refs[(i * 17 + 5) % n]).collect();
        assert!(
            enc(&snapshot::merge_refs(&shuffled).expect("merges")) == enc(&whole),
            "model {}: shuffled",
            m.id
        );
        // One group is the plain fold of its shards in partition order.
        let mut fold = ModelShard::new(m);
        for st in &states[16..32] {
            fold.merge(m, &st.models[mi]);
        }
        assert!(
            snapshot::encode(m, &fold, &groups[1].meta) == enc(&groups[1]),
            "model {}: a group is the plain fold",
            m.id
        );
        // Every arm alone, as the incremental merge computes it; and where a plain fold of all
        // 40 shards would have given other bits (the data makes the order of additions matter).
        let mut flat = ModelShard::new(m);
        for st in &states {
            flat.merge(m, &st.models[mi]);
        }
        let mut arms = 0;
        let tree = snapshot::merge_groups(&shuffled);
        assert_eq!(tree.iter().map(Vec::len).collect::<Vec<_>>(), [16, 16, 8]);
        for (seg, items) in &whole.shard.arms {
            for (item, a) in items {
                let one = snapshot::merge_arm(&tree, seg, item).expect("the arm is held");
                assert!(one.same_bits(a), "model {} arm {seg}/{item}", m.id);
                arms += 1;
                order_mattered += usize::from(!flat.arms[seg][item].same_bits(a));
            }
        }
        assert!(arms > 500, "{arms} arms");
    }
    assert!(order_mattered > 0, "no arm's bits depend on the order of additions: the test shows nothing");
}
