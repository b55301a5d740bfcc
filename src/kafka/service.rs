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
//!
//! Two input topics are aligned per partition task (see [`Aligner`]): records are applied in
//! timestamp order across both, and a topic whose partition still has records on the broker is
//! never overtaken. The consumer thread tells each task, in order with its records, which of
//! its inputs are behind (the consumer's position below the end offset last reported by the
//! broker); a task that holds too many records of one topic while it waits for another asks
//! the consumer thread to pause that topic-partition, and to resume it once the other caught up.

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

/// One input record in this many (by offset) gives a sample of `banditflow_event_to_snapshot_seconds`.
const FRESHNESS_SAMPLE: i64 = 16;

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
    /// What the consumer now knows of input `topic`'s records on the broker; sent after the
    /// records routed before it, so "caught up" covers every record the task has been sent.
    Backlog {
        topic: usize,
        backlog: Backlog,
    },
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
    /// Record timestamps applied since the last report (for freshness): one record in
    /// [`FRESHNESS_SAMPLE`], by offset, an unbiased sample of the latency distribution that
    /// costs a push per 16 records instead of one per record.
    timestamps: Vec<i64>,
}

struct Task {
    tx: mpsc::Sender<Cmd>,
    batch: Vec<OwnedRecord>,
    /// Per input topic (index into `config.topics`), when two or more are aligned; else empty.
    inputs: Vec<InputLag>,
    /// The task's pause requests (read on the consumer thread only).
    flow: Arc<Flow>,
    started: Instant,
}

/// What an input topic of a partition task has left on the broker, as far as the consumer
/// knows. Decides whether the task may skip the topic when it has no records of it queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backlog {
    /// Not known yet (end offsets unreadable, or where the consumer starts is not known): the
    /// topic is waited for up to [`FIRST_RECORD_WAIT`] for its first record, then `max_idle`.
    Unknown,
    /// Records are known to exist on the broker past the ones delivered: never skipped.
    Behind,
    /// Delivered up to the end offset last reported: may be skipped after `max_idle`.
    CaughtUp,
}

/// The consumer thread's view of one (input topic, partition): how far it has delivered
/// records and where the partition ends.
#[derive(Clone, Copy, Debug)]
struct InputLag {
    /// The consumer's position: past the last record routed, or librdkafka's own position,
    /// which also moves past transaction markers (control records). -1: not known.
    next: i64,
    /// `next` is where the consumer should start (the log start: the state had no offset) but
    /// nothing has confirmed it yet. A group offset committed without a state (a re-created
    /// snapshot topic) would start it elsewhere, possibly at the end with nothing to deliver:
    /// without confirmation within [`FIRST_RECORD_WAIT`] the position counts as unknown.
    assumed: bool,
    /// The end offset last known (read_committed: the last stable offset, from the watermarks
    /// read at assignment and the fetch responses reported in the statistics). -1: not known.
    end: i64,
    /// What the task was last told.
    told: Backlog,
    /// Paused on the consumer at the task's request.
    paused: bool,
}

impl InputLag {
    /// The consumer delivered up to `next` (a record, or its position).
    fn delivered(&mut self, next: i64) -> bool {
        self.assumed = false;
        let moved = next > self.next;
        self.next = self.next.max(next);
        moved
    }

    fn backlog(&self) -> Backlog {
        if self.next < 0 || self.end < 0 {
            Backlog::Unknown
        } else if self.next < self.end {
            Backlog::Behind
        } else {
            Backlog::CaughtUp
        }
    }
}

/// A partition task's pause requests to the consumer thread, which alone may call
/// `pause`/`resume` on the consumer it owns. A fresh one per task, so a request of a task that
/// has already been revoked never reaches the partition's next task.
struct Flow {
    /// Per input topic: whether the task wants it paused.
    want: Vec<AtomicBool>,
    /// Set after `want` changed; one flag per session, checked after every poll.
    changed: Arc<AtomicBool>,
}

impl Flow {
    fn request(&self, paused: &[bool]) {
        for (w, p) in self.want.iter().zip(paused) {
            w.store(*p, Ordering::SeqCst);
        }
        self.changed.store(true, Ordering::SeqCst);
    }
}

