//! `banditflow run`: a member of a Kafka consumer group that learns from its assigned input
//! partitions and publishes their snapshots exactly once. This file owns the consumer: group
//! membership, the rebalance callbacks, the poll loop, and the session's restart.
//!
//! Delivery guarantee: **exactly-once state**. Each input partition `p` is owned by one
//! partition task (`task.rs`) holding its [`PartitionState`](crate::core::partition::PartitionState)
//! (which records the input offsets it covers). Every `snapshot_interval`, on revocation and at
//! shutdown, the session (`session.rs`) asks the tasks for their state and the transaction
//! writer (`txn.rs`) writes, in **one Kafka transaction**, the shard snapshots, the
//! dead-lettered records, and the input offsets. On assignment a task is rebuilt from the newest
//! committed snapshot of its partition (`store.rs`) and the consumer starts at the offsets
//! recorded in it (passed in the assignment itself). A failed transaction leaves the in-memory
//! state ahead of what is stored, so the whole session is discarded and rebuilt from Kafka:
//! nothing is lost, nothing counted twice.
//!
//! Threads: one consumer thread (polls the consumer's own queue for events — rebalances,
//! errors, statistics — runs the rebalance callbacks, collects the tasks' snapshots), a small
//! tokio runtime running one task per assigned partition, which reads its input partitions'
//! records straight from their librdkafka queues (`queue.rs`, split off before the partition is
//! assigned, so no record passes through the consumer thread), and a commit thread per interval
//! transaction, so the tasks go on learning while it commits. At most one transaction runs at
//! a time: the next commit, a rebalance and the end of a session first wait for it, and its
//! failure discards the session as above. The tasks' queues hold the consumer: a session ends
//! its tasks before the consumer closes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::TopicPartitionList;

use crate::config::Config;

use crate::telemetry::processor::{ConsumerError, Rebalanced, SessionRestarted, StartBlocked, Started};

use super::probes::Health;
use super::session::{input_partitions, Commit, Session, SessionEnd};
use super::txn::Txn;

/// The consumer's context: the session, shared by the poll loop and the rebalance callbacks
/// (both on the consumer thread).
pub(super) struct Ctx {
    pub(super) session: Mutex<Option<Session>>,
}

impl Ctx {
    pub(super) fn lock(&self) -> MutexGuard<'_, Option<Session>> {
        // A panic while holding the lock is a bug; keep going with the data as it is.
        self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientContext for Ctx {
    /// Runs on the consumer thread, inside `poll` (never while the session is locked).
    fn stats(&self, stats: Statistics) {
        if let Some(session) = self.lock().as_mut() {
            session.report_consumer_lag(&stats);
            session.observe_stats(&stats);
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let mut guard = self.lock();
        let Some(session) = guard.as_mut() else {
            // The session has ended (its tasks with it) and the consumer is closing: give
            // everything up, or librdkafka waits for the application to do so forever.
            let _ = consumer.unassign();
            return;
        };
        let partitions = input_partitions(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                Rebalanced { kind: "assign", partitions: &partitions }.emit();
                session.health.set_ready(false, "restoring assigned partitions");
                let (with_offsets, fresh, failed) = session.assign(tpl);
                if let Err(e) = consumer.assign(&with_offsets) {
                    session.poison(anyhow!("assigning partitions failed: {e}"));
                } else {
                    // Partitions that could not be restored stay assigned but fetch nothing
                    // until a retry restores them (isolation.rs).
                    if failed.count() > 0 {
                        if let Err(e) = consumer.pause(&failed) {
                            session.poison(anyhow!("pausing failed partitions failed: {e}"));
                        }
                    }
                    // A pause outlives an assignment in librdkafka: a partition that comes back
                    // to a new task starts resumed, whatever happened to it before.
                    if fresh.count() > 0 {
                        if let Err(e) = consumer.resume(&fresh) {
                            session.poison(anyhow!("resuming assigned partitions failed: {e}"));
                        }
                    }
                }
                if session.poisoned.is_none() {
                    session.report_readiness();
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                Rebalanced { kind: "revoke", partitions: &partitions }.emit();
                session.health.set_ready(false, "rebalancing: partitions revoked");
                session.revoke(consumer, tpl);
                if let Err(e) = consumer.unassign() {
                    session.poison(anyhow!("unassigning partitions failed: {e}"));
                }
            }
            other => {
                Rebalanced { kind: "error", partitions: &partitions }.emit();
                tracing::error!(error = ?other, "rebalance error");
                session.health.set_ready(false, "rebalance error");
                let failed: Vec<i32> = session.failed.keys().copied().collect();
                session.release_failed(consumer, &failed);
                let _ = consumer.unassign();
            }
        }
    }
}

/// Runs until `shutdown` is set (then commits final snapshots, leaves the group and returns).
///
/// Kafka being unreachable, or a topic missing or misconfigured, does not end the process: it
/// stays alive and not ready, says why in the log and on `/readyz`, and tries again with
/// backoff (a pod must not crash-loop because Kafka restarts). Only bad configuration, refused
/// before this is called, ends it at once.
pub fn run(config: Arc<Config>, shutdown: Arc<AtomicBool>, health: Arc<Health>) -> anyhow::Result<()> {
    Started { config: &config }.emit();
    let mut failures = 0u32;
    let partitions = loop {
        health.progress();
        match super::admin::prepare_topics(&config) {
            Ok(n) => break n,
            Err(e) if !super::admin::is_transient(&e) => return Err(e),
            Err(e) => {
                failures += 1;
                let retry_in = backoff(failures);
                StartBlocked { error: &e, retry_in }.emit();
                health.set_ready(false, &format!("cannot start consuming: {e:#}"));
                if wait_unless(&shutdown, retry_in, &health) {
                    return Ok(());
                }
            }
        }
    };
    tracing::info!(partitions, group = %config.kafka.group_id, instance = %config.kafka.instance_id, "input topics checked");
    run_prepared(config, shutdown, health)
}

/// Whether `e` is librdkafka refusing a client's configuration.
fn is_client_config_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<rdkafka::error::KafkaError>(),
            Some(rdkafka::error::KafkaError::ClientCreation(_))
        )
    })
}

