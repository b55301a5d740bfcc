//! `banditflow run`: a member of a Kafka consumer group that learns from its assigned input
//! partitions and publishes their snapshots exactly once.
//!
//! Delivery guarantee: **exactly-once state**. Each input partition `p` is owned by one
//! partition task holding its [`PartitionState`] (which records the input offsets it covers).
//! Every `snapshot_interval`, on revocation and at shutdown, the consumer thread asks the tasks
//! for their state and writes, in **one Kafka transaction**, the shard snapshots, the
//! dead-lettered records, and the input offsets (`send_offsets_to_transaction` with the
//! consumer's current group metadata, so a zombie member is fenced). On assignment a task is
//! rebuilt from the newest committed snapshot of its partition and the consumer starts at the
//! offsets recorded in it (passed in the assignment itself). A failed transaction leaves the
//! in-memory state ahead of what is stored, so the whole session is discarded and rebuilt from
//! Kafka: nothing is lost, nothing counted twice.
//!
//! Threads: one consumer thread (polls, routes records, runs rebalance callbacks, collects the
//! tasks' snapshots), a small tokio runtime running one task per assigned partition, and a
//! commit thread per interval transaction, so the tasks go on learning while it commits. At
//! most one transaction runs at a time: the next commit, a rebalance and the end of a session
//! first wait for it, and its failure discards the session as above.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use metrics::{counter, gauge, histogram};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::core::blob;
use crate::core::checkpoint::{self, SavedPartition};
use crate::core::event::InvalidEvent;
use crate::core::partition::{Applied, InputRecord, PartitionState};
use crate::replay::{HEADER_CODE, HEADER_REASON};

use super::store;

/// Records handed to a partition task at a time.
const BATCH: usize = 256;

/// An input record copied out of the consumer's buffer.
#[derive(Debug)]
struct OwnedRecord {
    topic: usize,
    offset: i64,
    timestamp_ms: Option<i64>,
    /// The payload followed by the key, copied in one allocation (the key is only read again
    /// for dead letters, which carry a missing key as an empty one).
    bytes: Vec<u8>,
    payload_len: usize,
    headers: Vec<(String, Vec<u8>)>,
}

impl OwnedRecord {
    fn copy(topic: usize, m: &rdkafka::message::BorrowedMessage<'_>) -> OwnedRecord {
        let payload = m.payload().unwrap_or_default();
        let key = m.key().unwrap_or_default();
        let mut bytes = Vec::with_capacity(payload.len() + key.len());
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(key);
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        OwnedRecord {
            topic,
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            bytes,
            payload_len: payload.len(),
            headers,
        }
    }

    fn payload(&self) -> &[u8] {
        &self.bytes[..self.payload_len]
    }

    fn key(&self) -> &[u8] {
        &self.bytes[self.payload_len..]
    }
}

struct DeadLetter {
    record: OwnedRecord,
    reason: InvalidEvent,
}

enum Cmd {
    Records(Vec<OwnedRecord>),
    /// Report the state; with `stop`, end the task afterwards.
    Snapshot {
        stop: bool,
        reply: oneshot::Sender<ShardOutput>,
    },
}

struct ShardOutput {
    partition: i32,
    records: u64,
    /// `None` when nothing changed since the last report.
    saved: Option<SavedPartition>,
    offsets: Vec<(String, i32, i64)>,
    dead_letters: Vec<DeadLetter>,
    /// Record timestamps applied since the last report (for freshness).
    timestamps: Vec<i64>,
}

struct Task {
    tx: mpsc::Sender<Cmd>,
    batch: Vec<OwnedRecord>,
}

/// Why a session ended.
enum SessionEnd {
    /// Shut down cleanly: final snapshots committed, group left.
    Shutdown,
    /// State may be ahead of storage (failed transaction, failed restore): rebuild from Kafka.
    Restart(anyhow::Error),
}

/// State shared between the consumer loop and the rebalance callbacks (same thread).
struct Session {
    config: Arc<Config>,
    runtime: tokio::runtime::Handle,
    /// `None` while a transaction runs in the background (`inflight`).
    txn: Option<Txn>,
    inflight: Option<std::thread::JoinHandle<(Txn, anyhow::Result<()>)>>,
    tasks: BTreeMap<i32, Task>,
    /// Set when a transaction or restore failed; the session must be rebuilt.
    poisoned: Option<anyhow::Error>,
    topic_index: HashMap<String, usize>,
}

