//! Follows the snapshot topic and keeps the newest merged model of every model id, swapped in
//! atomically so ranking never waits for an update.
//!
//! The subscriber reads every partition of the snapshot topic from the beginning through the
//! one snapshot-topic reader (`kafka::reader`, `read_committed`: an aborted transaction's
//! records are never seen; model keys and partition checkpoints only), and holds the newest
//! complete shard per (model, source partition). A chunked value becomes visible only when its
//! manifest and every chunk of the same version have arrived (`LatestByKey::get`); until then the
//! previous shard stays in use. After each batch of records the shards of every model that
//! changed are merged (`snapshot::merge`, in its fixed order, so the merged model equals the
//! offline `banditflow merge` of the same shards) and published through an [`ArcSwap`].
//!
//! It also says whether the node may be ready ([`FollowStatus`]): every snapshot partition
//! read to the end it had when the subscriber first saw it, and which partitions hold state
//! (a `checkpoint/<p>` key), which every model must cover before the node ranks with it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;

use crate::core::armlog::{self, ShardReader};
use crate::core::blob::{BlobError, LatestByKey};
use crate::core::checkpoint::{self, CheckpointKey};
use crate::core::event::Variant;
use crate::core::model;
use crate::core::prior::FittedPriors;
use crate::core::snapshot::{self, DecodedSnapshot};
use crate::kafka::now_ms;
use crate::kafka::reader::{Keys, Read, SnapshotReader};
use crate::telemetry::serving::{
    BadSnapshot, IncompleteValue, MergeFailed, ModelStaleness, ModelUpdated, RecordsVisible,
    SnapshotPartitions,
};

/// One model as serving nodes rank with it: the merge of the newest shard of every partition.
#[derive(Debug)]
pub struct ServingModel {
    pub merged: DecodedSnapshot,
    /// Σ of the next input offsets the merged shards cover: how many input records (counted
    /// from offset 0 of every input partition) the model has learned from. Never decreases for
    /// a growing log; written into every impression as `model_version`.
    pub version: u64,
    /// Source partitions merged.
    pub partitions: BTreeSet<i32>,
    /// Wall-clock ms when this model became visible to ranking.
    pub visible_at_ms: i64,
    /// The newest impression time learned by the *oldest* shard (ms; 0 before any): the model
    /// is only as fresh as its most behind partition, which the newest shard would hide.
    pub event_ms: i64,
    /// The prior in force per segment, fitted once when the version is installed (read at the
    /// model's newest learned impression: the evidence the arms hold), not per request.
    pub priors: FittedPriors,
    /// The estimated examination curve (an EM fit over every arm), fitted once when the
    /// version is installed; None unless the model estimates examination.
    pub examination: Option<Vec<f64>>,
    /// A linear model's per-arm posteriors (Cholesky factor and mean) and the decay factor they
    /// were computed at: built at install and again only when the node's clock has moved the
    /// factor by more than [`LINEAR_REFRESH`], not per request (d³/6 operations per arm).
    linear: arc_swap::ArcSwapOption<LinearCache>,
}

/// Relative change of the decay factor after which a serving node recomputes a linear
/// posterior: 1 %, which the decay takes 0.014 half-lives to make (2.4 h at a 7-day half-life).
pub const LINEAR_REFRESH: f64 = 0.01;

/// See [`ServingModel::linear_posterior`].
#[derive(Debug)]
pub struct LinearCache {
    pub factor: f64,
    pub table: crate::core::linear::PosteriorTable,
}