/// How often, while an input is not known to be caught up, the consumer's positions are read
/// (a local call): they move past transaction markers, which no record reports.
const POSITION_CHECK: Duration = Duration::from_millis(50);

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
    /// Two or more input topics, aligned per partition task.
    align: bool,
    /// Set by a task that changed its pause requests (see [`Flow`]).
    flow_changed: Arc<AtomicBool>,
    /// Set when an input's position or end offset moved (the tasks may need telling).
    lag_changed: bool,
    next_position_check: Instant,
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
    /// Runs on the consumer thread, inside `poll` (never while the session is locked).
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    gauge!("banditflow_consumer_lag_records", "topic" => topic.clone(), "partition" => p.to_string())
                        .set(part.consumer_lag as f64);
                }
            }
        }
        if let Some(session) = self.lock().as_mut() {
            session.observe_stats(&stats);
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
                let (with_offsets, fresh) = session.assign(tpl);
                if let Err(e) = consumer.assign(&with_offsets) {
                    session.poison(anyhow!("assigning partitions failed: {e}"));
                } else if fresh.count() > 0 {
                    // A pause outlives an assignment in librdkafka: a partition that comes back
                    // to a new task starts resumed, whatever happened to it before.
                    if let Err(e) = consumer.resume(&fresh) {
                        session.poison(anyhow!("resuming assigned partitions failed: {e}"));
                    }
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

/// An aligned input at assignment: where the consumer starts (`restored`, the state's next
/// offset) against the partition's (low, high) watermarks read just before (read_committed, so
/// `high` is the last stable offset), when they could be read.
fn input_lag(restored: Option<i64>, watermarks: Option<(i64, i64)>, latest: bool) -> InputLag {
    let (next, end, assumed) = match (restored, watermarks) {
        // Below the log start the consumer is reset: to the start, or with `latest` to the end.
        (Some(o), Some((low, high))) => (if o < low && latest { high } else { o.max(low) }, high, false),
        // No offset in the state: the consumer starts where `auto.offset.reset` says (the
        // group has no committed offsets where the state has none, unless the snapshot topic
        // was lost: hence `assumed`).
        (None, Some((low, high))) if latest || low >= high => (high, high, false),
        (None, Some((low, high))) => (low, high, true),
        (restored, None) => (restored.unwrap_or(-1), -1, false),
    };
    let mut lag = InputLag { next, end, assumed, told: Backlog::Unknown, paused: false };
    lag.told = lag.backlog();
    lag
}

impl Session {
    fn poison(&mut self, e: anyhow::Error) {
        tracing::error!(error = %format!("{e:#}"), "session state is no longer stored safely; rebuilding from Kafka");
        if self.poisoned.is_none() {
            self.poisoned = Some(e);
        }
    }

    /// Restores the newly assigned partitions and returns the assignment with their offsets,
    /// and the input topic-partitions of the tasks it started (to be resumed once assigned).
    fn assign(&mut self, tpl: &TopicPartitionList) -> (TopicPartitionList, TopicPartitionList) {
        if let Err(e) = self.settle() {
            self.poison(e);
            return (TopicPartitionList::new(), TopicPartitionList::new());
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
                return (TopicPartitionList::new(), TopicPartitionList::new());
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
                    return (TopicPartitionList::new(), TopicPartitionList::new());
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
        let mut fresh = TopicPartitionList::new();
        for (p, state) in states {
            tracing::info!(partition = p, records = state.records, "partition assigned and restored");
            let inputs: Vec<InputLag> = if self.align {
                self.config
                    .topics
                    .iter()
                    .map(|t| {
                        fresh.add_partition(&t.name, p);
                        let key = (t.name.clone(), p);
                        input_lag(state.offsets.get(&key).copied(), ends.get(&key).copied(), latest)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            self.spawn(p, state, inputs);
        }
        histogram!("banditflow_restore_seconds").record(started.elapsed().as_secs_f64());
        gauge!("banditflow_assigned_partitions").set(self.tasks.len() as f64);
        self.report_lag();
        (out, fresh)
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

    fn spawn(&mut self, partition: i32, state: PartitionState, inputs: Vec<InputLag>) {
        let cap = (self.config.kafka.partition_queue_records / BATCH).max(2);
        let (tx, rx) = mpsc::channel(cap);
        let config = Arc::clone(&self.config);
        let flow = Arc::new(Flow {
            want: inputs.iter().map(|_| AtomicBool::new(false)).collect(),
            changed: Arc::clone(&self.flow_changed),
        });
        let backlog: Vec<Backlog> = inputs.iter().map(|i| i.told).collect();
        for (i, b) in backlog.iter().enumerate() {
            tracing::debug!(
                partition, topic = %self.config.topics[i].name, next = inputs[i].next, end = inputs[i].end,
                backlog = ?b, "input backlog at assignment"
            );
        }
        self.runtime.spawn(partition_task(config, state, backlog, Arc::clone(&flow), rx));
        let task = Task { tx, batch: Vec::with_capacity(BATCH), inputs, flow, started: Instant::now() };
        self.tasks.insert(partition, task);
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
        // The tasks have ended; what they had paused must not stay paused for whoever gets the
        // partitions next (this member included: a pause outlives the assignment).
        self.release_pauses(consumer, &parts);
        for p in &parts {
            self.tasks.remove(p);
        }
        tracing::info!(partitions = ?parts, "partitions revoked");
        gauge!("banditflow_assigned_partitions").set(self.tasks.len() as f64);
        self.report_lag();
    }

    fn route(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(&topic) = self.topic_index.get(m.topic()) else { return };
        let Some(task) = self.tasks.get_mut(&m.partition()) else { return };
        task.batch.push(OwnedRecord::copy(topic, m));
        // With aligned topics: the record may be the last one the broker reported (or the first
        // that tells where the consumer is); the task hears so right after the record.
        let mut told = None;
        if let Some(input) = task.inputs.get_mut(topic) {
            input.delivered(m.offset() + 1);
            let backlog = input.backlog();
            if backlog != input.told {
                input.told = backlog;
                told = Some(backlog);
            }
        }
        if task.batch.len() >= BATCH || told.is_some() {
            let batch = std::mem::replace(&mut task.batch, Vec::with_capacity(BATCH));
            let mut ok = task.tx.blocking_send(Cmd::Records(batch)).is_ok();
            if let Some(backlog) = told {
                ok = ok && task.tx.blocking_send(Cmd::Backlog { topic, backlog }).is_ok();
            }
            if !ok {
                self.poison(anyhow!("partition task {} ended unexpectedly", m.partition()));
            }
        }
        if let Some(backlog) = told {
            tracing::debug!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                ?backlog,
                "input backlog changed"
            );
            self.report_lag();
        }
    }

    /// Takes the end offsets (last stable offsets) and the consumer's positions that librdkafka
    /// reports for the aligned inputs. `ls_offset` comes from the last fetch response of the
    /// partition; `app_offset` is the position after the last record (or transaction marker)
    /// handed to this thread, so every record before it has been routed already.
    fn observe_stats(&mut self, stats: &Statistics) {
        if !self.align {
            return;
        }
        for (topic, t) in &stats.topics {
            let Some(&u) = self.topic_index.get(topic) else { continue };
            for (p, part) in &t.partitions {
                let Some(input) = self.tasks.get_mut(p).and_then(|task| task.inputs.get_mut(u)) else {
                    continue;
                };
                // The end only moves forward: a value older than the watermarks read at
                // assignment (left from an earlier assignment of the partition) must not hide
                // a backlog.
                if part.ls_offset >= 0 && part.ls_offset > input.end {
                    input.end = part.ls_offset;
                    self.lag_changed = true;
                }
                if part.app_offset >= 0 && input.delivered(part.app_offset) {
                    self.lag_changed = true;
                }
            }
        }
    }

    /// After every poll, with aligned inputs: reads the consumer's positions while an input is
    /// not known to be caught up (they move past transaction markers, which no record
    /// reports), and tells the tasks whose inputs changed between behind and caught up.
    fn track_backlog(&mut self, consumer: &BaseConsumer<Ctx>) {
        if !self.align {
            return;
        }
        let now = Instant::now();
        if now >= self.next_position_check {
            self.next_position_check = now + POSITION_CHECK;
            for task in self.tasks.values_mut() {
                if now.duration_since(task.started) >= FIRST_RECORD_WAIT {
                    for input in task.inputs.iter_mut().filter(|i| i.assumed) {
                        input.assumed = false;
                        input.next = -1;
                        self.lag_changed = true;
                    }
                }
            }
            let unsettled = self.tasks.values().any(|t| t.inputs.iter().any(|i| i.told != Backlog::CaughtUp));
            if unsettled {
                match consumer.position() {
                    Ok(positions) => {
                        for e in positions.elements() {
                            let Some(&u) = self.topic_index.get(e.topic()) else { continue };
                            let Offset::Offset(o) = e.offset() else { continue };
                            let Some(input) =
                                self.tasks.get_mut(&e.partition()).and_then(|t| t.inputs.get_mut(u))
                            else {
                                continue;
                            };
                            if input.delivered(o) {
                                self.lag_changed = true;
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "consumer positions unavailable"),
                }
            }
        }
        if std::mem::take(&mut self.lag_changed) {
            self.publish_backlog();
        }
    }

    /// Sends each task the inputs whose backlog changed, after the records routed so far.
    fn publish_backlog(&mut self) {
        let mut dead = Vec::new();
        let mut changed = false;
        for (p, task) in &mut self.tasks {
            for (u, input) in task.inputs.iter_mut().enumerate() {
                let backlog = input.backlog();
                if backlog == input.told {
                    continue;
                }
                input.told = backlog;
                changed = true;
                tracing::debug!(
                    topic = %self.config.topics[u].name, partition = *p, next = input.next, end = input.end,
                    ?backlog, "input backlog changed"
                );
                if !task.batch.is_empty() {
                    let batch = std::mem::replace(&mut task.batch, Vec::with_capacity(BATCH));
                    if task.tx.blocking_send(Cmd::Records(batch)).is_err() {
                        dead.push(*p);
                        break;
                    }
                }
                if task.tx.blocking_send(Cmd::Backlog { topic: u, backlog }).is_err() {
                    dead.push(*p);
                    break;
                }
            }
        }
        for p in dead {
            self.poison(anyhow!("partition task {p} ended unexpectedly"));
        }
        if changed {
            self.report_lag();
        }
    }

    /// Carries out the tasks' pause requests on the consumer (this thread owns it).
    fn apply_pauses(&mut self, consumer: &BaseConsumer<Ctx>) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let mut changes = Vec::new();
        for (p, task) in &self.tasks {
            for (u, input) in task.inputs.iter().enumerate() {
                let want = task.flow.want.get(u).is_some_and(|w| w.load(Ordering::SeqCst));
                if want != input.paused {
                    let list = if want { &mut pause } else { &mut resume };
                    list.add_partition(&self.config.topics[u].name, *p);
                    changes.push((*p, u, want));
                }
            }
        }
        if changes.is_empty() {
            return;
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                self.poison(anyhow!("pausing input partitions failed: {e}"));
                return;
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                self.poison(anyhow!("resuming input partitions failed: {e}"));
                return;
            }
        }
        for (p, u, want) in changes {
            let name = &self.config.topics[u].name;
            if let Some(input) = self.tasks.get_mut(&p).and_then(|t| t.inputs.get_mut(u)) {
                input.paused = want;
            }
            if want {
                counter!("banditflow_input_pauses_total", "topic" => name.clone()).increment(1);
                tracing::debug!(
                    topic = %name, partition = p,
                    "paused: the partition task waits for another topic that is behind"
                );
            } else {
                tracing::debug!(topic = %name, partition = p, "resumed");
            }
        }
        self.report_lag();
    }

    /// Resumes what the tasks of `parts` had paused (they are ending).
    fn release_pauses(&mut self, consumer: &BaseConsumer<Ctx>, parts: &[i32]) {
        let mut resume = TopicPartitionList::new();
        for p in parts {
            let Some(task) = self.tasks.get_mut(p) else { continue };
            for (u, input) in task.inputs.iter_mut().enumerate() {
                if input.paused {
                    resume.add_partition(&self.config.topics[u].name, *p);
                    input.paused = false;
                }
            }
        }
        if resume.count() > 0 {
            tracing::debug!(partitions = ?parts, "resuming the inputs of ending partition tasks");
            if let Err(e) = consumer.resume(&resume) {
                self.poison(anyhow!("resuming input partitions failed: {e}"));
            }
        }
    }

    /// Gauges of the aligned inputs: paused ones, and ones known to have records on the broker.
    fn report_lag(&self) {
        if !self.align {
            return;
        }
        let inputs = self.tasks.values().flat_map(|t| t.inputs.iter());
        let (mut paused, mut behind) = (0usize, 0usize);
        for i in inputs {
            paused += usize::from(i.paused);
            behind += usize::from(i.told == Backlog::Behind);
        }
        gauge!("banditflow_paused_input_partitions").set(paused as f64);
        gauge!("banditflow_behind_input_partitions").set(behind as f64);
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
                    // A deleted value that was chunked (a removed model's snapshot) takes its
                    // chunks with it, so compaction can drop them.
                    if let Some(&n) = self.chunks.get(key) {
                        for i in 0..n {
                            let ck = blob::chunk_key(key, i);
                            self.send(&k.snapshot_topic, Some(out.partition), ck.as_bytes(), None, None)?;
                        }
                        new_chunks.push((key.clone(), 0));
                    }
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
        let fresh = histogram!("banditflow_event_to_snapshot_seconds");
        for out in outputs {
            for ts in &out.timestamps {
                fresh.record((now - ts).max(0) as f64 / 1e3);
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
/// consumer reads one topic far ahead of the other (catching up on lag, unequal fetch sizes,
/// a loaded broker).
///
/// The oldest head is released unless another topic has no records queued and
///
/// - is [`Backlog::Behind`]: its partition still has records on the broker. It is waited for
///   however long that takes (as Kafka Streams' task idling and Flink's per-input watermarks
///   do): applying the other topic meanwhile would move the event-time watermark past records
///   not read yet, and orphan feedback that is merely early. Only a record or news of its
///   backlog can end the wait, so no timer runs for it;
/// - is [`Backlog::CaughtUp`] and has been so, and empty, for less than `max_idle` (a quiet
///   topic is skipped after that);
/// - is [`Backlog::Unknown`] and has been empty for less than `max_idle`, or, before its first
///   record, [`FIRST_RECORD_WAIT`].
///
/// Waiting for a topic that is caught up or unknown ends early once more than `cap` records
/// are queued. Waiting for a topic that is behind does not: instead, a topic whose queue
/// reaches `pause_at` is marked to be paused on the consumer, and resumed once its queue is
/// down to `resume_at` or no other topic is behind. A topic with an empty queue is never left
/// paused, so the topic waited for always keeps being fetched.
struct Aligner {
    queues: Vec<std::collections::VecDeque<OwnedRecord>>,
    empty_since: Vec<Instant>,
    /// Whether the topic has delivered a record (or was known caught up).
    heard: Vec<bool>,
    backlog: Vec<Backlog>,
    /// Which topics the task wants paused.
    paused: Vec<bool>,
    queued: usize,
    max_idle: Duration,
    cap: usize,
    pause_at: usize,
    resume_at: usize,
}

/// The longest wait for the first record of a topic whose backlog is unknown (the watermarks
/// could not be read at assignment, or where the consumer starts is not known).
const FIRST_RECORD_WAIT: Duration = Duration::from_secs(5);

impl Aligner {
    fn new(backlog: Vec<Backlog>, max_idle: Duration, cap: usize) -> Aligner {
        let n = backlog.len();
        let pause_at = (cap / 2).max(1);
        Aligner {
            queues: (0..n).map(|_| std::collections::VecDeque::new()).collect(),
            empty_since: vec![Instant::now(); n],
            heard: backlog.iter().map(|b| *b == Backlog::CaughtUp).collect(),
            backlog,
            paused: vec![false; n],
            queued: 0,
            max_idle,
            cap,
            pause_at,
            resume_at: pause_at / 2,
        }
    }

    fn push(&mut self, r: OwnedRecord) {
        let t = r.topic;
        self.heard[t] = true;
        self.queues[t].push_back(r);
        self.queued += 1;
    }

    /// What the consumer now knows of topic `t`'s records on the broker.
    fn set_backlog(&mut self, t: usize, backlog: Backlog, now: Instant) {
        if self.backlog[t] == backlog {
            return;
        }
        if backlog == Backlog::CaughtUp {
            self.heard[t] = true;
            // Idle counts from when the topic is known to have nothing more.
            if self.queues[t].is_empty() {
                self.empty_since[t] = now;
            }
        }
        self.backlog[t] = backlog;
    }

    /// Whether some topic is behind with nothing queued: then nothing may be released.
    fn blocked(&self) -> bool {
        self.queues.iter().zip(&self.backlog).any(|(q, b)| q.is_empty() && *b == Backlog::Behind)
    }

    /// How long an empty topic that is not behind is waited for before others may run ahead.
    fn idle_limit(&self, u: usize) -> Duration {
        if self.heard[u] || self.backlog[u] == Backlog::CaughtUp {
            self.max_idle
        } else {
            FIRST_RECORD_WAIT.max(self.max_idle)
        }
    }

    /// The next record to apply: the oldest head, if no topic is waited for (see the type).
    fn pop(&mut self, now: Instant) -> Option<OwnedRecord> {
        let (t, _) = self
            .queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|r| (i, (r.timestamp_ms.unwrap_or(i64::MIN), i))))
            .min_by_key(|(_, key)| *key)?;
        if self.blocked() {
            return None;
        }
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
    /// wait: `pop` releases only when no empty topic is still waited for). `None` when nothing
    /// waits, or when a topic that is behind is waited for: only a command can end that wait.
    fn wait_hint(&self, now: Instant) -> Option<Duration> {
        if self.queued == 0 || self.blocked() {
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

    /// Updates which topics should be paused on the consumer; `true` when that changed.
    fn update_pauses(&mut self) -> bool {
        let mut changed = false;
        for u in 0..self.queues.len() {
            let others = || (0..self.queues.len()).filter(move |v| *v != u);
            let len = self.queues[u].len();
            let want = if self.paused[u] {
                len > self.resume_at && others().any(|v| self.backlog[v] == Backlog::Behind)
            } else {
                len >= self.pause_at
                    && others().any(|v| self.backlog[v] == Backlog::Behind && self.queues[v].is_empty())
            };
            if want != self.paused[u] {
                self.paused[u] = want;
                changed = true;
            }
        }
        changed
    }
}

async fn partition_task(
    config: Arc<Config>,
    mut state: PartitionState,
    backlog: Vec<Backlog>,
    flow: Arc<Flow>,
    mut rx: mpsc::Receiver<Cmd>,
) {
    let mut last_saved = state.records;
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut timestamps = Vec::new();
    let mut reported = state.join.counters.clone();
    let mut reported_invalid = state.invalid.clone();
    let mut reported_copied = state.join.buffer.copied;
    let spec = &config.core;
    let mut aligner = Aligner::new(
        backlog,
        Duration::from_millis(config.kafka.max_idle_ms as u64),
        config.kafka.partition_queue_records,
    );
    let partition = state.partition;
    // Asks the consumer thread to pause or resume topics as the aligner's queues say.
    let steer = |aligner: &mut Aligner| {
        if aligner.update_pauses() {
            tracing::debug!(
                partition, paused = ?aligner.paused, queued = aligner.queued, "pause requests changed"
            );
            flow.request(&aligner.paused);
        }
    };
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
                if let Some(ts) = r.timestamp_ms.filter(|_| r.offset % FRESHNESS_SAMPLE == 0) {
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
                    steer(&mut aligner);
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
                    steer(&mut aligner);
                }
            }
            Cmd::Backlog { topic, backlog } => {
                aligner.set_backlog(topic, backlog, Instant::now());
                while let Some(r) = aligner.pop(Instant::now()) {
                    apply(&mut state, r, &mut dead, &mut timestamps);
                }
                steer(&mut aligner);
            }
            Cmd::Snapshot { stop, reply } => {
                // A configuration change applied at restore must reach the snapshot topic even
                // on a partition that receives nothing (serving nodes merge all its shards).
                let saved = (state.records != last_saved || !dead.is_empty() || state.join.changes.dirty)
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
                // The buffer changelog: segments stored, entries copied out of sparse ones.
                gauge!("banditflow_changelog_segments", "partition" => p.clone())
                    .set(state.join.buffer.segments.len() as f64);
                let copied = state.join.buffer.copied;
                counter!("banditflow_changelog_copied_total").increment(copied - reported_copied);
                reported_copied = copied;
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
    run_prepared(config, shutdown)
}

/// [`run`] on topics the caller has already created and checked (the demo's in-process mock
/// cluster, which answers no admin requests).
pub fn run_prepared(config: Arc<Config>, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
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
            align: config.topics.len() > 1,
            flow_changed: Arc::new(AtomicBool::new(false)),
            lag_changed: false,
            next_position_check: Instant::now(),
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
    if !k.properties.contains_key("fetch.queue.backoff.ms") {
        // librdkafka postpones the next fetch of a partition whose local queue is over its
        // thresholds (queued.min.messages, queued.max.messages.kbytes) by this much, 1 s by
        // default. A commit stalls the polling for tens of milliseconds while the tasks report,
        // the queues fill past the threshold, and every partition then waited a whole second
        // with nothing to poll: the pipeline ran at 0.2–0.4 cores (BENCHMARKS.md).
        cc.set("fetch.queue.backoff.ms", "10");
    }
    if !k.properties.contains_key("statistics.interval.ms") {
        // With two topics the statistics also carry the end offsets of the inputs' fetch
        // responses, which tell the aligner that a topic fell behind while running.
        cc.set("statistics.interval.ms", if config.topics.len() > 1 { "1000" } else { "5000" });
    }
    // Impressions and feedback of partition p must meet in one task: range assignment gives a
    // member the same partition numbers of co-partitioned topics.
    cc.set("partition.assignment.strategy", "range").set("group.protocol", "classic");
    let consumer: BaseConsumer<Ctx> = cc.create_with_context(ctx).context("creating the consumer")?;
    let topics: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
    consumer.subscribe(&topics).context("subscribing to the input topics")?;
    let interval = Duration::from_millis(k.snapshot_interval_ms as u64);
    let mut next_commit = Instant::now() + interval;
    // Messages since the clock was last read: reading it per message cost ~3 % of the CPU.
    let mut since_clock = 0u32;
    loop {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let polled = consumer.poll(Duration::from_millis(20));
        let idle = !matches!(polled, Some(Ok(_)));
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
        if s.align {
            s.track_backlog(&consumer);
            if s.flow_changed.swap(false, Ordering::SeqCst) {
                s.apply_pauses(&consumer);
            }
        }
        // A poisoned session stays poisoned until dropped, so the revocation that closing the
        // consumer triggers commits nothing.
        if let Some(e) = &s.poisoned {
            let e = anyhow!("{e:#}");
            // End the transaction in flight before closing the consumer leaves the group.
            let _ = s.settle();
            return Ok(SessionEnd::Restart(e));
        }
        since_clock += 1;
        if (idle || since_clock >= 64) && {
            since_clock = 0;
            Instant::now() >= next_commit
        } {
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
        s.release_pauses(&consumer, &parts);
        s.tasks.clear();
        s.report_lag();
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
    use super::Backlog::{Behind, CaughtUp, Unknown};
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

    /// Everything `pop` releases at `now`, as (topic, timestamp).
    fn drain(a: &mut Aligner, now: Instant) -> Vec<(usize, i64)> {
        std::iter::from_fn(|| a.pop(now)).map(|r| (r.topic, r.timestamp_ms.unwrap_or(0))).collect()
    }

    const IDLE: Duration = Duration::from_millis(200);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn an_unknown_topic_is_waited_for_until_its_first_record() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Unknown, Unknown], IDLE, 1000);
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
    fn a_caught_up_topic_is_waited_for_only_the_idle_limit() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![CaughtUp, Unknown], IDLE, 1000);
        a.push(record(1, 10));
        assert_eq!(a.pop(t0 + IDLE * 2).map(|r| r.topic), Some(1));
    }

    #[test]
    fn the_wait_for_a_first_record_is_bounded() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Unknown, Unknown], IDLE, 1000);
        a.push(record(1, 10));
        assert!(a.pop(t0 + FIRST_RECORD_WAIT / 2).is_none());
        assert_eq!(a.pop(t0 + FIRST_RECORD_WAIT + IDLE).map(|r| r.topic), Some(1));
        assert!(a.wait_hint(t0).is_none(), "nothing queued");
    }

    #[test]
    fn the_wait_hint_is_the_longest_remaining_wait() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![CaughtUp, Unknown, Unknown], IDLE, 1000);
        a.push(record(2, 10));
        let hint = a.wait_hint(t0 + IDLE * 2).expect("a record waits");
        assert!(hint > FIRST_RECORD_WAIT / 2, "topic 1 is still waited for: {hint:?}");
    }

    #[test]
    fn a_full_queue_is_released_without_waiting_for_a_topic_that_is_not_behind() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Unknown, Unknown], IDLE, 2);
        for ts in 0..3 {
            a.push(record(1, ts));
        }
        assert_eq!(a.pop(t0).map(|r| r.timestamp_ms), Some(Some(0)));
    }

    #[test]
    fn a_topic_behind_is_never_overtaken() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 4);
        for ts in 10..20 {
            a.push(record(1, ts));
        }
        let later = t0 + HOUR;
        assert!(a.pop(later).is_none(), "neither time nor a full queue lets feedback overtake impressions");
        assert_eq!(a.wait_hint(later), None, "no timer: only a record or news of the backlog ends the wait");
        a.push(record(0, 12));
        assert_eq!(drain(&mut a, later), vec![(1, 10), (1, 11), (0, 12)], "merged, then waiting again");
        assert!(a.pop(later + HOUR).is_none());
    }

    #[test]
    fn a_topic_that_caught_up_is_skipped_after_max_idle() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 1000);
        a.push(record(1, 10));
        let t1 = t0 + IDLE * 10;
        assert!(a.pop(t1).is_none());
        a.set_backlog(0, CaughtUp, t1);
        assert!(a.pop(t1 + IDLE / 2).is_none(), "idle counts from when the topic is known caught up");
        assert_eq!(a.wait_hint(t1 + IDLE / 2), Some(IDLE / 2));
        assert_eq!(a.pop(t1 + IDLE).map(|r| r.topic), Some(1));
    }

    #[test]
    fn a_full_queue_waiting_for_a_topic_behind_is_paused_then_resumed() {
        let t0 = Instant::now();
        let later = t0 + HOUR;
        // pause at 4 queued records of one topic, resume at 2.
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 8);
        for ts in 10..13 {
            a.push(record(1, ts));
        }
        assert!(!a.update_pauses(), "below the pause mark");
        a.push(record(1, 13));
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![false, true]);
        // Records already on their way when the pause took effect: held, beyond the cap.
        for ts in 14..30 {
            a.push(record(1, ts));
        }
        assert!(a.pop(later).is_none());
        assert!(!a.update_pauses(), "stays paused");
        // The lagging topic delivers: the merge goes on and waits again at its newest record.
        a.push(record(0, 11));
        a.push(record(0, 25));
        let out = drain(&mut a, later);
        assert_eq!(out.len(), 17);
        assert_eq!(out.last(), Some(&(0, 25)));
        assert!(!a.update_pauses(), "5 queued: above the resume mark while topic 0 is behind");
        a.push(record(0, 28));
        assert_eq!(drain(&mut a, later), vec![(1, 25), (1, 26), (1, 27), (0, 28)]);
        assert!(a.update_pauses(), "down to the resume mark");
        assert_eq!(a.paused, vec![false, false]);
    }

    #[test]
    fn a_topic_that_catches_up_releases_the_pause() {
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 2);
        a.push(record(1, 10));
        a.push(record(1, 11));
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![false, true]);
        a.set_backlog(0, CaughtUp, Instant::now());
        assert!(a.update_pauses(), "nothing behind any more");
        assert_eq!(a.paused, vec![false, false]);
    }

    #[test]
    fn the_topic_waited_for_is_never_left_paused() {
        let later = Instant::now() + HOUR;
        let mut a = Aligner::new(vec![Behind, Behind], IDLE, 8);
        for ts in 0..4 {
            a.push(record(1, ts));
        }
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![false, true]);
        // Topic 0 delivers records newer than all of topic 1's: topic 1 drains and becomes the
        // topic waited for.
        for ts in 10..15 {
            a.push(record(0, ts));
        }
        assert_eq!(drain(&mut a, later), vec![(1, 0), (1, 1), (1, 2), (1, 3)]);
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![true, false], "the topic now ahead is paused, the one waited for resumed");
    }

    #[test]
    fn the_backlog_at_assignment_follows_the_watermarks() {
        let b = |restored, watermarks, latest| input_lag(restored, watermarks, latest).told;
        assert_eq!(b(Some(5), Some((0, 10)), false), Behind);
        assert_eq!(b(Some(10), Some((0, 10)), false), CaughtUp);
        assert_eq!(b(Some(2), Some((5, 5)), false), CaughtUp, "below the start of an empty log");
        assert_eq!(b(Some(2), Some((5, 9)), false), Behind, "reset to the start");
        assert_eq!(b(Some(2), Some((5, 9)), true), CaughtUp, "reset to the end");
        assert_eq!(b(None, Some((0, 10)), true), CaughtUp);
        assert_eq!(b(None, Some((3, 3)), false), CaughtUp);
        assert_eq!(b(None, Some((0, 10)), false), Behind, "assumed to start at the log start");
        assert!(input_lag(None, Some((0, 10)), false).assumed);
        assert_eq!(b(Some(5), None, false), Unknown);
        let mut lag = input_lag(None, Some((0, 10)), false);
        assert!(!lag.delivered(0), "a position at the log start confirms the assumption");
        assert!(!lag.assumed);
    }

    #[test]
    fn a_transaction_marker_is_passed_by_the_position_not_by_records() {
        // Record 8 was the last one; offset 9 is the commit marker, so the end is 10.
        let mut lag = input_lag(Some(9), Some((0, 10)), false);
        assert_eq!(lag.backlog(), Behind);
        // The consumer's position (librdkafka's, after serving the marker) moves past it.
        lag.next = lag.next.max(10);
        assert_eq!(lag.backlog(), CaughtUp);
    }
}
