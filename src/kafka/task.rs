//! One partition's operator: a tokio task that owns the [`PartitionState`] of one input
//! partition, reads its input topic-partitions straight from librdkafka's per-partition queues
//! (split off the consumer's queue at assignment, so no record passes through the consumer
//! thread), applies them (through the [`Aligner`] when two input topics are merged by
//! timestamp), and reports its shard output when asked. Besides its queues and its command
//! channel it does no I/O: the transaction writer stores what it reports.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::Config;
use crate::core::checkpoint::{self, SavedPartition};
use crate::core::event::InvalidEvent;
use crate::core::partition::{Applied, InputRecord, PartitionState};
use crate::telemetry::processor::{ConsumerError, PartitionMeter};

use super::inputs::{Aligner, Backlog, Flow};
use super::queue::{Batch, Msg, SplitQueue};

/// Records a task reads from its queues before it looks at its commands and lets the other
/// tasks on its worker run.
pub(super) const POLL_BUDGET: usize = 4096;

/// Records taken from librdkafka before they are applied.
const BATCH: usize = 256;

/// One input record in this many (by offset) gives a sample of `banditflow_event_to_snapshot_seconds`.
pub(super) const FRESHNESS_SAMPLE: i64 = 16;

/// How long an idle task sleeps when nothing wakes it. librdkafka wakes it when a queue goes
/// from empty to non-empty; this only bounds the cost of a wake-up that never comes.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// "No record yet" in [`TaskInputs::last_timestamps`].
pub(super) const NO_TIMESTAMP: i64 = i64::MIN;

/// An input record copied out of librdkafka's buffer: a dead letter, or a record the aligner
/// holds while it waits for the other topic.
#[derive(Debug)]
pub(super) struct OwnedRecord {
    pub(super) topic: usize,
    pub(super) offset: i64,
    pub(super) timestamp_ms: Option<i64>,
    /// The payload followed by the key, copied in one allocation (the key is only read again
    /// for dead letters, which carry a missing key as an empty one).
    pub(super) bytes: Vec<u8>,
    pub(super) payload_len: usize,
    pub(super) headers: Vec<(String, Vec<u8>)>,
}

impl OwnedRecord {
    pub(super) fn copy(topic: usize, m: Msg<'_>) -> OwnedRecord {
        let (payload, key) = (m.payload(), m.key());
        let mut bytes = Vec::with_capacity(payload.len() + key.len());
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(key);
        OwnedRecord {
            topic,
            offset: m.offset(),
            timestamp_ms: m.timestamp_ms(),
            bytes,
            payload_len: payload.len(),
            headers: m.headers(),
        }
    }

    pub(super) fn payload(&self) -> &[u8] {
        &self.bytes[..self.payload_len]
    }

    pub(super) fn key(&self) -> &[u8] {
        &self.bytes[self.payload_len..]
    }
}

pub(super) struct DeadLetter {
    pub(super) record: OwnedRecord,
    pub(super) reason: InvalidEvent,
}

pub(super) enum Cmd {
    /// What the consumer now knows of input `topic`'s records on the broker. The consumer
    /// thread learns where the task has read to from librdkafka's positions, which move only
    /// when the task takes a record from its queue: every record the news covers has been read.
    Backlog { topic: usize, backlog: Backlog },
    /// Report the state; with `stop`, end the task afterwards.
    Snapshot { stop: bool, reply: oneshot::Sender<ShardOutput> },
}

pub(super) struct ShardOutput {
    pub(super) partition: i32,
    pub(super) records: u64,
    /// `None` when nothing changed since the last report.
    pub(super) saved: Option<SavedPartition>,
    pub(super) offsets: Vec<(String, i32, i64)>,
    pub(super) dead_letters: Vec<DeadLetter>,
    /// Record timestamps applied since the last report (for freshness): one record in
    /// [`FRESHNESS_SAMPLE`], by offset, an unbiased sample of the latency distribution that
    /// costs a push per 16 records instead of one per record.
    pub(super) timestamps: Vec<i64>,
}