impl ServingModel {
    /// `shard_event_ms`: each merged shard's newest learned impression time, if any.
    pub fn new(
        merged: DecodedSnapshot,
        partitions: BTreeSet<i32>,
        shard_event_ms: &[Option<i64>],
        visible_at_ms: i64,
    ) -> ServingModel {
        let version = merged
            .meta
            .input_offsets
            .iter()
            .map(|(_, _, next)| u64::try_from(*next).unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        // A shard that has learned nothing says nothing about staleness.
        let event_ms = shard_event_ms.iter().flatten().copied().min().unwrap_or(0);
        let read = merged.shard.read_time(visible_at_ms);
        let examination = matches!(
            merged.spec.position,
            crate::core::params::PositionModel::Pbm(crate::core::params::Examination::Estimated)
        )
        .then(|| merged.shard.estimated_examination());
        let priors = merged.shard.fit_priors_with(&merged.spec, read, examination.as_deref());
        let m = ServingModel {
            merged,
            version,
            partitions,
            visible_at_ms,
            event_ms,
            priors,
            examination,
            linear: arc_swap::ArcSwapOption::empty(),
        };
        m.linear_posterior(visible_at_ms);
        m
    }

    /// The per-arm linear posteriors to rank with at `now_ms` (None for a Beta model): the ones
    /// computed at install, or fresh ones once the decay factor has moved by more than
    /// [`LINEAR_REFRESH`]. Each arm is read under its segment's prior in force.
    pub fn linear_posterior(&self, now_ms: i64) -> Option<std::sync::Arc<LinearCache>> {
        let crate::core::params::Algorithm::Linear { .. } = self.merged.spec.algorithm else {
            return None;
        };
        let f = self.merged.shard.read_factor(&self.merged.spec, now_ms);
        if let Some(c) = self.linear.load_full() {
            if (f / c.factor - 1.0).abs() <= LINEAR_REFRESH {
                return Some(c);
            }
        }
        let (spec, shard) = (&self.merged.spec, &self.merged.shard);
        let mut table = crate::core::linear::PosteriorTable::default();
        for (segment, items) in &shard.arms {
            let prior = self.priors.for_segment(segment);
            let posts: crate::core::model::HashMap<String, _> = items
                .keys()
                .filter_map(|item| {
                    Some((item.clone(), shard.linear_posterior(spec, prior, segment, item, f)?))
                })
                .collect();
            table.insert(segment.clone(), posts);
        }
        let c = std::sync::Arc::new(LinearCache { factor: f, table });
        self.linear.store(Some(c.clone()));
        Some(c)
    }

    /// Milliseconds between the oldest shard's newest event and `now_ms` (None before any).
    pub fn staleness_ms(&self, now_ms: i64) -> Option<i64> {
        (self.event_ms > 0).then(|| now_ms.saturating_sub(self.event_ms).max(0))
    }

    /// Lift of treatment over holdout (estimate, lower, upper), when both have data.
    pub fn lift(&self) -> Option<(f64, f64, f64)> {
        let v = &self.merged.shard.variants;
        let l = model::lift(v.get(&Variant::Treatment)?, v.get(&Variant::Holdout)?)?;
        Some((l.diff, l.diff_low, l.diff_high))
    }
}

/// Every loaded model, by id.
#[derive(Debug, Default)]
pub struct Catalog {
    pub models: BTreeMap<String, Arc<ServingModel>>,
}

/// A model update as it became visible (for freshness measurements and logs).
#[derive(Debug, Clone)]
pub struct Update {
    pub model: String,
    pub version: u64,
    pub visible_at_ms: i64,
    /// (input topic, partition, next offset) the merged model covers, sorted.
    pub input_offsets: Vec<(String, i32, i64)>,
}

/// Records a node logged, sampled, waiting to become visible to ranking: (input topic,
/// partition) → (offset, wall-clock ms when written), in offset order. Bounded per partition.
#[derive(Debug, Default)]
pub struct WrittenRecords {
    pending: Mutex<BTreeMap<(String, i32), WrittenQueue>>,
}

/// (offset, written at ms) in offset order.
type WrittenQueue = VecDeque<(i64, i64)>;

/// One record in this many (by offset) is a freshness sample.
const WRITTEN_SAMPLE: i64 = 16;
/// Samples kept per partition (the oldest go first when a partition is not being learned).
const WRITTEN_CAP: usize = 4096;

impl WrittenRecords {
    /// Kafka acknowledged a record at `offset` of (`topic`, `partition`), written at `written_ms`.
    pub fn written(&self, topic: &str, partition: i32, offset: i64, written_ms: i64) {
        if offset % WRITTEN_SAMPLE != 0 {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = pending.entry((topic.to_string(), partition)).or_default();
        if q.len() >= WRITTEN_CAP {
            q.pop_front();
        }
        q.push_back((offset, written_ms));
    }

    /// The samples a model covering `input_offsets` (next offsets) made visible at `visible_ms`:
    /// their latencies in seconds.
    fn visible(&self, input_offsets: &[(String, i32, i64)], visible_ms: i64) -> Vec<f64> {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        for (t, p, next) in input_offsets {
            let Some(q) = pending.get_mut(&(t.clone(), *p)) else { continue };
            while q.front().is_some_and(|(o, _)| o < next) {
                if let Some((_, written)) = q.pop_front() {
                    out.push((visible_ms - written).max(0) as f64 / 1e3);
                }
            }
        }
        out
    }
}

/// What the subscriber knows about its progress, for readiness.
#[derive(Debug, Default, Clone)]
pub struct FollowStatus {
    /// The topic's partitions have been listed at least once (a topic that does not exist yet
    /// has none).
    pub listed: bool,
    /// Partitions of the snapshot topic followed.
    pub partitions: BTreeSet<i32>,
    /// Partitions read to (at least) the end they had when the subscriber first saw them.
    pub caught_up: BTreeSet<i32>,
    /// Partitions holding a processor's state (`checkpoint/<p>`): every model must cover them.
    pub checkpointed: BTreeSet<i32>,
    /// On the groups topic: the partition groups whose aggregator has announced itself
    /// (`checkpoint/group/<k>`).
    pub groups: BTreeSet<i32>,
    /// Values that arrived incomplete (a chunk missing, a length or checksum wrong).
    pub incomplete: u64,
}

impl FollowStatus {
    /// The partitions are known and each is read to its end at start (vacuously true while
    /// the topic does not exist: there is nothing to read).
    pub fn caught_up(&self) -> bool {
        self.listed && self.caught_up.is_superset(&self.partitions)
    }
}

/// Running subscriber: a thread that reads the snapshot topic until [`Subscriber::stop`].
pub struct Subscriber {
    catalog: Arc<ArcSwap<Catalog>>,
    status: Arc<ArcSwap<FollowStatus>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Starts following `topic`. `client` holds the bootstrap servers and pass-through
    /// properties; `updates` (if any) receives every model update as it becomes visible.
    pub fn start(
        client: ClientConfig,
        topic: &str,
        updates: Option<std::sync::mpsc::Sender<Update>>,
    ) -> anyhow::Result<Subscriber> {
        Subscriber::start_with(client, topic, updates, None)
    }

