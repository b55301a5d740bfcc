//! Follows the snapshot topic and keeps the newest merged model of every model id, swapped in
//! atomically so ranking never waits for an update.
//!
//! The subscriber reads every partition of the snapshot topic from the beginning with
//! `read_committed` (an aborted transaction's records are never seen), keeps only model keys
//! (`model/<model>/<p>` and their chunks; the attribution changelog is skipped), and holds the
//! newest complete shard per (model, source partition). A chunked value becomes visible only
//! when its manifest and every chunk of the same version have arrived (`LatestByKey::get`); until
//! then the previous shard stays in use. After each batch of records the shards of every model
//! that changed are merged (`snapshot::merge`, in partition order, so the merged model equals the
//! offline `banditflow merge` of the same shards) and published through an [`ArcSwap`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use metrics::{counter, gauge};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::core::blob::{BlobError, LatestByKey};
use crate::core::checkpoint;
use crate::core::snapshot::{self, DecodedSnapshot};
use crate::kafka::{now_ms, store::QuietEof};

/// One model as serving nodes rank with it: the merge of the newest shard of every partition.
#[derive(Debug)]
pub struct ServingModel {
    pub merged: DecodedSnapshot,
    /// Σ of the next input offsets the merged shards cover: how many input records (counted
    /// from offset 0 of every input partition) the model has learned from. Never decreases for
    /// a growing log; written into every impression as `model_version`.
    pub version: u64,
    /// Source partitions merged.
    pub partitions: usize,
    /// Wall-clock ms when this model became visible to ranking.
    pub visible_at_ms: i64,
    /// Newest impression time any shard has learned from (ms), the reference for staleness.
    pub newest_event_ms: i64,
}

