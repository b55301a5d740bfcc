//! `banditflow aggregate`: the merged-model stage. It follows the snapshot topic as a serving
//! node does (every partition's shard of every model, `read_committed`), merges each changed
//! model in `snapshot::merge`'s order (so the result is the offline merge of the same
//! shards, byte for byte) and writes it to the merged-model topic (`kafka.merged_topic`, one
//! compacted partition) as a head `model/<model>/-1` and arm segments
//! `model/<model>/-1/<sequence>` holding only the merged arms whose value changed since its
//! last write (`armlog::carry`), in one transaction per turn. Serving nodes with
//! `serving.read_merged` read that topic instead: they hold one merged model, not one shard
//! per partition.
//!
//! The P × arms state is held here, once, instead of on every node. A model is written only
//! once the snapshot topic has been read to the end it had at start and the merge covers every
//! partition that holds state (`checkpoint/<p>`), so a restarting aggregator never publishes a
//! merge of some of the partitions. Its own state (where each merged arm is stored) is read
//! back from the merged topic at start; a failed session (a transaction, the subscriber) is
//! rebuilt from the two topics. One aggregator runs per group: its transactional id
//! `<group_id>-aggregator` fences an older one.
//!
//! Divided by partition group ([`Stage`]) when one process cannot hold P × arms: an aggregator
//! per group of `snapshot::MERGE_GROUP` partitions (`--group K`) reads only those partitions of
//! the snapshot topic and writes their merge to the groups topic (`kafka.groups_topic`) as
//! shard `16K`, with a marker `checkpoint/<p>` per partition of its group that holds state;
//! one more (`--from-groups`) merges the group merges into the merged-model topic, exactly as
//! the single aggregator would (the merge is a tree of those groups).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::{Config, KafkaSpec};
use crate::core::armlog::{self, ShardReader};
use crate::core::blob;
use crate::core::checkpoint;
use crate::core::snapshot::{self, DecodedSnapshot};
use crate::serving::subscriber::{Merged, Subscriber};
use crate::telemetry::processor::{AggregateFailed, AggregatorStarted, MergedPublished};

use super::probes::Health;
use super::reader::Keys;

/// The merged-model topic's (and the groups topic's) one partition.
const PARTITION: i32 = 0;
/// A merged model's "source partition" in its keys and head.
pub const MERGED: i32 = -1;

/// Which merge an aggregator computes, from which topic into which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Every partition's shard, from the snapshot topic into the merged-model topic.
    Whole,
    /// The shards of partition group `k` (partitions `16k … 16k + 15`, `snapshot::MERGE_GROUP`),
    /// from the snapshot topic into the groups topic, as shard `16k`.
    Group(i32),
    /// The group merges, from the groups topic into the merged-model topic.
    FromGroups,
}

impl Stage {
    /// `--group K`: a group whose partitions are all partition numbers.
    pub fn group(k: i64) -> anyhow::Result<Stage> {
        let g = i64::from(snapshot::MERGE_GROUP);
        let last = i64::from(i32::MAX) / g - 1;
        if (0..=last).contains(&k) {
            Ok(Stage::Group(k as i32))
        } else {
            Err(anyhow!("--group {k}: from 0 to {last} (group k holds partitions {g}·k … {g}·k + {})", g - 1))
        }
    }

    fn input(self, k: &KafkaSpec) -> &str {
        match self {
            Stage::Whole | Stage::Group(_) => &k.snapshot_topic,
            Stage::FromGroups => &k.groups_topic,
        }
    }

    fn output(self, k: &KafkaSpec) -> &str {
        match self {
            Stage::Whole | Stage::FromGroups => &k.merged_topic,
            Stage::Group(_) => &k.groups_topic,
        }
    }

    /// The "source partition" its merges are written under.
    fn shard(self) -> i32 {
        match self {
            Stage::Group(g) => g * snapshot::MERGE_GROUP,
            Stage::Whole | Stage::FromGroups => MERGED,
        }
    }

    /// The partitions of the input it reads (all when `None`).
    fn partitions(self) -> Option<std::ops::Range<i32>> {
        match self {
            Stage::Group(g) => Some(g * snapshot::MERGE_GROUP..(g + 1) * snapshot::MERGE_GROUP),
            Stage::Whole | Stage::FromGroups => None,
        }
    }