    /// [`Subscriber::start`], also measuring when the records in `written` become visible.
    pub fn start_with(
        client: ClientConfig,
        topic: &str,
        updates: Option<std::sync::mpsc::Sender<Update>>,
        written: Option<Arc<WrittenRecords>>,
    ) -> anyhow::Result<Subscriber> {
        Subscriber::spawn(client, topic, updates, written, None)
    }

    /// Follows the snapshot topic for the aggregator (`kafka::aggregate`): every merged model
    /// (and every removal) goes to `merged` instead of a catalog for ranking. With `only`, just
    /// those partitions of the topic are read (an aggregator of one partition group).
    pub fn start_merging(
        client: ClientConfig,
        topic: &str,
        merged: std::sync::mpsc::Sender<Merged>,
        only: Option<std::ops::Range<i32>>,
    ) -> anyhow::Result<Subscriber> {
        Subscriber::spawn(client, topic, None, None, Some((merged, only)))
    }

    fn spawn(
        client: ClientConfig,
        topic: &str,
        updates: Option<std::sync::mpsc::Sender<Update>>,
        written: Option<Arc<WrittenRecords>>,
        merging: Option<(std::sync::mpsc::Sender<Merged>, Option<std::ops::Range<i32>>)>,
    ) -> anyhow::Result<Subscriber> {
        let (merged, only) = match merging {
            Some((tx, only)) => (Some(tx), only),
            None => (None, None),
        };
        let reader = SnapshotReader::new(client, topic, "serving", Keys::Models)?;
        let catalog = Arc::new(ArcSwap::from_pointee(Catalog::default()));
        let status = Arc::new(ArcSwap::from_pointee(FollowStatus::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut follower = Follower {
            reader,
            ends: BTreeMap::new(),
            store: LatestByKey::default(),
            readers: BTreeMap::new(),
            pending: BTreeSet::new(),
            catalog: Arc::clone(&catalog),
            status: Arc::clone(&status),
            progress: FollowStatus::default(),
            updates,
            written,
            merged,
            only,
            bases: BTreeMap::new(),
        };
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("banditflow-subscriber".into())
            .spawn(move || follower.run(&flag))
            .map_err(|e| anyhow::anyhow!("starting the subscriber thread: {e}"))?;
        Ok(Subscriber { catalog, status, stop, thread: Some(thread) })
    }

    /// The shared handle ranking reads from (`load()` is wait-free).
    pub fn catalog(&self) -> Arc<ArcSwap<Catalog>> {
        Arc::clone(&self.catalog)
    }

    /// The subscriber's progress, for readiness.
    pub fn status(&self) -> Arc<ArcSwap<FollowStatus>> {
        Arc::clone(&self.status)
    }

    /// False once the subscriber thread has ended (it ends only when stopped, or by a bug).
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the snapshot subscriber thread panicked");
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Follower {
    reader: SnapshotReader,
    /// Per followed partition: the end offset it had when first seen (read_committed).
    ends: BTreeMap<i32, i64>,
    /// Raw model values and chunks not yet assembled.
    store: LatestByKey,
    /// Per (model, source partition): the shard's arm segments and heads as read, and its
    /// newest complete version.
    readers: BTreeMap<(String, i32), ShardReader>,
    /// Model keys whose newest value has not been assembled yet (chunks still missing).
    pending: BTreeSet<String>,
    catalog: Arc<ArcSwap<Catalog>>,
    status: Arc<ArcSwap<FollowStatus>>,
    /// What `status` will say after the next publication.
    progress: FollowStatus,
    updates: Option<std::sync::mpsc::Sender<Update>>,
    written: Option<Arc<WrittenRecords>>,
    /// Set for the aggregator: merged models go there, not to the catalog.
    merged: Option<std::sync::mpsc::Sender<Merged>>,
    /// The partitions of the topic followed (all when `None`).
    only: Option<std::ops::Range<i32>>,
    /// For the aggregator: per model, what its previous merge was made of.
    bases: BTreeMap<String, MergeBasis>,
}

/// The shards a merge was made of, as far as they decide every arm's value: the parameters,
/// and each shard's partition and decay landmark (a merged arm is rescaled to the newest).
#[derive(Debug, PartialEq)]
struct MergeBasis {
    spec: crate::core::params::ModelSpec,
    landmarks: Vec<(i32, Option<i64>)>,
}

/// A model merged (or removed) by a subscriber that merges for the aggregator.
#[derive(Debug)]
pub enum Merged {
    /// The whole merge.
    Model(Box<DecodedSnapshot>),
    /// What changed since the previous merge sent for the model: its head (everything but the
    /// arms, `snapshot::merge_heads`) and the arms its shards changed, each merged again
    /// (`None`: no shard holds it any more).
    Changed { head: Box<DecodedSnapshot>, arms: Vec<(String, String, Option<model::ArmStats>)> },
    /// No partition holds the model any more (removed from the processors' configuration).
    Removed(String),
}

/// Records read before the changed models are merged and published.
const BATCH: usize = 4096;
/// How often model staleness is refreshed.
const STALENESS_EVERY: Duration = Duration::from_secs(1);

impl Follower {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_metadata = Instant::now();
        let mut next_staleness = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() >= next_metadata {
                // New partitions (or a topic created after the node started) are picked up;
                // after a failure (a leader being elected), again within a second.
                let failed = match self.assign_new_partitions() {
                    Ok(()) => false,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), topic = %self.reader.topic(), "snapshot topic metadata");
                        true
                    }
                };
                next_metadata =
                    Instant::now() + Duration::from_secs(if failed || self.ends.is_empty() { 1 } else { 30 });
            }
            if Instant::now() >= next_staleness {
                next_staleness = Instant::now() + STALENESS_EVERY;
                let now = now_ms();
                for (model, m) in &self.catalog.load().models {
                    if let Some(ms) = m.staleness_ms(now) {
                        ModelStaleness { model, seconds: ms as f64 / 1e3 }.emit();
                    }
                }
            }
            if self.ends.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let mut changed = false;
            let mut progressed = false;
            let mut read = 0;
            let mut wait = Duration::from_millis(100);
            while read < BATCH {
                match self.reader.poll(wait) {
                    Read::Idle => break,
                    Read::Record(r) => {
                        read += 1;
                        wait = Duration::ZERO;
                        progressed |= self.reached(r.partition, r.offset + 1);
                        let base = r.key.split('#').next().unwrap_or(&r.key).to_string();
                        if base.starts_with("checkpoint/") {
                            // The partition the key names (the record's own on the snapshot
                            // topic, any on the groups topic, marked by group aggregators), or a
                            // group's announcement on the groups topic.
                            if base == r.key && r.value.is_some() {
                                progressed |= match checkpoint::parse_checkpoint_key(&base) {
                                    Some(CheckpointKey::Partition(p)) => self.progress.checkpointed.insert(p),
                                    Some(CheckpointKey::Group(g)) => self.progress.groups.insert(g),
                                    None => false,
                                };
                            }
                            continue;
                        }
                        // Only a record under the key itself (an inline value, a manifest, which
                        // follows its chunks, or a tombstone) makes a new value; chunks and the
                        // tombstones of surplus chunks just wait in the store.
                        let whole = base == r.key;
                        self.store.put(r.key, r.value);
                        if whole {
                            self.pending.insert(base);
                            changed = true;
                        }
                    }
                    Read::Skipped { partition, offset } => {
                        read += 1;
                        wait = Duration::ZERO;
                        progressed |= self.reached(partition, offset + 1);
                    }
                    Read::End(p) => {
                        progressed |= self.progress.caught_up.insert(p);
                    }
                    Read::Error(e) => {
                        tracing::warn!(error = %e, "reading the snapshot topic");
                        break;
                    }
                }
            }
            if changed {
                self.publish();
            }
            if changed || progressed {
                self.report_status();
            }
        }
    }