impl ServingModel {
    pub fn new(merged: DecodedSnapshot, partitions: usize, visible_at_ms: i64) -> ServingModel {
        let version = merged
            .meta
            .input_offsets
            .iter()
            .map(|(_, _, next)| u64::try_from(*next).unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        let newest_event_ms = merged.shard.newest_impression_ms.unwrap_or(0);
        ServingModel { merged, version, partitions, visible_at_ms, newest_event_ms }
    }

    /// Milliseconds between the newest event the model covers and `now_ms` (None before any).
    pub fn staleness_ms(&self, now_ms: i64) -> Option<i64> {
        (self.newest_event_ms > 0).then(|| now_ms.saturating_sub(self.newest_event_ms).max(0))
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

/// Running subscriber: a thread that reads the snapshot topic until [`Subscriber::stop`].
pub struct Subscriber {
    catalog: Arc<ArcSwap<Catalog>>,
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
        let mut c = client;
        c.set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("group.id", "banditflow-serving")
            .set("fetch.wait.max.ms", "20")
            .set("fetch.max.bytes", "52428800");
        let consumer: BaseConsumer<QuietEof> =
            c.create_with_context(QuietEof).context("creating the snapshot subscriber")?;
        let catalog = Arc::new(ArcSwap::from_pointee(Catalog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut follower = Follower {
            consumer,
            topic: topic.to_string(),
            assigned: BTreeSet::new(),
            store: LatestByKey::default(),
            shards: BTreeMap::new(),
            pending: BTreeSet::new(),
            catalog: Arc::clone(&catalog),
            updates,
        };
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("banditflow-subscriber".into())
            .spawn(move || follower.run(&flag))
            .context("starting the subscriber thread")?;
        Ok(Subscriber { catalog, stop, thread: Some(thread) })
    }

    /// The shared handle ranking reads from (`load()` is wait-free).
    pub fn catalog(&self) -> Arc<ArcSwap<Catalog>> {
        Arc::clone(&self.catalog)
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
    consumer: BaseConsumer<QuietEof>,
    topic: String,
    assigned: BTreeSet<i32>,
    /// Raw model values and chunks not yet assembled.
    store: LatestByKey,
    /// Newest complete shard per (model, source partition).
    shards: BTreeMap<(String, i32), DecodedSnapshot>,
    /// Model keys whose newest value has not been assembled yet (chunks still missing).
    pending: BTreeSet<String>,
    catalog: Arc<ArcSwap<Catalog>>,
    updates: Option<std::sync::mpsc::Sender<Update>>,
}

/// Records read before the changed models are merged and published.
const BATCH: usize = 4096;

impl Follower {
    fn run(&mut self, stop: &AtomicBool) {
        let mut next_metadata = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() >= next_metadata {
                // New partitions (or a topic created after the node started) are picked up.
                next_metadata =
                    Instant::now() + Duration::from_secs(if self.assigned.is_empty() { 1 } else { 30 });
                if let Err(e) = self.assign_new_partitions() {
                    tracing::warn!(error = %format!("{e:#}"), topic = %self.topic, "snapshot topic metadata");
                }
            }
            if self.assigned.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let mut changed = false;
            let mut read = 0;
            let mut wait = Duration::from_millis(100);
            while read < BATCH {
                match self.consumer.poll(wait) {
                    None => break,
                    Some(Ok(m)) => {
                        read += 1;
                        wait = Duration::ZERO;
                        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
                        let base = key.split('#').next().unwrap_or(key);
                        if checkpoint::parse_model_key(base).is_none() {
                            continue;
                        }
                        self.store.put(key.to_string(), m.payload().map(<[u8]>::to_vec));
                        // Only a record under the key itself (an inline value, a manifest, which
                        // follows its chunks, or a tombstone) makes a new value; chunks and the
                        // tombstones of surplus chunks just wait in the store.
                        if base == key {
                            self.pending.insert(base.to_string());
                            changed = true;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reading the snapshot topic");
                        break;
                    }
                }
            }
            if changed {
                self.publish();
            }
        }
    }

    fn assign_new_partitions(&mut self) -> anyhow::Result<()> {
        let md = self.consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(5))?;
        let parts: BTreeSet<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let new: Vec<i32> = parts.difference(&self.assigned).copied().collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for p in &new {
            tpl.add_partition_offset(&self.topic, *p, Offset::Beginning)?;
        }
        self.consumer.incremental_assign(&tpl).context("assigning snapshot partitions")?;
        self.assigned.extend(new);
        gauge!("banditflow_serving_snapshot_partitions").set(self.assigned.len() as f64);
        Ok(())
    }

    /// Assembles every pending key that is complete, then merges and publishes changed models.
    fn publish(&mut self) {
        let mut models = BTreeSet::new();
        let keys: Vec<String> = self.pending.iter().cloned().collect();
        for key in keys {
            let Some((model, partition)) = checkpoint::parse_model_key(&key) else {
                self.pending.remove(&key);
                continue;
            };
            match self.store.get(&key) {
                Ok(Some((_, bytes))) => {
                    self.pending.remove(&key);
                    self.forget(&key);
                    match snapshot::decode(&bytes) {
                        Ok(s) => {
                            self.shards.insert((model.clone(), partition), s);
                            models.insert(model);
                        }
                        Err(e) => {
                            counter!("banditflow_serving_bad_snapshots_total").increment(1);
                            tracing::error!(key, error = %e, "undecodable snapshot on the snapshot topic; keeping the previous one");
                        }
                    }
                }
                Ok(None) => {
                    // Deleted: the model was removed from the processor's configuration.
                    self.pending.remove(&key);
                    if self.shards.remove(&(model.clone(), partition)).is_some() {
                        models.insert(model);
                    }
                }
                // A chunked value whose chunks have not all arrived: wait for them.
                Err(
                    BlobError::MissingChunk { .. } | BlobError::Length { .. } | BlobError::Checksum { .. },
                ) => {}
                Err(e) => {
                    self.pending.remove(&key);
                    self.forget(&key);
                    counter!("banditflow_serving_bad_snapshots_total").increment(1);
                    tracing::error!(key, error = %e, "unreadable value on the snapshot topic; keeping the previous one");
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
            let shards: Vec<&DecodedSnapshot> = self
                .shards
                .range((model.clone(), i32::MIN)..=(model.clone(), i32::MAX))
                .map(|(_, s)| s)
                .collect();
            if shards.is_empty() {
                next.models.remove(&model);
                continue;
            }
            match snapshot::merge_refs(&shards) {
                Ok(merged) => {
                    let m = ServingModel::new(merged, shards.len(), now);
                    gauge!("banditflow_serving_model_version", "model" => model.clone())
                        .set(m.version as f64);
                    gauge!("banditflow_serving_model_newest_event_timestamp_seconds", "model" => model.clone())
                        .set(m.newest_event_ms as f64 / 1000.0);
                    gauge!("banditflow_serving_model_visible_timestamp_seconds", "model" => model.clone())
                        .set(now as f64 / 1000.0);
                    counter!("banditflow_serving_model_updates_total", "model" => model.clone()).increment(1);
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
                Err(e) => {
                    // E.g. shards written under different parameters while a configuration
                    // change rolls through the processors: keep ranking with the last merge.
                    counter!("banditflow_serving_merge_failures_total", "model" => model.clone())
                        .increment(1);
                    tracing::warn!(model, error = %e, "shards do not merge yet; keeping the previous model");
                }
            }
        }
        self.catalog.store(Arc::new(next));
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
