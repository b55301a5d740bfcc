//! The consumer group session: what this member owns (one partition task per assigned input
//! partition), how an assignment is restored (and the partition's queues split off for its
//! task) and a revocation committed, and when a transaction is written. The driver calls it from the consumer
//! thread (the poll loop and the rebalance callbacks).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::config::Config;
use crate::core::partition::PartitionState;
use crate::telemetry::processor::{Assigned, ConsumerLag, Gathered, PartitionReleased, PartitionsRestored};

use super::driver::Ctx;
use super::inputs::{input_lag, Backlog, Flow, InputLag};
use super::isolation::{check_partition, restore_one, Failed, Failure, Restored};
use super::probes::Health as Probe;
use super::queue::SplitQueue;
use super::store;
use super::task::{partition_task, Cmd, TaskInputs, NO_TIMESTAMP};
use super::txn::Txn;

pub(super) struct Task {
    pub(super) tx: mpsc::Sender<Cmd>,
    /// Awaited when the task ends, so that its queues (which hold the consumer) are gone
    /// before the partition is given up or the consumer closed.
    pub(super) handle: tokio::task::JoinHandle<()>,
    /// Per input topic (index into `config.topics`), when two or more are aligned; else empty.
    pub(super) inputs: Vec<InputLag>,
    /// The task's pause requests (read on the consumer thread only).
    pub(super) flow: Arc<Flow>,
    /// When the task started (ms since the epoch), for lag in seconds before any record.
    pub(super) assigned_ms: i64,
    /// Per input topic: the timestamp of the last record the task read (for lag in seconds).
    pub(super) last_timestamps: Arc<[AtomicI64]>,
}

/// A partition's input queues, split off the consumer before its task starts.
pub(super) struct TaskQueues {
    pub(super) queues: Vec<SplitQueue>,
    /// Notified by librdkafka when one of them goes from empty to non-empty.
    pub(super) wake: Arc<tokio::sync::Notify>,
}

/// Partitions restored at once on assignment (reading is I/O, rebuilding one core each): one
/// after another, twelve partitions of a few million retained impressions would hold the
/// rebalance callback past `max.poll.interval.ms`.
const RESTORE_PARALLELISM: usize = 4;

/// What a commit covers and how it runs.
#[derive(Clone, Copy, Debug)]
pub(super) enum Commit<'a> {
    /// Every partition, on a commit thread; the tasks go on learning.
    Interval,
    /// These partitions, being revoked: their tasks end after reporting; on the consumer
    /// thread, before the partitions are given up.
    Revoke(&'a [i32]),
    /// Every partition at shutdown: the tasks end after reporting; on the consumer thread.
    Final,
}

/// Why a session ended.
pub(super) enum SessionEnd {
    /// Shut down cleanly: final snapshots committed, group left.
    Shutdown,
    /// State may be ahead of storage (failed transaction, failed restore): rebuild from Kafka.
    Restart(anyhow::Error),
}

/// State shared between the consumer loop and the rebalance callbacks (same thread).
pub(super) struct Session {
    pub(super) config: Arc<Config>,
    /// The consumer whose context holds this session (set once it exists): partition tasks
    /// split their queues off it.
    pub(super) consumer: Weak<BaseConsumer<Ctx>>,
    pub(super) runtime: tokio::runtime::Handle,
    /// `None` while a transaction runs in the background (`inflight`).
    pub(super) txn: Option<Txn>,
    pub(super) inflight: Option<std::thread::JoinHandle<(Txn, anyhow::Result<()>)>>,
    pub(super) tasks: BTreeMap<i32, Task>,
    /// Set when a transaction or restore failed; the session must be rebuilt.
    pub(super) poisoned: Option<anyhow::Error>,
    pub(super) topic_index: HashMap<String, usize>,
    /// Two or more input topics, aligned per partition task.
    pub(super) align: bool,
    /// Set by a task that changed its pause requests (see [`Flow`]).
    pub(super) flow_changed: Arc<AtomicBool>,
    /// Set when an input's position or end offset moved (the tasks may need telling).
    pub(super) lag_changed: bool,
    pub(super) next_position_check: Instant,
    /// What the probes answer.
    pub(super) health: Arc<Probe>,
    /// Assigned partitions that could not be restored: paused, retried (`isolation.rs`).
    pub(super) failed: BTreeMap<i32, Failed>,
}

pub(super) fn input_partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut ps: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