struct Ctx {
    session: Mutex<Option<Session>>,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Option<Session>> {
        // A panic while holding the lock is a bug; keep going with the data as it is.
        self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    gauge!("banditflow_consumer_lag_records", "topic" => topic.clone(), "partition" => p.to_string())
                        .set(part.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let mut guard = self.lock();
        let Some(session) = guard.as_mut() else { return };
        counter!("banditflow_rebalances_total").increment(1);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let with_offsets = session.assign(tpl);
                if let Err(e) = consumer.assign(&with_offsets) {
                    session.poison(anyhow!("assigning partitions failed: {e}"));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                session.revoke(consumer, tpl);
                if let Err(e) = consumer.unassign() {
                    session.poison(anyhow!("unassigning partitions failed: {e}"));
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

fn input_partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut ps: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

impl Session {
    fn poison(&mut self, e: anyhow::Error) {
        tracing::error!(error = %format!("{e:#}"), "session state is no longer stored safely; rebuilding from Kafka");
        if self.poisoned.is_none() {
            self.poisoned = Some(e);
        }
    }

    /// Restores the newly assigned partitions and returns the assignment with their offsets.
    fn assign(&mut self, tpl: &TopicPartitionList) -> TopicPartitionList {
        if let Err(e) = self.settle() {
            self.poison(e);
            return TopicPartitionList::new();
        }
        let parts: Vec<i32> =
            input_partitions(tpl).into_iter().filter(|p| !self.tasks.contains_key(p)).collect();
        let started = Instant::now();
        let k = &self.config.kafka;
        let restored = store::read_partitions(
            super::client_config(k),
            &k.snapshot_topic,
            &parts,
            Duration::from_millis(k.restore_timeout_ms as u64),
        );
        let stores = match restored {
            Ok(s) => s,
            Err(e) => {
                self.poison(e.context("restoring assigned partitions"));
                return TopicPartitionList::new();
            }
        };
        let mut states = BTreeMap::new();
        for (p, s) in &stores {
            match store::restore_partition(&self.config, *p, s) {
                Ok(state) => {
                    if let Some(txn) = self.txn.as_mut() {
                        txn.chunks.extend(store::chunk_counts(s));
                    }
                    states.insert(*p, state);
                }
                Err(e) => {
                    self.poison(e);
                    return TopicPartitionList::new();
                }
            }
        }
        let mut out = TopicPartitionList::new();
        for e in tpl.elements() {
            let offset = states
                .get(&e.partition())
                .and_then(|s| s.offsets.get(&(e.topic().to_string(), e.partition())))
                .map_or(Offset::Stored, |o| Offset::Offset(*o));
            if let Err(err) = out.add_partition_offset(e.topic(), e.partition(), offset) {
                self.poison(anyhow!("building the assignment: {err}"));
            }
        }
        let ends = self.input_ends(&parts);
        let latest = self
            .config
            .kafka
            .properties
            .get("auto.offset.reset")
            .is_some_and(|v| matches!(v.as_str(), "latest" | "largest" | "end"));
        for (p, state) in states {
            tracing::info!(partition = p, records = state.records, "partition assigned and restored");
            // Which input topics have nothing to deliver right now (the state's next offset, or
            // the earliest one if it has none, is at the end): the aligner waits for the first
            // record of the others before it lets one topic run ahead.
            let at_end = self
                .config
                .topics
                .iter()
                .map(|t| {
                    let key = (t.name.clone(), p);
                    ends.get(&key).is_some_and(|&(low, high)| {
                        let start =
                            state.offsets.get(&key).copied().unwrap_or(if latest { high } else { low });
                        start.max(low) >= high
                    })
                })
                .collect();
            self.spawn(p, state, at_end);
        }
        histogram!("banditflow_restore_seconds").record(started.elapsed().as_secs_f64());
        gauge!("banditflow_assigned_partitions").set(self.tasks.len() as f64);
        out
    }

    /// The input topics' watermarks for `parts`, needed only to align two topics (empty with
    /// one topic, or when the query fails: the aligner then waits for first records).
    fn input_ends(&self, parts: &[i32]) -> BTreeMap<(String, i32), (i64, i64)> {
        let topics: Vec<&str> = self.config.topics.iter().map(|t| t.name.as_str()).collect();
        if topics.len() < 2 || parts.is_empty() {
            return BTreeMap::new();
        }
        let client = super::client_config(&self.config.kafka);
        store::watermarks(client, &topics, parts, Duration::from_secs(5)).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "input end offsets unknown; waiting for first records");
            BTreeMap::new()
        })
    }

    fn spawn(&mut self, partition: i32, state: PartitionState, at_end: Vec<bool>) {
        let cap = (self.config.kafka.partition_queue_records / BATCH).max(2);
        let (tx, rx) = mpsc::channel(cap);
        let config = Arc::clone(&self.config);
        self.runtime.spawn(partition_task(config, state, at_end, rx));
        self.tasks.insert(partition, Task { tx, batch: Vec::with_capacity(BATCH) });
    }

    fn revoke(&mut self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let parts: Vec<i32> =
            input_partitions(tpl).into_iter().filter(|p| self.tasks.contains_key(p)).collect();
        // The transaction in flight must end before this member gives the partitions up, even
        // when the session is poisoned: otherwise it could still commit after the next owner
        // restored from the snapshot before it.
        if let Err(e) = self.settle() {
            self.poison(e);
        }
        if self.poisoned.is_none() {
            if let Err(e) = self.commit(consumer, Some(&parts), true, false) {
                self.poison(e.context("committing revoked partitions"));
            }
        }
        for p in &parts {
            self.tasks.remove(p);
        }
        tracing::info!(partitions = ?parts, "partitions revoked");
        gauge!("banditflow_assigned_partitions").set(self.tasks.len() as f64);
    }

    fn route(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(&topic) = self.topic_index.get(m.topic()) else { return };
        let Some(task) = self.tasks.get_mut(&m.partition()) else { return };
        task.batch.push(OwnedRecord::copy(topic, m));
        if task.batch.len() >= BATCH {
            let batch = std::mem::replace(&mut task.batch, Vec::with_capacity(BATCH));
            if task.tx.blocking_send(Cmd::Records(batch)).is_err() {
                self.poison(anyhow!("partition task {} ended unexpectedly", m.partition()));
            }
        }
    }

    fn flush_batches(&mut self) {
        let mut dead = Vec::new();
        for (p, task) in &mut self.tasks {
            if !task.batch.is_empty() {
                let batch = std::mem::replace(&mut task.batch, Vec::with_capacity(BATCH));
                if task.tx.blocking_send(Cmd::Records(batch)).is_err() {
                    dead.push(*p);
                }
            }
        }
        for p in dead {
            self.poison(anyhow!("partition task {p} ended unexpectedly"));
        }
    }

    /// One transaction: snapshots of `only` (or all) partitions, their dead letters, and their
    /// input offsets. With `stop` the tasks end after reporting. The previous transaction is
    /// settled first (its failure is this call's error). With `background` the transaction runs
    /// on a commit thread while the consumer thread goes on feeding the tasks; it is settled by
    /// the next commit, a rebalance, or the end of the session.
    fn commit(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        only: Option<&[i32]>,
        stop: bool,
        background: bool,
    ) -> anyhow::Result<()> {
        self.settle()?;
        let gather_started = Instant::now();
        self.flush_batches();
        let targets: Vec<i32> = match only {
            Some(ps) => ps.to_vec(),
            None => self.tasks.keys().copied().collect(),
        };
        let mut replies = Vec::new();
        for p in &targets {
            if let Some(task) = self.tasks.get(p) {
                let (reply, rx) = oneshot::channel();
                task.tx
                    .blocking_send(Cmd::Snapshot { stop, reply })
                    .map_err(|_| anyhow!("partition task {p} ended"))?;
                replies.push(rx);
            }
        }
        let mut outputs = Vec::new();
        for rx in replies {
            outputs.push(rx.blocking_recv().map_err(|_| anyhow!("partition task ended without reporting"))?);
        }
        // Time the tasks took to apply what was queued before the request and to encode.
        histogram!("banditflow_snapshot_gather_seconds").record(gather_started.elapsed().as_secs_f64());
        if outputs.iter().all(|o| o.saved.is_none() && o.dead_letters.is_empty()) {
            return Ok(());
        }
        let cgm = consumer.group_metadata().ok_or_else(|| anyhow!("no consumer group metadata"))?;
        if background {
            let mut txn = self.txn.take().ok_or_else(|| anyhow!("the transactional producer is gone"))?;
            let handle = std::thread::Builder::new()
                .name("banditflow-commit".into())
                .spawn(move || {
                    let result = txn.run(&outputs, &cgm);
                    (txn, result)
                })
                .context("starting the commit thread")?;
            self.inflight = Some(handle);
            Ok(())
        } else {
            self.txn
                .as_mut()
                .ok_or_else(|| anyhow!("the transactional producer is gone"))?
                .run(&outputs, &cgm)
        }
    }

    /// Waits for the transaction running in the background, if any, and returns its outcome.
    fn settle(&mut self) -> anyhow::Result<()> {
        let Some(handle) = self.inflight.take() else { return Ok(()) };
        match handle.join() {
            Ok((txn, result)) => {
                self.txn = Some(txn);
                result
            }
            Err(_) => Err(anyhow!("the commit thread panicked")),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The producer must not outlive the session in a detached thread.
        let _ = self.settle();
    }
}

/// The transactional producer and what it needs to write a transaction: one at a time, on the
/// consumer thread or on a commit thread.
struct Txn {
    config: Arc<Config>,
    producer: BaseProducer,
    /// Chunk counts of stored snapshot keys, to delete surplus chunks.
    chunks: HashMap<String, u32>,
}

impl Txn {
    /// One transaction: the shard snapshots and dead letters of `outputs` and their input
    /// offsets, committed with the consumer's group metadata `cgm`.
    fn run(
        &mut self,
        outputs: &[ShardOutput],
        cgm: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let k = &self.config.kafka;
        let timeout = Duration::from_millis(k.transaction_timeout_ms as u64);
        self.producer.begin_transaction().context("begin transaction")?;
        let mut offsets = TopicPartitionList::new();
        let mut bytes = 0usize;
        let mut new_chunks = Vec::new();
        for out in outputs {
            for (t, p, o) in &out.offsets {
                offsets.add_partition_offset(t, *p, Offset::Offset(*o))?;
            }
            if let Some(saved) = &out.saved {
                for (key, value) in &saved.puts {
                    bytes += value.len();
                    self.put(key, out.records, out.partition, value, &mut new_chunks)?;
                }
                for key in &saved.deletes {
                    self.send(&k.snapshot_topic, Some(out.partition), key.as_bytes(), None, None)?;
                }
                let mut values = vec![(store::checkpoint_key(out.partition), &saved.header)];
                for (model, b) in &saved.models {
                    values.push((store::model_key(model, out.partition), b));
                }
                for (key, value) in values {
                    bytes += value.len();
                    self.put(&key, out.records, out.partition, value, &mut new_chunks)?;
                }
            }
            for d in &out.dead_letters {
                let t = &self.config.topics[d.record.topic].name;
                let mut h = OwnedHeaders::new();
                for (name, v) in &d.record.headers {
                    h = h.insert(Header { key: name, value: Some(v.as_slice()) });
                }
                let partition = out.partition.to_string();
                let offset = d.record.offset.to_string();
                for (name, v) in [
                    (HEADER_CODE, d.reason.code()),
                    (HEADER_REASON, d.reason.to_string().as_str()),
                    ("banditflow.source.topic", t.as_str()),
                    ("banditflow.source.partition", partition.as_str()),
                    ("banditflow.source.offset", offset.as_str()),
                ] {
                    h = h.insert(Header { key: name, value: Some(v.as_bytes()) });
                }
                let key = d.record.key();
                self.send(&k.dead_letter_topic, None, key, Some(d.record.payload()), Some(h))?;
                counter!("banditflow_dead_letters_total", "reason" => d.reason.code()).increment(1);
            }
        }
        self.producer
            .send_offsets_to_transaction(&offsets, cgm, timeout)
            .map_err(|e| self.txn_error("send offsets", e))?;
        // Drain deliveries first: commit_transaction alone waits in 100 ms steps.
        let deadline = Instant::now() + timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(1));
        }
        self.producer.commit_transaction(timeout).map_err(|e| self.txn_error("commit", e))?;
        let now = super::now_ms();
        for out in outputs {
            for ts in &out.timestamps {
                histogram!("banditflow_event_to_snapshot_seconds").record((now - ts).max(0) as f64 / 1e3);
            }
        }
        for (key, n) in new_chunks {
            if n > 0 {
                self.chunks.insert(key, n);
            } else {
                self.chunks.remove(&key);
            }
        }
        counter!("banditflow_snapshot_transactions_total").increment(1);
        counter!("banditflow_snapshot_bytes_total").increment(bytes as u64);
        histogram!("banditflow_snapshot_commit_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Writes one value of the snapshot topic, chunked if large.
    fn put(
        &self,
        key: &str,
        version: u64,
        partition: i32,
        value: &[u8],
        chunks: &mut Vec<(String, u32)>,
    ) -> anyhow::Result<()> {
        let k = &self.config.kafka;
        let previous = self.chunks.get(key).copied().unwrap_or(0);
        let recs = blob::split(key, version, value, k.max_record_bytes, previous);
        let n = recs.iter().filter(|r| r.value.is_some() && r.key != key).count() as u32;
        if n > 0 || previous > 0 {
            chunks.push((key.to_string(), n));
        }
        for r in recs {
            self.send(&k.snapshot_topic, Some(partition), r.key.as_bytes(), r.value.as_deref(), None)?;
        }
        Ok(())
    }

    fn txn_error(&self, what: &str, e: KafkaError) -> anyhow::Error {
        if let KafkaError::Transaction(t) = &e {
            if t.txn_requires_abort() {
                let _ = self.producer.abort_transaction(Duration::from_secs(10));
            }
        }
        anyhow!("transaction {what} failed: {e}")
    }

    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> anyhow::Result<()> {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(anyhow!("producing to `{topic}`: {e}")),
            }
        }
    }
}

/// Records waiting in a partition task, one queue per input topic, released in timestamp order
/// so that impressions and feedback read from two topics meet in event order even when the
/// consumer reads one topic far ahead of the other (e.g. while catching up on lag).
///
/// A topic that has delivered nothing yet since the task started, and was not at its end then,
/// is waited for up to [`FIRST_RECORD_WAIT`] rather than `max_idle`: right after an assignment
/// the consumer may fetch one topic a good while before the other, and giving up after
/// `max_idle` would apply one topic's backlog alone (feedback held past its grace and orphaned).
struct Aligner {
    queues: Vec<std::collections::VecDeque<OwnedRecord>>,
    empty_since: Vec<Instant>,
    /// Whether the topic has delivered a record, or had nothing to deliver at the start.
    heard: Vec<bool>,
    queued: usize,
    max_idle: Duration,
    cap: usize,
}

/// The longest wait for the first record of a topic that had records to deliver at the start.
/// (A quiet topic written with Kafka transactions ends in a commit marker, which looks like one
/// record to deliver: it costs this wait once after each assignment.)
const FIRST_RECORD_WAIT: Duration = Duration::from_secs(5);

impl Aligner {
    fn new(at_end: Vec<bool>, max_idle: Duration, cap: usize) -> Aligner {
        Aligner {
            queues: at_end.iter().map(|_| std::collections::VecDeque::new()).collect(),
            empty_since: vec![Instant::now(); at_end.len()],
            heard: at_end,
            queued: 0,
            max_idle,
            cap,
        }
    }