    /// Publishes the progress for readiness.
    fn report_status(&self) {
        self.status.store(Arc::new(self.progress.clone()));
    }

    /// The reader is at `next` in `partition`: caught up once past the end seen at start.
    fn reached(&mut self, partition: i32, next: i64) -> bool {
        let end = self.ends.get(&partition).copied().unwrap_or(i64::MAX);
        next >= end && self.progress.caught_up.insert(partition)
    }

    fn assign_new_partitions(&mut self) -> anyhow::Result<()> {
        let parts = self.reader.partitions(Duration::from_secs(5))?;
        // Every new partition's end first, then assigned, then recorded: a partition recorded
        // but not assigned would never be read (`reader::new_partitions`).
        let reader = &self.reader;
        let new = crate::kafka::reader::new_partitions(&parts, &self.ends, self.only.as_ref(), |p| {
            reader.end_offset(p, Duration::from_secs(10))
        })?;
        if new.is_empty() {
            if !self.progress.listed {
                self.progress.listed = true;
                self.report_status();
            }
            return Ok(());
        }
        let assign: Vec<i32> = new.iter().map(|(p, _)| *p).collect();
        self.reader.assign_from_start(&assign)?;
        for (p, end) in new {
            self.ends.insert(p, end);
            self.progress.partitions.insert(p);
            if end <= 0 {
                self.progress.caught_up.insert(p);
            }
        }
        self.progress.listed = true;
        SnapshotPartitions { count: self.ends.len() }.emit();
        self.report_status();
        Ok(())
    }