/// 1, 2, 4, 8, 16, then 30 s between attempts.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs((1u64 << failures.saturating_sub(1).min(5)).min(30))
}

/// Waits `wait` unless `shutdown` is set first (then returns true), turning the health loop.
fn wait_unless(shutdown: &AtomicBool, wait: Duration, health: &Health) -> bool {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if shutdown.load(Ordering::SeqCst) {
            return true;
        }
        health.progress();
        std::thread::sleep(Duration::from_millis(50));
    }
    shutdown.load(Ordering::SeqCst)
}

/// [`run`] on topics the caller has already created and checked (the demo's in-process mock
/// cluster, which answers no admin requests).
pub fn run_prepared(
    config: Arc<Config>,
    shutdown: Arc<AtomicBool>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("banditflow-partition")
        .enable_all()
        .build()
        .context("starting the task runtime")?;
    let mut failures = 0u32;
    loop {
        health.progress();
        health.set_ready(false, "joining the consumer group");
        match session(&config, &runtime, &shutdown, &health) {
            Ok(SessionEnd::Shutdown) => {
                health.set_ready(false, "shut down");
                return Ok(());
            }
            Ok(SessionEnd::Restart(e)) | Err(e) if is_client_config_error(&e) => {
                // librdkafka refused the properties (kafka.properties and its sections):
                // configuration that no retry can fix.
                return Err(e.context("librdkafka refused the configuration (kafka.properties, kafka.consumer_properties, kafka.producer_properties)"));
            }
            Ok(SessionEnd::Restart(e)) | Err(e) => {
                health.set_ready(false, &format!("session restarting after: {e:#}"));
                if shutdown.load(Ordering::SeqCst) {
                    return Err(e.context(
                        "shutting down without a final snapshot; state is safe at the last committed one",
                    ));
                }
                failures += 1;
                let wait = backoff(failures);
                SessionRestarted { error: &e, wait }.emit();
                wait_unless(&shutdown, wait, &health);
            }
        }
    }
}