    fn push(&mut self, r: OwnedRecord) {
        let t = r.topic;
        self.heard[t] = true;
        self.queues[t].push_back(r);
        self.queued += 1;
    }

    /// How long an empty topic is waited for before the others may run ahead of it.
    fn idle_limit(&self, u: usize) -> Duration {
        if self.heard[u] {
            self.max_idle
        } else {
            FIRST_RECORD_WAIT.max(self.max_idle)
        }
    }

    /// The next record to apply: the oldest head, if every other topic either has records or
    /// has had none for its idle limit (or the queues are over their cap).
    fn pop(&mut self, now: Instant) -> Option<OwnedRecord> {
        let (t, _) = self
            .queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|r| (i, (r.timestamp_ms.unwrap_or(i64::MIN), i))))
            .min_by_key(|(_, key)| *key)?;
        let waiting = self.queues.iter().enumerate().any(|(u, q)| {
            u != t && q.is_empty() && now.duration_since(self.empty_since[u]) < self.idle_limit(u)
        });
        if waiting && self.queued <= self.cap {
            return None;
        }
        let r = self.queues[t].pop_front()?;
        self.queued -= 1;
        if self.queues[t].is_empty() {
            self.empty_since[t] = now;
        }
        Some(r)
    }

    /// How long until a waiting record may be released by the idle rule (the longest remaining
    /// wait: `pop` releases only when no empty topic is still waited for).
    fn wait_hint(&self, now: Instant) -> Option<Duration> {
        if self.queued == 0 {
            return None;
        }
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.is_empty())
            .map(|(u, _)| self.idle_limit(u).saturating_sub(now.duration_since(self.empty_since[u])))
            .max()
            .map(|d| d.max(Duration::from_millis(1)))
    }
}