    /// Assembles every pending key that is complete, then merges and publishes changed models.
    /// Arm segments go to their shard's reader first (in sequence order), heads after: a head
    /// follows the segments it names in its transaction, and a reader applies what it holds
    /// when the head arrives.
    fn publish(&mut self) {
        let mut models = BTreeSet::new();
        let keys: Vec<String> = self.pending.iter().cloned().collect();
        let (segments, heads): (Vec<String>, Vec<String>) =
            keys.into_iter().partition(|k| armlog::parse_segment_key(k).is_some());
        for key in segments.into_iter().chain(heads) {
            let (model, partition, sequence) =
                match (checkpoint::parse_model_key(&key), armlog::parse_segment_key(&key)) {
                    (Some((m, p)), _) => (m, p, None),
                    (None, Some((m, p, q))) => (m, p, Some(q)),
                    (None, None) => {
                        self.pending.remove(&key);
                        continue;
                    }
                };
            match self.store.get(&key) {
                Ok(value) => {
                    self.pending.remove(&key);
                    self.forget(&key);
                    let id = (model.clone(), partition);
                    let outcome = match (sequence, value) {
                        // The tombstone of a segment of a shard not followed (a removed model).
                        (Some(_), None) if !self.readers.contains_key(&id) => Ok(()),
                        (Some(q), v) => self
                            .readers
                            .entry(id)
                            .or_default()
                            .segment(q, v.as_ref().map(|(_, b)| b.as_slice())),
                        (None, Some((_, bytes))) => match snapshot::decode(&bytes) {
                            Ok(head) => {
                                models.insert(model);
                                let r = self.readers.entry(id).or_default().head(head);
                                if let Err(e) = &r {
                                    // Until a later head finds its segments the shard stays
                                    // as it was (with a compacted topic read from the start,
                                    // an older head may name segments deleted since).
                                    tracing::warn!(key = %key, error = %e, "a model head whose arm segments are not all here yet; keeping the previous model");
                                }
                                Ok(())
                            }
                            Err(e) => Err(e),
                        },
                        (None, None) => {
                            // Deleted: the model was removed from the processor's configuration.
                            if self.readers.remove(&id).is_some() {
                                models.insert(model);
                            }
                            Ok(())
                        }
                    };
                    if let Err(e) = outcome {
                        BadSnapshot { key: &key, error: &e }.emit();
                    }
                }
                // A manifest follows its chunks in the same transaction and partition, so a value
                // incomplete when its key arrives never completes: counted, and the previous
                // shard stays (a newer version of the key is tried afresh when it arrives).
                Err(
                    e @ (BlobError::MissingChunk { .. }
                    | BlobError::Length { .. }
                    | BlobError::Checksum { .. }),
                ) => {
                    self.pending.remove(&key);
                    self.progress.incomplete += 1;
                    IncompleteValue { key: &key, error: &e }.emit();
                }
                Err(e) => {
                    self.pending.remove(&key);
                    self.forget(&key);
                    BadSnapshot { key: &key, error: &e }.emit();
                }
            }
        }
        if models.is_empty() {
            return;
        }
        let current = self.catalog.load_full();
        let mut next = Catalog { models: current.models.clone() };
        let now = now_ms();
        for model in models {
            let range = (model.clone(), i32::MIN)..=(model.clone(), i32::MAX);
            if self.readers.range(range.clone()).next().is_none() {
                next.models.remove(&model);
                if let Some(tx) = &self.merged {
                    // The aggregator stops only when dropped.
                    self.bases.remove(&model);
                    let _ = tx.send(Merged::Removed(model));
                }
                continue;
            }
            if self.merged.is_some() {
                self.merge_changed(&model);
                continue;
            }
            // A shard whose newest head has not found its segments keeps the model as it was.
            let Some(shards) = self
                .readers
                .range(range.clone())
                .map(|(_, r)| r.complete())
                .collect::<Option<Vec<&DecodedSnapshot>>>()
            else {
                continue;
            };
            match snapshot::merge_refs(&shards) {
                Ok(merged) => {
                    // The partitions merged and their oldest newest impression: the shards'
                    // own, or what a merged model from the merged-model topic names.
                    let from = merged.merged_from.clone().unwrap_or_default();
                    let partitions: BTreeSet<i32> = from.partitions.iter().copied().collect();
                    let shard_event_ms =
                        [(from.oldest_newest_impression_ms > 0).then_some(from.oldest_newest_impression_ms)];
                    let m = ServingModel::new(merged, partitions, &shard_event_ms, now);
                    ModelUpdated {
                        model: &model,
                        version: m.version,
                        partitions: m.partitions.len(),
                        event_ms: m.event_ms,
                        visible_ms: now,
                        lift: m.lift(),
                    }
                    .emit();
                    if let Some(w) = &self.written {
                        RecordsVisible { seconds: &w.visible(&m.merged.meta.input_offsets, now) }.emit();
                    }
                    if let Some(tx) = &self.updates {
                        // A receiver that went away only stops the reports.
                        let _ = tx.send(Update {
                            model: model.clone(),
                            version: m.version,
                            visible_at_ms: now,
                            input_offsets: m.merged.meta.input_offsets.clone(),
                        });
                    }
                    next.models.insert(model, Arc::new(m));
                }
                // E.g. shards written under different parameters while a configuration change
                // rolls through the processors: keep ranking with the last merge.
                Err(e) => MergeFailed { model: &model, error: &e }.emit(),
            }
        }
        self.catalog.store(Arc::new(next));
    }