impl Session {
    pub(super) fn poison(&mut self, e: anyhow::Error) {
        tracing::error!(error = %format!("{e:#}"), "session state is no longer stored safely; rebuilding from Kafka");
        if self.poisoned.is_none() {
            self.poisoned = Some(e);
        }
    }

    /// Whether inputs without an offset in their state start at the end (`auto.offset.reset`).
    pub(super) fn latest(&self) -> bool {
        self.config
            .kafka
            .consumer_property("auto.offset.reset")
            .is_some_and(|v| matches!(v, "latest" | "largest" | "end"))
    }

    /// Where input `topic` of partition `p` starts: the state's offset, always explicit. A
    /// partition without one starts at the log start (or its end with `latest`), never at a
    /// group offset committed for a state that is gone (a re-created snapshot topic), which
    /// would pair an empty state with a position past what it never learned, and leave the
    /// aligner guessing where the consumer stands.
    pub(super) fn start_offset(&self, state: &PartitionState, topic: &str, p: i32) -> Offset {
        match state.offsets.get(&(topic.to_string(), p)) {
            Some(o) => Offset::Offset(*o),
            None if self.latest() => Offset::End,
            None => Offset::Beginning,
        }
    }

    /// Restores the newly assigned partitions, each on its own (`kafka.restore_timeout` per
    /// partition), and returns the assignment with their offsets, the input topic-partitions
    /// of the tasks it started (to be resumed once assigned), and those of partitions that
    /// could not be restored (to be paused: see `isolation.rs`).
    pub(super) fn assign(
        &mut self,
        tpl: &TopicPartitionList,
    ) -> (TopicPartitionList, TopicPartitionList, TopicPartitionList) {
        let nothing = || (TopicPartitionList::new(), TopicPartitionList::new(), TopicPartitionList::new());
        if let Err(e) = self.settle() {
            self.poison(e);
            return nothing();
        }
        let parts: Vec<i32> = input_partitions(tpl)
            .into_iter()
            .filter(|p| !self.tasks.contains_key(p) && !self.failed.contains_key(p))
            .collect();
        let started = Instant::now();
        // Partition counts, to tell an input partition added while running (no snapshot-topic
        // partition yet) from one that is slow to read; unknown when metadata is unreadable.
        let counts = super::admin::partition_counts(&self.config).unwrap_or_default();
        let mut states = BTreeMap::new();
        let mut failures = Vec::new();
        // Partitions restore side by side, a few at a time (workers take the next partition as
        // they finish), each within its own deadline. Partitions not begun within one
        // `restore_timeout` of the assignment are left to the background retry, so the
        // rebalance callback never holds the consumer much past that.
        let config = &self.config;
        let deadline = started + Duration::from_millis(config.kafka.restore_timeout_ms as u64);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<(i32, Result<Restored, Failure>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..RESTORE_PARALLELISM.min(parts.len()))
                .map(|_| {
                    let (next, parts, counts) = (&next, &parts, &counts);
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let Some(&p) = parts.get(i) else { break };
                            let r = if Instant::now() >= deadline {
                                Err(Failure {
                                    reason: "restore_timeout",
                                    error: anyhow!(
                                        "not begun within kafka.restore_timeout of the assignment (other partitions \
                                         took it); restoring in the background"
                                    ),
                                })
                            } else {
                                check_partition(config, counts, p).and_then(|()| restore_one(config, p))
                            };
                            out.push((p, r));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    w.join().unwrap_or_else(|_| {
                        tracing::error!("a restore worker panicked");
                        Vec::new()
                    })
                })
                .collect()
        });
        // A partition whose worker panicked has no result: it fails like any other.
        let mut results = results;
        for p in &parts {
            if !results.iter().any(|(q, _)| q == p) {
                let error = anyhow!("the restore of partition {p} panicked");
                results.push((*p, Err(Failure { reason: "undecodable", error })));
            }
        }
        for (p, restored) in results {
            match restored {
                Ok(r) => {
                    if let Some(txn) = self.txn.as_mut() {
                        txn.chunks.extend(r.chunks);
                    }
                    states.insert(p, r.state);
                }
                Err(f) => failures.push((p, f)),
            }
        }
        let done: Vec<(i32, u64)> = states.iter().map(|(p, s)| (*p, s.records)).collect();
        PartitionsRestored { partitions: &done, failed: failures.len(), elapsed: started.elapsed() }.emit();
        let mut paused = TopicPartitionList::new();
        for (p, f) in failures {
            for t in &self.config.topics {
                paused.add_partition(&t.name, p);
            }
            self.fail(p, f);
        }
        let mut out = TopicPartitionList::new();
        for e in tpl.elements() {
            // A failed partition stays assigned, paused; where it starts is set when it recovers.
            let offset = match states.get(&e.partition()) {
                Some(state) => self.start_offset(state, e.topic(), e.partition()),
                None => Offset::Stored,
            };
            if let Err(err) = out.add_partition_offset(e.topic(), e.partition(), offset) {
                self.poison(anyhow!("building the assignment: {err}"));
            }
        }
        let ends = self.input_ends(&states.keys().copied().collect::<Vec<_>>());
        let latest = self.latest();
        let mut fresh = TopicPartitionList::new();
        for (p, state) in states {
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
            // The queues are split off before the partition is assigned, so that not one of
            // its records reaches the consumer's own queue.
            match self.split_queues(p) {
                Ok(queues) => self.spawn(p, state, inputs, queues),
                Err(e) => self.poison(e),
            }
        }
        Assigned { partitions: self.tasks.len() }.emit();
        self.report_lag();
        (out, fresh, paused)
    }

    /// Consumer lag per owned input topic-partition from librdkafka's statistics, in records
    /// (the partition's end — the last stable offset, read_committed — minus the consumer's
    /// position) and in seconds (the age of the last record consumed while records wait).
    /// librdkafka's own `consumer_lag` counts from the group's committed offset, which a
    /// consumer committing through transactions and assigning explicit offsets never learns.
    pub(super) fn report_consumer_lag(&self, stats: &rdkafka::statistics::Statistics) {
        let now = super::now_ms();
        for (topic, t) in &stats.topics {
            let Some(&u) = self.topic_index.get(topic) else { continue };
            for (p, part) in &t.partitions {
                let Some(task) = self.tasks.get(p) else { continue };
                let last = task.last_timestamps.get(u).map(|t| t.load(Ordering::Relaxed));
                let end = if part.ls_offset >= 0 { part.ls_offset } else { part.hi_offset };
                let position = if part.app_offset >= 0 { part.app_offset } else { part.committed_offset };
                if end < 0 || position < 0 {
                    continue;
                }
                let records = (end - position).max(0);
                let seconds = if records == 0 {
                    0.0
                } else {
                    let since = last.filter(|t| *t != NO_TIMESTAMP).unwrap_or(task.assigned_ms);
                    (now - since).max(0) as f64 / 1e3
                };
                ConsumerLag { topic, partition: *p, records, seconds }.emit();
            }
        }
    }

    /// The input topics' watermarks for `parts`, needed only to align two topics (empty with
    /// one topic, or when the query fails: the aligner then waits for first records).
    pub(super) fn input_ends(&self, parts: &[i32]) -> BTreeMap<(String, i32), (i64, i64)> {
        let topics: Vec<&str> = self.config.topics.iter().map(|t| t.name.as_str()).collect();
        if topics.len() < 2 || parts.is_empty() {
            return BTreeMap::new();
        }
        let client = super::consumer_config(&self.config.kafka);
        store::watermarks(client, &topics, parts, Duration::from_secs(5)).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "input end offsets unknown; waiting for first records");
            BTreeMap::new()
        })
    }

    /// Splits partition `p`'s input topic-partitions off the consumer's queue: from now on
    /// their records go to the queues returned (in `config.topics` order), which only the
    /// partition's task reads. librdkafka keeps a queue split through later assignments and
    /// seeks (an application's forwarding is not undone by a fetch start), and drops records
    /// fetched before a seek by their version, so a task reads exactly from where it was placed.
    pub(super) fn split_queues(&self, p: i32) -> anyhow::Result<TaskQueues> {
        let consumer = self.consumer.upgrade().ok_or_else(|| anyhow!("the consumer is gone"))?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let queues = self
            .config
            .topics
            .iter()
            .map(|t| {
                SplitQueue::split(&consumer, &t.name, p, Arc::clone(&wake))
                    .ok_or_else(|| anyhow!("librdkafka refused a queue for {}[{p}]", t.name))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(TaskQueues { queues, wake })
    }

    pub(super) fn spawn(
        &mut self,
        partition: i32,
        state: PartitionState,
        inputs: Vec<InputLag>,
        queues: TaskQueues,
    ) {
        let (tx, rx) = mpsc::channel(16);
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
        let TaskQueues { queues, wake } = queues;
        let last_timestamps: Arc<[AtomicI64]> =
            self.config.topics.iter().map(|_| AtomicI64::new(NO_TIMESTAMP)).collect();
        let task_inputs = TaskInputs { queues, wake, last_timestamps: Arc::clone(&last_timestamps) };
        let span = tracing::info_span!("partition", partition);
        let handle = self.runtime.spawn(
            partition_task(config, state, backlog, Arc::clone(&flow), task_inputs, rx).instrument(span),
        );
        let task = Task { tx, handle, inputs, flow, assigned_ms: super::now_ms(), last_timestamps };
        self.tasks.insert(partition, task);
    }

    /// Ends the tasks of `parts` (told to stop, or not: closing the channel ends a task) and
    /// waits until they have, so that their queues are dropped.
    pub(super) fn end_tasks(&mut self, parts: &[i32]) {
        for p in parts {
            if let Some(task) = self.tasks.remove(p) {
                drop(task.tx);
                if self.runtime.block_on(task.handle).is_err() {
                    tracing::error!(partition = *p, "a partition task panicked");
                }
            }
        }
    }

    pub(super) fn revoke(&mut self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let parts: Vec<i32> =
            input_partitions(tpl).into_iter().filter(|p| self.tasks.contains_key(p)).collect();
        // The transaction in flight must end before this member gives the partitions up, even
        // when the session is poisoned: otherwise it could still commit after the next owner
        // restored from the snapshot before it.
        if let Err(e) = self.settle() {
            self.poison(e);
        }
        if self.poisoned.is_none() {
            if let Err(e) = self.commit(consumer, Commit::Revoke(&parts)) {
                self.poison(e.context("committing revoked partitions"));
            }
        }
        // The tasks have ended; what they had paused must not stay paused for whoever gets the
        // partitions next (this member included: a pause outlives the assignment).
        self.release_pauses(consumer, &parts);
        self.release_failed(consumer, &input_partitions(tpl));
        self.end_tasks(&parts);
        for p in &parts {
            PartitionReleased { config: &self.config, partition: *p }.emit();
        }
        tracing::info!(partitions = ?parts, "partitions revoked");
        Assigned { partitions: self.tasks.len() }.emit();
        self.report_lag();
    }

    /// A record that reached the consumer's own queue: none should, since every assigned
    /// partition with a task has its queues split off before it is assigned or sought. One
    /// of a partition that has a task means its records took two paths, and the task may have
    /// read past it already: the session is rebuilt from Kafka rather than the record lost.
    /// Records of partitions without a task (a failed restore, paused) are dropped; they are
    /// read again from where the state ends when it recovers.
    pub(super) fn stray(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        if self.topic_index.contains_key(m.topic()) && self.tasks.contains_key(&m.partition()) {
            self.poison(anyhow!(
                "a record of {}[{}] at offset {} bypassed its partition task's queue",
                m.topic(),
                m.partition(),
                m.offset()
            ));
        }
    }

    /// One transaction: snapshots of the partitions `what` names, their dead letters, and
    /// their input offsets. The previous transaction is settled first (its failure is this
    /// call's error). An [`Commit::Interval`] transaction runs on a commit thread while the
    /// consumer thread goes on feeding the tasks; it is settled by the next commit, a
    /// rebalance, or the end of the session.
    pub(super) fn commit(&mut self, consumer: &BaseConsumer<Ctx>, what: Commit<'_>) -> anyhow::Result<()> {
        self.settle()?;
        let gather_started = Instant::now();
        let (targets, stop, background): (Vec<i32>, bool, bool) = match what {
            Commit::Interval => (self.tasks.keys().copied().collect(), false, true),
            Commit::Revoke(ps) => (ps.to_vec(), true, false),
            Commit::Final => (self.tasks.keys().copied().collect(), true, false),
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
        Gathered { elapsed: gather_started.elapsed() }.emit();
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
    pub(super) fn settle(&mut self) -> anyhow::Result<()> {
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
        // The producer must not outlive the session in a detached thread, nor the tasks' queues
        // the consumer.
        let _ = self.settle();
        let parts: Vec<i32> = self.tasks.keys().copied().collect();
        self.end_tasks(&parts);
    }
}