/// A task's inputs: one librdkafka queue per input topic (indexed as `config.topics`), split
/// off the consumer's queue before the partition was assigned or sought.
pub(super) struct TaskInputs {
    pub(super) queues: Vec<SplitQueue>,
    /// Woken by librdkafka when one of the queues goes from empty to non-empty.
    pub(super) wake: Arc<Notify>,
    /// Per input topic: the timestamp of the last record read ([`NO_TIMESTAMP`] before the
    /// first), for the consumer thread's lag in seconds.
    pub(super) last_timestamps: Arc<[AtomicI64]>,
}

/// The partition's operator state between commands.
struct Operator {
    config: Arc<Config>,
    state: PartitionState,
    last_saved: u64,
    dead: Vec<DeadLetter>,
    timestamps: Vec<i64>,
    meter: PartitionMeter,
    aligner: Aligner,
    flow: Arc<Flow>,
    /// Messages taken from a queue and not yet applied (reused).
    batch: Batch,
}

impl Operator {
    /// Applies one record; the reason when it is to be dead-lettered (the caller then copies
    /// it out of librdkafka's buffer, the only record that is copied on the one-topic path).
    fn apply(
        &mut self,
        topic: usize,
        offset: i64,
        timestamp_ms: Option<i64>,
        payload: &[u8],
    ) -> Option<InvalidEvent> {
        let t = &self.config.topics[topic];
        let input = InputRecord {
            topic: &t.name,
            partition: self.state.partition,
            offset,
            role: t.role,
            encoding: t.encoding,
            payload,
            timestamp_ms,
        };
        let applied = self.state.apply(&self.config.core, input);
        let counts = self.meter.records.get_mut(topic);
        match applied {
            Applied::Invalid(reason) => {
                if let Some(c) = counts {
                    c[1] += 1;
                }
                return Some(reason);
            }
            Applied::AlreadyCovered => {
                if let Some(c) = counts {
                    c[2] += 1;
                }
            }
            Applied::Event(_) => {
                if let Some(c) = counts {
                    c[0] += 1;
                }
                if let Some(ts) = timestamp_ms.filter(|_| offset % FRESHNESS_SAMPLE == 0) {
                    self.timestamps.push(ts);
                }
            }
        }
        None
    }

    /// Releases what the aligner lets go, telling the state first which inputs it skipped as
    /// idle, then asks the consumer thread to pause or resume topics as the queues say.
    fn drain(&mut self) {
        while let Some(r) = self.aligner.pop(Instant::now()) {
            if std::mem::take(&mut self.aligner.idle_changed) {
                for (u, idle) in self.aligner.idle.iter().enumerate() {
                    self.state.set_idle(&self.config.topics[u].name, *idle);
                }
            }
            if let Some(reason) = self.apply(r.topic, r.offset, r.timestamp_ms, r.payload()) {
                self.dead.push(DeadLetter { record: r, reason });
            }
        }
        if self.aligner.update_pauses() {
            tracing::debug!(
                partition = self.state.partition,
                paused = ?self.aligner.paused,
                queued = self.aligner.queued,
                "pause requests changed"
            );
            self.flow.request(&self.aligner.paused);
        }
    }