    /// For the aggregator: merges `model` again and sends it, recomputing only the arms its
    /// shards changed ([`Merged::Changed`]) while the shards, their decay landmarks and the
    /// parameters are those of the previous merge; the whole merge otherwise. Waits (keeping
    /// the changes) while a shard's newest head has not found its segments.
    fn merge_changed(&mut self, model: &str) {
        let range = (model.to_string(), i32::MIN)..=(model.to_string(), i32::MAX);
        if self.readers.range(range.clone()).any(|(_, r)| r.complete().is_none()) {
            return;
        }
        let mut all = false;
        let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
        for (_, r) in self.readers.range_mut(range.clone()) {
            r.track_changes();
            let c = r.take_changes();
            all |= c.all;
            if !all {
                keys.extend(c.arms);
            }
        }
        let shards: Vec<&DecodedSnapshot> =
            self.readers.range(range).filter_map(|(_, r)| r.complete()).collect();
        let Some(first) = shards.first() else { return };
        let basis = MergeBasis {
            spec: first.spec.clone(),
            landmarks: shards.iter().map(|s| (s.meta.source_partition, s.shard.landmark_ms)).collect(),
        };
        let incremental = !all && self.bases.get(model) == Some(&basis);
        let out = if incremental {
            snapshot::merge_heads(&shards).map(|head| {
                let groups = snapshot::merge_groups(&shards);
                let arms = keys
                    .into_iter()
                    .map(|(segment, item)| {
                        let a = snapshot::merge_arm(&groups, &segment, &item);
                        (segment, item, a)
                    })
                    .collect();
                Merged::Changed { head: Box::new(head), arms }
            })
        } else {
            snapshot::merge_refs(&shards).map(|m| Merged::Model(Box::new(m)))
        };
        match out {
            Ok(m) => {
                self.bases.insert(model.to_string(), basis);
                if let Some(tx) = &self.merged {
                    let _ = tx.send(m);
                }
            }
            Err(e) => {
                self.bases.remove(model);
                MergeFailed { model, error: &e }.emit();
            }
        }
    }

    /// Drops the raw value and chunks of an assembled key (the decoded shard is kept).
    fn forget(&mut self, key: &str) {
        let chunks = self.store.chunk_count(key);
        self.store.values.remove(key);
        for i in 0..chunks {
            self.store.values.remove(&crate::core::blob::chunk_key(key, i));
        }
    }
}