fn session(
    config: &Arc<Config>,
    runtime: &tokio::runtime::Runtime,
    shutdown: &AtomicBool,
    health: &Arc<Health>,
) -> anyhow::Result<SessionEnd> {
    let k = &config.kafka;
    let producer = super::transactional_producer(k, &format!("{}-{}", k.group_id, k.instance_id))?;
    let topic_index = config.topics.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let ctx = Ctx {
        session: Mutex::new(Some(Session {
            config: Arc::clone(config),
            consumer: std::sync::Weak::new(),
            runtime: runtime.handle().clone(),
            txn: Some(Txn { config: Arc::clone(config), producer, chunks: Default::default() }),
            inflight: None,
            tasks: BTreeMap::new(),
            poisoned: None,
            topic_index,
            align: config.topics.len() > 1,
            flow_changed: Arc::new(AtomicBool::new(false)),
            lag_changed: false,
            next_position_check: Instant::now(),
            health: Arc::clone(health),
            failed: BTreeMap::new(),
        })),
    };
    let mut cc = super::consumer_config(k);
    cc.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("queued.max.messages.kbytes", k.prefetch_kbytes.to_string());
    if k.consumer_property("auto.offset.reset").is_none() {
        cc.set("auto.offset.reset", "earliest");
    }
    if k.consumer_property("fetch.queue.backoff.ms").is_none() {
        // librdkafka postpones the next fetch of a partition whose local queue is over its
        // thresholds (queued.min.messages, queued.max.messages.kbytes) by this much, 1 s by
        // default. A commit stalls the polling for tens of milliseconds while the tasks report,
        // the queues fill past the threshold, and every partition then waited a whole second
        // with nothing to poll: the pipeline ran at 0.2–0.4 cores (BENCHMARKS.md).
        cc.set("fetch.queue.backoff.ms", "10");
    }
    if k.consumer_property("topic.metadata.refresh.interval.ms").is_none() {
        // Input partitions added while running are noticed at the next metadata refresh (then
        // the group rebalances and they get their snapshot-topic partitions): 5 min by default.
        cc.set("topic.metadata.refresh.interval.ms", "30000");
    }
    if k.consumer_property("statistics.interval.ms").is_none() {
        // With two topics the statistics also carry the end offsets of the inputs' fetch
        // responses, which tell the aligner that a topic fell behind while running.
        cc.set("statistics.interval.ms", if config.topics.len() > 1 { "1000" } else { "5000" });
    }
    // Impressions and feedback of partition p must meet in one task: range assignment gives a
    // member the same partition numbers of co-partitioned topics.
    cc.set("partition.assignment.strategy", "range").set("group.protocol", "classic");
    let consumer: Arc<BaseConsumer<Ctx>> =
        Arc::new(cc.create_with_context(ctx).context("creating the consumer")?);
    // The partition tasks' queues hold the consumer: the session (and with it the tasks) must
    // end before the consumer is dropped, however this function returns.
    let _end = EndSession(Arc::clone(&consumer));
    if let Some(s) = consumer.context().lock().as_mut() {
        s.consumer = Arc::downgrade(&consumer);
    }
    let topics: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
    consumer.subscribe(&topics).context("subscribing to the input topics")?;
    let interval = Duration::from_millis(k.snapshot_interval_ms as u64);
    let mut next_commit = Instant::now() + interval;
    // Records go to the partition tasks' own queues, so this loop turns per event (at most
    // every 20 ms when idle), not per record: the clock is read every turn.
    loop {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let polled = consumer.poll(Duration::from_millis(20));
        let mut guard = consumer.context().lock();
        let Some(s) = guard.as_mut() else { return Err(anyhow!("session vanished")) };
        match polled {
            Some(Ok(m)) => s.stray(&m),
            Some(Err(e)) => ConsumerError { error: &e }.emit(),
            None => {}
        }
        s.retry_failed(&consumer);
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
        health.progress();
        if Instant::now() >= next_commit {
            if let Err(e) = s.commit(&consumer, Commit::Interval) {
                s.poison(anyhow!("{e:#}"));
                return Ok(SessionEnd::Restart(e));
            }
            next_commit = Instant::now() + interval;
        }
    }
    // Shutdown: final snapshots of everything we own, then leave the group.
    tracing::info!("shutting down: committing final snapshots");
    health.set_ready(false, "shutting down");
    {
        let mut guard = consumer.context().lock();
        let Some(s) = guard.as_mut() else { return Err(anyhow!("session vanished")) };
        let parts: Vec<i32> = s.tasks.keys().copied().collect();
        if let Err(e) = s.commit(&consumer, Commit::Final) {
            s.poison(anyhow!("{e:#}"));
            return Ok(SessionEnd::Restart(e));
        }
        s.release_pauses(&consumer, &parts);
        s.end_tasks(&parts);
        s.report_lag();
    }
    consumer.unsubscribe();
    // Serve the resulting revocation (nothing left to commit) and leave the group.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
        let _ = consumer.poll(Duration::from_millis(20));
    }
    drop(_end);
    drop(consumer);
    tracing::info!("left the group");
    Ok(SessionEnd::Shutdown)
}

/// Ends the session held in the consumer's context when dropped: its tasks end and drop their
/// queues, so the consumer closes when its last handle goes.
struct EndSession(Arc<BaseConsumer<Ctx>>);

impl Drop for EndSession {
    fn drop(&mut self) {
        let session = self.0.context().lock().take();
        drop(session);
    }
}