    /// Reads up to [`POLL_BUDGET`] records from the queues and applies them (one topic) or
    /// hands them to the aligner (two). Returns whether a queue may hold more (it gave its
    /// whole budget).
    fn read(&mut self, inputs: &TaskInputs) -> bool {
        let aligned = inputs.queues.len() > 1;
        let budget = POLL_BUDGET / inputs.queues.len().max(1);
        let (mut read, mut more) = (0, false);
        for (u, queue) in inputs.queues.iter().enumerate() {
            // A topic the aligner holds too much of is left in librdkafka's queue (and paused
            // on the consumer at the task's request) until the other topic catches up.
            if aligned && self.aligner.paused.get(u).copied().unwrap_or(false) {
                continue;
            }
            let mut last_ts = None;
            let mut n = 0;
            // Taken from librdkafka a batch at a time (one queue lock), then applied in a tight
            // loop, so the core's tables stay in the cache between records.
            let mut batch = std::mem::take(&mut self.batch);
            while n < budget {
                let want = BATCH.min(budget - n);
                batch.clear();
                let got = queue.read(&mut batch, want);
                n += got;
                for m in batch.iter() {
                    if let Some(e) = m.error() {
                        ConsumerError { error: &e }.emit();
                        continue;
                    }
                    let ts = m.timestamp_ms();
                    last_ts = ts.or(last_ts);
                    if aligned {
                        self.aligner.push(OwnedRecord::copy(u, m));
                    } else if let Some(reason) = self.apply(u, m.offset(), ts, m.payload()) {
                        self.dead.push(DeadLetter { record: OwnedRecord::copy(u, m), reason });
                    }
                }
                if got < want {
                    break;
                }
            }
            batch.clear();
            self.batch = batch;
            if let (Some(ts), Some(slot)) = (last_ts, inputs.last_timestamps.get(u)) {
                slot.store(ts, Ordering::Relaxed);
            }
            read += n;
            more |= n == budget;
        }
        if aligned && read > 0 {
            self.drain();
        }
        more
    }

    /// Carries out a command; `true` when the task is to end.
    fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Backlog { topic, backlog } => {
                self.aligner.set_backlog(topic, backlog, Instant::now());
                self.drain();
                false
            }
            Cmd::Snapshot { stop, reply } => {
                let spec = &self.config.core;
                let state = &mut self.state;
                // A configuration change applied at restore must reach the snapshot topic even
                // on a partition that receives nothing (serving nodes merge all its shards).
                let saved =
                    (state.records != self.last_saved || !self.dead.is_empty() || state.join.changes.dirty)
                        .then(|| checkpoint::save_changes(spec, state));
                self.meter.report(&self.config, state);
                self.last_saved = state.records;
                let out = ShardOutput {
                    partition: state.partition,
                    records: state.records,
                    saved,
                    offsets: state.offsets.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect(),
                    dead_letters: std::mem::take(&mut self.dead),
                    timestamps: std::mem::take(&mut self.timestamps),
                };
                let _ = reply.send(out);
                stop
            }
        }
    }
}

/// The partition task: reads its queues, carries out what it is told, reports when asked,
/// ends when told to or when its channel closes (dropping its queues).
pub(super) async fn partition_task(
    config: Arc<Config>,
    state: PartitionState,
    backlog: Vec<Backlog>,
    flow: Arc<Flow>,
    inputs: TaskInputs,
    mut rx: mpsc::Receiver<Cmd>,
) {
    let aligner = Aligner::new(
        backlog,
        Duration::from_millis(config.kafka.max_idle_ms as u64),
        config.kafka.partition_queue_records,
    );
    let mut op = Operator {
        meter: PartitionMeter::new(&state, config.topics.len()),
        last_saved: state.records,
        config,
        state,
        dead: Vec::new(),
        timestamps: Vec::new(),
        aligner,
        flow,
        batch: Batch::with_capacity(BATCH),
    };
    loop {
        // Commands first: a snapshot request covers what was read before it.
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if op.command(cmd) {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if op.read(&inputs) {
            // More may be waiting: let the worker's other tasks run, then read on.
            tokio::task::yield_now().await;
            continue;
        }
        let wait = op.aligner.wait_hint(Instant::now()).unwrap_or(IDLE_TICK);
        tokio::select! {
            biased;
            cmd = rx.recv() => match cmd {
                Some(cmd) => {
                    if op.command(cmd) {
                        return;
                    }
                }
                None => return,
            },
            _ = inputs.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {
                if inputs.queues.len() > 1 {
                    op.drain();
                }
            }
        }
    }
}