    /// One writer per stage and consumer group: a second one fences the first. `Whole` and
    /// `FromGroups` both write the merged-model topic and share theirs.
    fn transactional_id(self, k: &KafkaSpec) -> String {
        match self {
            Stage::Group(g) => format!("{}-aggregator-group-{g}", k.group_id),
            Stage::Whole | Stage::FromGroups => format!("{}-aggregator", k.group_id),
        }
    }
}

/// Runs the aggregator until `shutdown`; a failed session is logged, counted and started again.
pub fn run(
    config: Arc<Config>,
    stage: Stage,
    shutdown: Arc<AtomicBool>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    AggregatorStarted.emit();
    prepare_topic(&config, stage)?;
    let mut backoff = Duration::from_millis(500);
    while !shutdown.load(Ordering::SeqCst) {
        match session(&config, stage, &shutdown, &health) {
            Ok(()) => break,
            Err(e) => {
                AggregateFailed { error: &e }.emit();
                health.set_ready(false, &format!("restarting after: {e:#}"));
                let until = Instant::now() + backoff;
                while Instant::now() < until && !shutdown.load(Ordering::SeqCst) {
                    health.progress();
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    Ok(())
}

/// Creates the topic written (compacted, one partition) when it is missing and
/// `kafka.create_topics` allows.
fn prepare_topic(config: &Config, stage: Stage) -> anyhow::Result<()> {
    let k = &config.kafka;
    if !k.create_topics {
        return Ok(());
    }
    let topic = stage.output(k);
    super::admin::create_topics_with(config, &[(topic, 1, true)])
        .with_context(|| format!("creating the aggregator's topic `{topic}`"))
}

/// What the aggregator last wrote of one model: the merged model with its arm log.
type Written = BTreeMap<String, DecodedSnapshot>;

fn session(
    config: &Arc<Config>,
    stage: Stage,
    shutdown: &AtomicBool,
    health: &Arc<Health>,
) -> anyhow::Result<()> {
    let k = &config.kafka;
    let producer = super::transactional_producer(k, &stage.transactional_id(k))?;
    let timeout = Duration::from_millis(k.restore_timeout_ms as u64);
    let (mut written, mut chunks) = restore(config, stage, timeout)?;
    tracing::info!(models = written.len(), topic = %stage.output(k), ?stage, "merged models read back");
    let (tx, rx) = std::sync::mpsc::channel();
    let subscriber =
        Subscriber::start_merging(super::consumer_config(k), stage.input(k), tx, stage.partitions())?;
    let status = subscriber.status();
    let mut pending: BTreeMap<String, Merged> = BTreeMap::new();
    let mut writer = Writer {
        config,
        topic: stage.output(k),
        shard: stage.shard(),
        producer: &producer,
        chunks: &mut chunks,
    };
    // A group's partitions that hold state, as marked on the groups topic, and whether this
    // group has announced itself (both written again by every session: markers are idempotent).
    let mut marked: BTreeSet<i32> = BTreeSet::new();
    let mut announced = false;
    // The aggregator of the groups: which groups the snapshot topic's partitions fall in (each
    // must have announced its aggregator before a model is written), read every 10 s.
    let metadata: Option<BaseConsumer> = match stage {
        Stage::FromGroups => Some(super::consumer_config(k).create().context("a metadata client")?),
        Stage::Whole | Stage::Group(_) => None,
    };
    let (mut expected, mut next_metadata): (Option<BTreeSet<i32>>, Instant) = (None, Instant::now());
    while !shutdown.load(Ordering::SeqCst) {
        health.progress();
        if !subscriber.alive() {
            return Err(anyhow!("the snapshot subscriber stopped"));
        }
        // The status first: the subscriber sends a batch's merges before it reports the
        // progress they came from, so what is received now covers what the status says.
        let st = status.load_full();
        receive(&rx, &mut pending)?;
        if !st.caught_up() {
            health.set_ready(
                false,
                &format!(
                    "reading the snapshot topic: {} of {} partitions read to their end",
                    st.caught_up.intersection(&st.partitions).count(),
                    st.partitions.len()
                ),
            );
            continue;
        }
        if let Some(client) = &metadata {
            if Instant::now() >= next_metadata {
                next_metadata = Instant::now() + Duration::from_secs(10);
                expected = snapshot_groups(client, &k.snapshot_topic).or(expected);
            }
            let Some(expected) = &expected else {
                health
                    .set_ready(false, &format!("the partitions of `{}` are not known yet", k.snapshot_topic));
                continue;
            };
            let missing: Vec<i32> = expected.difference(&st.groups).copied().collect();
            if !missing.is_empty() {
                // Merging without them would publish models missing those partitions.
                health.set_ready(
                    false,
                    &format!(
                        "no aggregator has announced partition groups {missing:?} yet (`banditflow aggregate --group K` for each)"
                    ),
                );
                continue;
            }
        }
        // A model is written once it covers every partition that holds state.
        let ready: Vec<String> = pending
            .iter()
            .filter(|(_, m)| match m {
                Merged::Removed(_) => true,
                Merged::Model(s) | Merged::Changed { head: s, .. } => {
                    let merged: BTreeSet<i32> =
                        s.merged_from.iter().flat_map(|f| f.partitions.iter().copied()).collect();
                    merged.is_superset(&st.checkpointed)
                }
            })
            .map(|(model, _)| model.clone())
            .collect();
        let batch: Vec<Merged> = ready.iter().filter_map(|m| pending.remove(m)).collect();
        // A group aggregator marks its partitions that hold state for the aggregator of the
        // groups, which then waits for merges covering them, as this one waits for shards.
        let (marks, announce): (Vec<i32>, Option<i32>) = match stage {
            Stage::Group(g) => {
                (st.checkpointed.difference(&marked).copied().collect(), (!announced).then_some(g))
            }
            Stage::Whole | Stage::FromGroups => (Vec::new(), None),
        };
        if !batch.is_empty() || !marks.is_empty() || announce.is_some() {
            writer.write(&mut written, batch, &marks, announce)?;
            marked.extend(marks);
            announced = true;
        }
        if pending.is_empty() {
            health.set_ready(true, "");
        } else {
            let waiting: Vec<&str> = pending.keys().map(String::as_str).collect();
            health
                .set_ready(false, &format!("models {waiting:?} do not cover every partition with state yet"));
        }
    }
    subscriber.stop();
    Ok(())
}

/// The partition groups of `topic`'s partitions (`None` while its metadata cannot be read, or
/// the topic is missing or failing).
fn snapshot_groups(client: &BaseConsumer, topic: &str) -> Option<BTreeSet<i32>> {
    let md = client.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() {
        return None;
    }
    Some(t.partitions().iter().map(|p| p.id().div_euclid(snapshot::MERGE_GROUP)).collect())
}

/// Takes what the subscriber merged (waiting up to 100 ms for the first), the newest per model.
fn receive(rx: &Receiver<Merged>, pending: &mut BTreeMap<String, Merged>) -> anyhow::Result<()> {
    let mut put = |m: Merged| {
        let model = match &m {
            Merged::Model(s) | Merged::Changed { head: s, .. } => s.meta.model_id.clone(),
            Merged::Removed(model) => model.clone(),
        };
        // Changes add to what waits: a whole merge takes them in, earlier changes are followed
        // by them (the later value of an arm wins).
        let m = match (pending.remove(&model), m) {
            (Some(Merged::Model(mut whole)), Merged::Changed { head, arms }) => {
                apply_changes(&mut whole, *head, arms, None);
                Merged::Model(whole)
            }
            (Some(Merged::Changed { arms: mut before, .. }), Merged::Changed { head, arms }) => {
                before.extend(arms);
                Merged::Changed { head, arms: before }
            }
            (_, m) => m,
        };
        pending.insert(model, m);
    };
    match rx.recv_timeout(Duration::from_millis(100)) {
        Ok(m) => put(m),
        Err(RecvTimeoutError::Timeout) => return Ok(()),
        Err(RecvTimeoutError::Disconnected) => return Err(anyhow!("the snapshot subscriber stopped")),
    }
    while let Ok(m) = rx.try_recv() {
        put(m);
    }
    Ok(())
}

/// Reads the merged-model topic back: each model's newest merged head with its arms and where
/// they are stored, and the chunk counts of the stored keys. A model whose head does not find
/// its segments (not written by this build) is started afresh: its stored segments are
/// deleted by the next write.
fn restore(
    config: &Config,
    stage: Stage,
    timeout: Duration,
) -> anyhow::Result<(Written, BTreeMap<String, u32>)> {
    let k = &config.kafka;
    let own = stage.shard();
    let mut stores = super::reader::read_to_end(
        super::consumer_config(k),
        stage.output(k),
        &[PARTITION],
        Keys::Models,
        timeout,
    )?;
    let store = stores.remove(&PARTITION).unwrap_or_default();
    let chunks = super::store::chunk_counts(&store).into_iter().collect();
    let mut readers: BTreeMap<String, (ShardReader, Option<DecodedSnapshot>, u32)> = BTreeMap::new();
    // Segments first, in sequence order (keys are zero-padded), then heads.
    for key in store.values.keys().filter(|k| !k.contains('#')) {
        if let Some((model, q)) =
            armlog::parse_segment_key(key).and_then(|(m, p, q)| (p == own).then_some((m, q)))
        {
            let Some((_, bytes)) = store.get(key)? else { continue };
            let r = readers.entry(model).or_insert_with(|| (ShardReader::default(), None, 0));
            r.2 = r.2.max(q);
            if let Err(e) = r.0.segment(q, Some(&bytes)) {
                tracing::warn!(key = %key, error = %e, "an unreadable merged arm segment");
            }
        }
    }
    for key in store.values.keys().filter(|k| !k.contains('#')) {
        if let Some(model) = checkpoint::parse_model_key(key).and_then(|(m, p)| (p == own).then_some(m)) {
            let Some((_, bytes)) = store.get(key)? else { continue };
            let r = readers.entry(model).or_insert_with(|| (ShardReader::default(), None, 0));
            match snapshot::decode(&bytes) {
                Ok(head) => r.1 = Some(head),
                Err(e) => tracing::warn!(key = %key, error = %e, "an unreadable merged head"),
            }
        }
    }
    let mut written = Written::new();
    for (model, (mut reader, head, last)) in readers {
        let held: Vec<u32> = reader.live_segments().collect();
        let restored = head.and_then(|h| {
            let spec = h.spec.clone();
            let meta = h.meta.clone();
            match reader.head(h) {
                Ok(()) => reader.into_shard(),
                Err(e) => {
                    tracing::warn!(model = %model, error = %e, "merged model not restorable; writing it afresh");
                    let mut shard = crate::core::model::ModelShard::new(&spec);
                    let mut log = armlog::ArmLog::new();
                    log.next = last.saturating_add(1);
                    log.retired = held.clone();
                    shard.log = Some(Box::new(log));
                    Some(DecodedSnapshot { meta, spec, shard, legacy: None, arm_log: None, merged_from: None })
                }
            }
        });
        if let Some(s) = restored {
            written.insert(model, s);
        }
    }
    Ok((written, chunks))
}

/// Applies a merge's changes to `merged` (the whole merge, or what was last written with
/// its `log`): the new head's meta, positions, variants and counters, and every changed arm
/// that differs bit for bit (noted in `log`). An arm no shard holds any more makes the next
/// save write every arm and delete every older segment.
fn apply_changes(
    merged: &mut DecodedSnapshot,
    head: DecodedSnapshot,
    arms: Vec<(String, String, Option<crate::core::model::ArmStats>)>,
    mut log: Option<&mut armlog::ArmLog>,
) {
    let mut went = false;
    for (segment, item, arm) in arms {
        let Some(mut arm) = arm else {
            let items = merged.shard.arms.get_mut(segment.as_str());
            went |= items.is_some_and(|m| m.remove(item.as_str()).is_some());
            continue;
        };
        let items = merged.shard.arms.entry(segment.clone()).or_default();
        match items.get_mut(item.as_str()) {
            Some(old) if old.same_bits(&arm) => continue,
            Some(old) => {
                arm.stored = old.stored;
                *old = arm;
                if let Some(l) = log.as_deref_mut() {
                    l.touched(old, &segment, &item);
                }
            }
            None => {
                arm.stored = armlog::NEVER_STORED;
                let new = items.entry(item.clone()).or_insert(arm);
                if let Some(l) = log.as_deref_mut() {
                    l.touched(new, &segment, &item);
                }
            }
        }
    }
    merged.shard.arms.retain(|_, m| !m.is_empty());
    if let (true, Some(l)) = (went, log) {
        l.retired.extend(std::mem::take(&mut l.segments).into_keys());
        l.all_dirty = true;
        l.dirty = Vec::new();
    }
    let h = head.shard;
    merged.shard.arm_total = merged.shard.arms.values().map(|m| m.len()).sum();
    merged.shard.newest_impression_ms = h.newest_impression_ms;
    merged.shard.landmark_ms = h.landmark_ms;
    merged.shard.positions = h.positions;
    merged.shard.variants = h.variants;
    merged.shard.linear_updates = h.linear_updates;
    merged.meta = head.meta;
    merged.merged_from = head.merged_from;
    merged.legacy = head.legacy;
}

/// A record of the merged-model topic: key, value (`None`: a tombstone), version.
type Record = (String, Option<Vec<u8>>, u64);

/// Saves `merged` (what changed since its last save) as records of shard `shard`; returns
/// (model, version, arms written, bytes) for the report.
fn save(merged: &mut DecodedSnapshot, shard: i32, records: &mut Vec<Record>) -> (String, u64, usize, usize) {
    merged.meta.source_partition = shard;
    let model = merged.meta.model_id.clone();
    let from = merged.merged_from.clone().unwrap_or_default();
    let saved = armlog::save_with(&merged.spec, &mut merged.shard, &merged.meta, Some(from));
    let version = merged.meta.version;
    let bytes = saved.head.len() + saved.puts.iter().map(|(_, v)| v.len()).sum::<usize>();
    for (key, value) in saved.puts {
        records.push((key, Some(value), version));
    }
    for key in saved.deletes {
        records.push((key, None, version));
    }
    records.push((checkpoint::model_key(&model, shard), Some(saved.head), version));
    (model, version, saved.arms_written, bytes)
}

struct Writer<'a> {
    config: &'a Config,
    /// The topic written, and the shard its merges are written as.
    topic: &'a str,
    shard: i32,
    producer: &'a BaseProducer,
    /// Chunk counts of the stored keys, to delete surplus chunks.
    chunks: &'a mut BTreeMap<String, u32>,
}

impl Writer<'_> {
    /// Writes `batch`, a marker per partition of `marks` and the announcement of group
    /// `announce` in one transaction and, once committed, makes it what was written.
    fn write(
        &mut self,
        written: &mut Written,
        batch: Vec<Merged>,
        marks: &[i32],
        announce: Option<i32>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut next: Vec<(String, Option<DecodedSnapshot>)> = Vec::with_capacity(batch.len());
        let mut records: Vec<Record> = Vec::new();
        let mut report: Vec<(String, u64, usize, usize)> = Vec::new();
        for m in batch {
            match m {
                Merged::Model(s) => {
                    let mut s = *s;
                    let model = s.meta.model_id.clone();
                    // `carry` takes the previous log: a failed transaction ends the session,
                    // and the next one reads what was committed back.
                    if let Some(prev) = written.get_mut(&model) {
                        let same = prev.spec == s.spec;
                        armlog::carry(&mut prev.shard, &mut s.shard, same);
                    }
                    report.push(save(&mut s, self.shard, &mut records));
                    next.push((model, Some(s)));
                }
                Merged::Changed { head, arms } => {
                    let model = head.meta.model_id.clone();
                    // The subscriber's first merge of a model is whole; changes follow it.
                    let prev = written
                        .get_mut(&model)
                        .filter(|p| p.spec == head.spec)
                        .ok_or_else(|| anyhow!("changes of model `{model}` without its merged model"))?;
                    let mut log = prev.shard.log.take();
                    apply_changes(prev, *head, arms, log.as_deref_mut());
                    prev.shard.log = log;
                    report.push(save(prev, self.shard, &mut records));
                }
                Merged::Removed(model) => {
                    let Some(prev) = written.get(&model) else { continue };
                    let segments = prev.shard.log.iter().flat_map(|l| l.segments.keys().copied());
                    for q in segments.chain(prev.shard.log.iter().flat_map(|l| l.retired.iter().copied())) {
                        records.push((armlog::segment_key(&model, self.shard, q), None, 0));
                    }
                    records.push((checkpoint::model_key(&model, self.shard), None, 0));
                    report.push((model.clone(), 0, 0, 0));
                    next.push((model, None));
                }
            }
        }
        for p in marks {
            let note =
                format!("partition {p} holds state (marked by the aggregator of shard {})", self.shard);
            records.push((checkpoint::header_key(*p), Some(note.into_bytes()), 0));
        }
        if let Some(g) = announce {
            let note = format!("partition group {g} has an aggregator (shard {})", self.shard);
            records.push((checkpoint::group_key(g), Some(note.into_bytes()), 0));
        }
        let new_chunks = self.commit(&records)?;
        for (key, n) in new_chunks {
            if n > 0 {
                self.chunks.insert(key, n);
            } else {
                self.chunks.remove(&key);
            }
        }
        for (model, s) in next {
            match s {
                Some(s) => written.insert(model, s),
                None => written.remove(&model),
            };
        }
        let models: Vec<(&str, u64, usize, usize)> =
            report.iter().map(|(m, v, a, b)| (m.as_str(), *v, *a, *b)).collect();
        MergedPublished { models: &models, elapsed: started.elapsed() }.emit();
        Ok(())
    }

    /// One transaction of `records` (key, value or tombstone, version), values chunked when
    /// large; returns the new chunk counts of the keys whose count changed.
    fn commit(&self, records: &[Record]) -> anyhow::Result<Vec<(String, u32)>> {
        let k = &self.config.kafka;
        let timeout = Duration::from_millis(k.transaction_timeout_ms as u64);
        self.producer.begin_transaction().context("begin transaction")?;
        let mut counts = Vec::new();
        for (key, value, version) in records {
            let previous = self.chunks.get(key).copied().unwrap_or(0);
            match value {
                Some(v) => {
                    let recs = blob::split(key, *version, v, k.max_record_bytes, previous);
                    let n = recs.iter().filter(|r| r.value.is_some() && &r.key != key).count() as u32;
                    if n > 0 || previous > 0 {
                        counts.push((key.clone(), n));
                    }
                    for r in recs {
                        self.send(&r.key, r.value.as_deref())?;
                    }
                }
                None => {
                    self.send(key, None)?;
                    for i in 0..previous {
                        self.send(&blob::chunk_key(key, i), None)?;
                    }
                    if previous > 0 {
                        counts.push((key.clone(), 0));
                    }
                }
            }
        }
        super::commit_transaction(self.producer, timeout).map_err(|e| {
            if let KafkaError::Transaction(t) = &e {
                if t.txn_requires_abort() {
                    let _ = self.producer.abort_transaction(Duration::from_secs(10));
                }
            }
            anyhow!("committing merged models to `{}`: {e}", self.topic)
        })?;
        Ok(counts)
    }

    fn send(&self, key: &str, value: Option<&[u8]>) -> anyhow::Result<()> {
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(self.topic).key(key.as_bytes()).partition(PARTITION);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        super::send_waiting(self.producer, rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_stage_reads_exactly_the_partitions_the_merge_puts_in_its_group() {
        let g = i64::from(snapshot::MERGE_GROUP);
        for k in [0i64, 1, 3, 44] {
            let stage = Stage::group(k).expect("a group");
            let parts = stage.partitions().expect("a range");
            assert_eq!(parts.len() as i64, g);
            assert_eq!(i64::from(stage.shard()), k * g, "written as its first partition");
            // The tree's group of each partition is this stage's.
            assert!(parts.clone().all(|p| i64::from(p.div_euclid(snapshot::MERGE_GROUP)) == k));
            assert!(!parts.contains(&(parts.start - 1)) && !parts.contains(&parts.end));
        }
        let last = i64::from(i32::MAX) / g - 1;
        assert!(Stage::group(last).expect("the last group").partitions().is_some_and(|r| r.end > r.start));
        for bad in [-1, last + 1, i64::MAX] {
            let e = Stage::group(bad).expect_err("refused").to_string();
            assert!(e.contains("--group") && e.contains(&last.to_string()), "{e}");
        }
        assert_eq!((Stage::Whole.shard(), Stage::FromGroups.shard()), (MERGED, MERGED));
        assert_eq!((Stage::Whole.partitions(), Stage::FromGroups.partitions()), (None, None));
    }
}