async fn partition_task(
    config: Arc<Config>,
    mut state: PartitionState,
    at_end: Vec<bool>,
    mut rx: mpsc::Receiver<Cmd>,
) {
    let mut last_saved = state.records;
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut timestamps = Vec::new();
    let mut reported = state.join.counters.clone();
    let mut reported_invalid = state.invalid.clone();
    let spec = &config.core;
    let mut aligner = Aligner::new(
        at_end,
        Duration::from_millis(config.kafka.max_idle_ms as u64),
        config.kafka.partition_queue_records,
    );
    let apply = |state: &mut PartitionState,
                 r: OwnedRecord,
                 dead: &mut Vec<DeadLetter>,
                 timestamps: &mut Vec<i64>| {
        let t = &config.topics[r.topic];
        let input = InputRecord {
            topic: &t.name,
            partition: state.partition,
            offset: r.offset,
            role: t.role,
            encoding: t.encoding,
            payload: r.payload(),
            timestamp_ms: r.timestamp_ms,
        };
        match state.apply(spec, input) {
            Applied::Invalid(reason) => dead.push(DeadLetter { record: r, reason }),
            Applied::AlreadyCovered => counter!("banditflow_redelivered_records_total").increment(1),
            Applied::Event(_) => {
                if let Some(ts) = r.timestamp_ms {
                    timestamps.push(ts);
                }
            }
        }
    };
    loop {
        let cmd = match aligner.wait_hint(Instant::now()) {
            Some(wait) => match tokio::time::timeout(wait, rx.recv()).await {
                Ok(c) => c,
                Err(_) => {
                    while let Some(r) = aligner.pop(Instant::now()) {
                        apply(&mut state, r, &mut dead, &mut timestamps);
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(cmd) = cmd else { return };
        match cmd {
            Cmd::Records(batch) => {
                if config.topics.len() == 1 {
                    for r in batch {
                        apply(&mut state, r, &mut dead, &mut timestamps);
                    }
                } else {
                    for r in batch {
                        aligner.push(r);
                    }
                    while let Some(r) = aligner.pop(Instant::now()) {
                        apply(&mut state, r, &mut dead, &mut timestamps);
                    }
                }
            }
            Cmd::Snapshot { stop, reply } => {
                let saved = (state.records != last_saved || !dead.is_empty())
                    .then(|| checkpoint::save_changes(spec, &mut state));
                for ((name, now), (_, before)) in state.join.counters.rows().iter().zip(reported.rows()) {
                    if *now > before {
                        counter!("banditflow_events_total", "outcome" => *name).increment(now - before);
                    }
                }
                for (code, n) in &state.invalid {
                    let before = reported_invalid.get(code).copied().unwrap_or(0);
                    if *n > before {
                        counter!("banditflow_invalid_records_total", "reason" => *code).increment(n - before);
                    }
                }
                reported = state.join.counters.clone();
                reported_invalid = state.invalid.clone();
                let p = state.partition.to_string();
                gauge!("banditflow_buffered_impressions", "partition" => p.clone())
                    .set(state.join.buffered_impressions() as f64);
                gauge!("banditflow_held_feedback", "partition" => p.clone())
                    .set(state.join.pending_feedback() as f64);
                if let Some(wm) = state.watermark_ms(spec) {
                    gauge!("banditflow_watermark_seconds", "partition" => p).set(wm as f64 / 1e3);
                }
                last_saved = state.records;
                let out = ShardOutput {
                    partition: state.partition,
                    records: state.records,
                    saved,
                    offsets: state.offsets.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect(),
                    dead_letters: std::mem::take(&mut dead),
                    timestamps: std::mem::take(&mut timestamps),
                };
                let _ = reply.send(out);
                if stop {
                    return;
                }
            }
        }
    }
}

/// Runs until `shutdown` is set (then commits final snapshots, leaves the group and returns).
pub fn run(config: Arc<Config>, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let partitions = super::admin::prepare_topics(&config)?;
    tracing::info!(partitions, group = %config.kafka.group_id, instance = %config.kafka.instance_id, "input topics checked");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("banditflow-partition")
        .enable_all()
        .build()
        .context("starting the task runtime")?;
    let mut failures = 0u32;
    loop {
        match session(&config, &runtime, &shutdown) {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Restart(e)) | Err(e) => {
                counter!("banditflow_session_restarts_total").increment(1);
                if shutdown.load(Ordering::SeqCst) {
                    return Err(e.context(
                        "shutting down without a final snapshot; state is safe at the last committed one",
                    ));
                }
                failures += 1;
                let wait = Duration::from_secs(u64::from(failures.min(5)));
                tracing::warn!(error = %format!("{e:#}"), ?wait, "restarting the session from the last committed snapshots");
                let until = Instant::now() + wait;
                while Instant::now() < until && !shutdown.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

fn session(
    config: &Arc<Config>,
    runtime: &tokio::runtime::Runtime,
    shutdown: &AtomicBool,
) -> anyhow::Result<SessionEnd> {
    let k = &config.kafka;
    let mut pc = super::client_config(k);
    pc.set("transactional.id", format!("{}-{}", k.group_id, k.instance_id))
        .set("transaction.timeout.ms", k.transaction_timeout_ms.to_string())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", (k.max_record_bytes + 64 * 1024).to_string())
        .set("linger.ms", "2");
    let producer: BaseProducer = pc.create().context("creating the transactional producer")?;
    producer
        .init_transactions(Duration::from_millis(k.transaction_timeout_ms as u64 * 2))
        .context("initialising transactions (fences earlier instances with the same instance id)")?;
    let topic_index = config.topics.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let ctx = Ctx {
        session: Mutex::new(Some(Session {
            config: Arc::clone(config),
            runtime: runtime.handle().clone(),
            txn: Some(Txn { config: Arc::clone(config), producer, chunks: HashMap::new() }),
            inflight: None,
            tasks: BTreeMap::new(),
            poisoned: None,
            topic_index,
        })),
    };
    let mut cc = super::client_config(k);
    cc.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("queued.max.messages.kbytes", k.prefetch_kbytes.to_string());
    if !k.properties.contains_key("auto.offset.reset") {
        cc.set("auto.offset.reset", "earliest");
    }
    if !k.properties.contains_key("statistics.interval.ms") {
        cc.set("statistics.interval.ms", "5000");
    }
    // Impressions and feedback of partition p must meet in one task: range assignment gives a
    // member the same partition numbers of co-partitioned topics.
    cc.set("partition.assignment.strategy", "range").set("group.protocol", "classic");
    let consumer: BaseConsumer<Ctx> = cc.create_with_context(ctx).context("creating the consumer")?;
    let topics: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
    consumer.subscribe(&topics).context("subscribing to the input topics")?;
    let interval = Duration::from_millis(k.snapshot_interval_ms as u64);
    let mut next_commit = Instant::now() + interval;
    loop {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let polled = consumer.poll(Duration::from_millis(20));
        let mut guard = consumer.context().lock();
        let Some(s) = guard.as_mut() else { return Err(anyhow!("session vanished")) };
        match polled {
            Some(Ok(m)) => s.route(&m),
            Some(Err(e)) => {
                counter!("banditflow_consumer_errors_total").increment(1);
                tracing::warn!(error = %e, "consumer error");
            }
            None => s.flush_batches(),
        }
        // A poisoned session stays poisoned until dropped, so the revocation that closing the
        // consumer triggers commits nothing.
        if let Some(e) = &s.poisoned {
            let e = anyhow!("{e:#}");
            // End the transaction in flight before closing the consumer leaves the group.
            let _ = s.settle();
            return Ok(SessionEnd::Restart(e));
        }
        if Instant::now() >= next_commit {
            if let Err(e) = s.commit(&consumer, None, false, true) {
                s.poison(anyhow!("{e:#}"));
                return Ok(SessionEnd::Restart(e));
            }
            next_commit = Instant::now() + interval;
        }
    }
    // Shutdown: final snapshots of everything we own, then leave the group.
    tracing::info!("shutting down: committing final snapshots");
    {
        let mut guard = consumer.context().lock();
        let Some(s) = guard.as_mut() else { return Err(anyhow!("session vanished")) };
        let parts: Vec<i32> = s.tasks.keys().copied().collect();
        if let Err(e) = s.commit(&consumer, Some(&parts), true, false) {
            s.poison(anyhow!("{e:#}"));
            return Ok(SessionEnd::Restart(e));
        }
        s.tasks.clear();
    }
    consumer.unsubscribe();
    // Serve the resulting revocation (nothing left to commit) and leave the group.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
        let _ = consumer.poll(Duration::from_millis(20));
    }
    drop(consumer);
    tracing::info!("left the group");
    Ok(SessionEnd::Shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: usize, timestamp_ms: i64) -> OwnedRecord {
        OwnedRecord {
            topic,
            offset: 0,
            timestamp_ms: Some(timestamp_ms),
            bytes: Vec::new(),
            payload_len: 0,
            headers: Vec::new(),
        }
    }

    const IDLE: Duration = Duration::from_millis(200);

    #[test]
    fn a_topic_with_a_backlog_is_waited_for_until_its_first_record() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![false, false], IDLE, 1000);
        a.push(record(1, 10));
        let t1 = t0 + FIRST_RECORD_WAIT / 2;
        assert!(a.pop(t1).is_none(), "feedback must not run ahead of unseen impressions");
        a.push(record(0, 5));
        let first = a.pop(t1).expect("both topics heard");
        assert_eq!(first.topic, 0, "oldest timestamp first");
        // Topic 0 is now heard and empty: the steady-state idle limit applies.
        assert!(a.pop(t1 + IDLE / 2).is_none());
        assert_eq!(a.pop(t1 + IDLE * 2).map(|r| r.topic), Some(1));
    }

    #[test]
    fn a_topic_at_its_end_is_waited_for_only_the_idle_limit() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![true, false], IDLE, 1000);
        a.push(record(1, 10));
        assert_eq!(a.pop(t0 + IDLE * 2).map(|r| r.topic), Some(1));
    }

    #[test]
    fn the_wait_for_a_first_record_is_bounded() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![false, false], IDLE, 1000);
        a.push(record(1, 10));
        assert!(a.pop(t0 + FIRST_RECORD_WAIT / 2).is_none());
        assert_eq!(a.pop(t0 + FIRST_RECORD_WAIT + IDLE).map(|r| r.topic), Some(1));
        assert!(a.wait_hint(t0).is_none(), "nothing queued");
    }

    #[test]
    fn the_wait_hint_is_the_longest_remaining_wait() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![true, false, false], IDLE, 1000);
        a.push(record(2, 10));
        let hint = a.wait_hint(t0 + IDLE * 2).expect("a record waits");
        assert!(hint > FIRST_RECORD_WAIT / 2, "topic 1 is still waited for: {hint:?}");
    }

    #[test]
    fn a_full_queue_is_released_without_waiting() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![false, false], IDLE, 2);
        for ts in 0..3 {
            a.push(record(1, ts));
        }
        assert_eq!(a.pop(t0).map(|r| r.timestamp_ms), Some(Some(0)));
    }
}
