//! Failure isolation: a partition that cannot be restored stays alone. It is kept assigned
//! (so the group does not move it to the next member, which would fail the same way, in a
//! rebalance loop) but paused, its cause is logged and exported
//! (`banditflow_partition_failed{partition,reason}`), and its restore is retried with backoff
//! on a thread of its own while the other partitions go on. Each partition restores within
//! `kafka.restore_timeout` of its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use crate::config::Config;
use crate::core::partition::PartitionState;
use crate::core::snapshot::SnapshotError;
use crate::telemetry::processor::{Assigned, PartitionFailed, PartitionRecovered};

use super::driver::Ctx;
use super::inputs::{input_lag, InputLag};
use super::session::Session;
use super::store;

/// Why a partition could not be restored: a short class (the metric's `reason` label, from a
/// fixed set) and the error that says what to fix.
pub(super) struct Failure {
    pub(super) reason: &'static str,
    pub(super) error: anyhow::Error,
}

/// The classes of `Failure::reason` (the metric's label values).
pub const REASONS: [&str; 7] = [
    "restore_timeout",
    "snapshot_unreadable",
    "undecodable",
    "format_version",
    "incomplete",
    "no_snapshot_partition",
    "not_copartitioned",
];

/// A partition restored, with the chunk counts of its stored keys (for the transaction writer).
pub(super) struct Restored {
    pub(super) state: PartitionState,
    pub(super) chunks: super::txn::ChunkCounts,
}

/// An assigned partition that could not be restored.
pub(super) struct Failed {
    pub(super) reason: &'static str,
    pub(super) attempts: u32,
    pub(super) retry_at: Instant,
    /// The retry running on its own thread.
    running: Option<std::thread::JoinHandle<Result<Restored, Failure>>>,
}

/// The first retry comes after this; each next one waits twice as long, up to [`RETRY_MAX`].
pub(super) const RETRY_FIRST: Duration = Duration::from_secs(1);
pub(super) const RETRY_MAX: Duration = Duration::from_secs(60);

pub(super) fn backoff(attempts: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1u32 << attempts.saturating_sub(1).min(16)).min(RETRY_MAX)
}

/// Restores partition `p` from the snapshot and changelog topics within
/// `kafka.restore_timeout`.
pub(super) fn restore_one(config: &Config, p: i32) -> Result<Restored, Failure> {
    let k = &config.kafka;
    let timeout = Duration::from_millis(k.restore_timeout_ms as u64);
    let read = |topic: &str| {
        let mut stores =
            store::read_partitions(super::consumer_config(k), topic, &[p], timeout).map_err(|e| {
                let reason = if format!("{e:#}").contains("did not reach the end") {
                    "restore_timeout"
                } else {
                    "snapshot_unreadable"
                };
                Failure { reason, error: e.context(format!("reading partition {p} of `{topic}`")) }
            })?;
        stores.remove(&p).ok_or_else(|| Failure {
            reason: "snapshot_unreadable",
            error: anyhow!("partition {p} of `{topic}` was not read"),
        })
    };
    // Both topics at once, each within the timeout. They must be one cut: every commit writes
    // the partition's checkpoint header to the snapshot topic, so if the snapshot partition's
    // end (read_committed) is the same before and after both reads, no commit landed between
    // them (an owner's last transaction resolving late, say) and the two reads agree.
    let watermarks: BaseConsumer = {
        let mut c = super::consumer_config(k);
        c.set("isolation.level", "read_committed").set("group.id", "banditflow-restore");
        c.create().map_err(|e| Failure {
            reason: "snapshot_unreadable",
            error: anyhow!("creating a watermark client: {e}"),
        })?
    };
    let end = || {
        watermarks.fetch_watermarks(&k.snapshot_topic, p, timeout).map(|w| w.1).map_err(|e| Failure {
            reason: "snapshot_unreadable",
            error: anyhow!("end offset of partition {p} of `{}`: {e}", k.snapshot_topic),
        })
    };
    let mut attempt = 0;
    let (snapshots, changelog) = loop {
        let before = end()?;
        let (snapshots, changelog) = std::thread::scope(|s| {
            let changelog = s.spawn(|| read(&k.changelog_topic));
            let snapshots = read(&k.snapshot_topic);
            let changelog = changelog.join().unwrap_or_else(|_| {
                Err(Failure {
                    reason: "snapshot_unreadable",
                    error: anyhow!("reading the changelog topic panicked"),
                })
            });
            (snapshots, changelog)
        });
        let (snapshots, changelog) = (snapshots?, changelog?);
        let after = end()?;
        if before == after {
            break (snapshots, changelog);
        }
        attempt += 1;
        if attempt == 3 {
            return Err(Failure {
                reason: "snapshot_unreadable",
                error: anyhow!(
                    "partition {p} of `{}` kept changing while it was read ({before} → {after}, {attempt} \
                     times): is another instance still writing it?",
                    k.snapshot_topic
                ),
            });
        }
        tracing::info!(
            partition = p,
            before,
            after,
            "the partition changed while it was read; reading it again"
        );
    };
    let state = store::restore_partition(config, p, &snapshots, &changelog).map_err(|e| {
        let reason = match e.chain().find_map(|c| c.downcast_ref::<SnapshotError>()) {
            Some(SnapshotError::Missing(_)) => "incomplete",
            Some(SnapshotError::CheckpointVersion { .. } | SnapshotError::Version { .. }) => "format_version",
            _ => "undecodable",
        };
        Failure { reason, error: e }
    })?;
    let chunks = super::txn::ChunkCounts {
        snapshot: store::chunk_counts(&snapshots),
        changelog: store::chunk_counts(&changelog),
    };
    Ok(Restored { state, chunks })
}

/// Checks that partition `p` exists on every input topic and on the snapshot and changelog
/// topics, given the partition counts read at assignment; adds their partitions for input
/// partitions added while running (when `kafka.create_topics` allows it).
pub(super) fn check_partition(
    config: &Config,
    counts: &BTreeMap<String, i32>,
    p: i32,
) -> Result<(), Failure> {
    let k = &config.kafka;
    let missing: Vec<String> = config
        .topics
        .iter()
        .filter_map(|t| counts.get(&t.name).filter(|n| **n <= p).map(|n| format!("`{}` has {n}", t.name)))
        .collect();
    if !missing.is_empty() {
        return Err(Failure {
            reason: "not_copartitioned",
            error: anyhow!(
                "input partition {p} is not on every input topic ({}): partitions were added to one input \
                 topic only; add the same number to the others (keys then hash to new partitions: feedback \
                 of impressions logged before the change may not meet them)",
                missing.join(", ")
            ),
        });
    }
    let inputs = config.topics.iter().filter_map(|t| counts.get(&t.name)).max().copied().unwrap_or(0);
    for topic in [&k.snapshot_topic, &k.changelog_topic] {
        match counts.get(topic) {
            Some(n) if *n > p => {}
            Some(n) if k.create_topics => {
                super::admin::add_partitions(config, topic, inputs).map_err(|e| Failure {
                    reason: "no_snapshot_partition",
                    error: e.context(format!(
                        "input partition {p} has no partition on `{topic}` (it has {n}) and adding them failed"
                    )),
                })?;
                tracing::info!(%topic, from = n, to = inputs, "added partitions for new input partitions");
            }
            Some(n) => {
                return Err(Failure {
                    reason: "no_snapshot_partition",
                    error: anyhow!(
                        "input partition {p} has no partition on `{topic}` (it has {n}, the inputs {inputs}) and \
                         kafka.create_topics is false: add partitions to it (kafka-topics.sh --alter --topic \
                         {topic} --partitions {inputs})"
                    ),
                })
            }
            // Counts unknown (metadata unreadable): the restore finds out.
            None => {}
        }
    }
    Ok(())
}

impl Session {
    /// Marks partition `p` failed (again): exported, logged, retried after a backoff.
    pub(super) fn fail(&mut self, p: i32, failure: Failure) {
        let now = Instant::now();
        let entry = self.failed.entry(p).or_insert(Failed {
            reason: failure.reason,
            attempts: 0,
            retry_at: now,
            running: None,
        });
        let previous = std::mem::replace(&mut entry.reason, failure.reason);
        entry.attempts += 1;
        let wait = backoff(entry.attempts);
        entry.retry_at = now + wait;
        if previous != failure.reason {
            PartitionRecovered { partition: p, reason: previous, quiet: true }.emit();
        }
        PartitionFailed {
            partition: p,
            reason: failure.reason,
            error: &failure.error,
            attempts: entry.attempts,
            retry_in: wait,
        }
        .emit();
        self.report_readiness();
    }

    /// Starts the retries that are due, and takes the ones that finished (after a poll).
    pub(super) fn retry_failed(&mut self, consumer: &BaseConsumer<Ctx>) {
        if self.failed.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut finished = Vec::new();
        for (p, f) in &mut self.failed {
            match &f.running {
                None if now >= f.retry_at => {
                    let config = Arc::clone(&self.config);
                    let p = *p;
                    let spawned = std::thread::Builder::new().name(format!("banditflow-restore-{p}")).spawn(
                        move || {
                            // The topics may have changed since: partitions added to an input
                            // or the snapshot topic (or still not).
                            let counts = super::admin::partition_counts(&config).unwrap_or_default();
                            check_partition(&config, &counts, p).and_then(|()| restore_one(&config, p))
                        },
                    );
                    match spawned {
                        Ok(h) => f.running = Some(h),
                        Err(e) => tracing::warn!(partition = p, error = %e, "cannot start a restore thread"),
                    }
                }
                Some(h) if h.is_finished() => finished.push(*p),
                _ => {}
            }
        }
        for p in finished {
            let Some(handle) = self.failed.get_mut(&p).and_then(|f| f.running.take()) else { continue };
            let result = handle.join().unwrap_or_else(|_| {
                Err(Failure { reason: "undecodable", error: anyhow!("the restore panicked") })
            });
            match result {
                Ok(restored) => self.recover(consumer, p, restored),
                Err(failure) => self.fail(p, failure),
            }
        }
    }

    /// A failed partition restored at last: its task starts where its state says, and its
    /// inputs are resumed.
    fn recover(&mut self, consumer: &BaseConsumer<Ctx>, p: i32, restored: Restored) {
        if let Err(e) = self.settle() {
            self.poison(e);
            return;
        }
        let Some(failed) = self.failed.remove(&p) else { return };
        let Restored { state, chunks } = restored;
        if let Some(txn) = self.txn.as_mut() {
            txn.chunks.extend(chunks);
        }
        let mut seek = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for t in &self.config.topics {
            let offset = self.start_offset(&state, &t.name, p);
            if let Err(e) = seek.add_partition_offset(&t.name, p, offset) {
                self.poison(anyhow!("building a seek: {e}"));
                return;
            }
            resume.add_partition(&t.name, p);
        }
        // The task's queues are split off before the seek, so that every record fetched from
        // where the state ends reaches them.
        let queues = match self.split_queues(p) {
            Ok(q) => q,
            Err(e) => {
                self.poison(e);
                return;
            }
        };
        // Records fetched for the partition while it failed were dropped (no task): read again
        // from where the state ends.
        if let Err(e) = consumer.seek_partitions(seek, Duration::from_secs(10)) {
            let reason = failed.reason;
            // Back with its attempts, so the backoff goes on growing.
            self.failed.insert(p, failed);
            self.fail(p, Failure { reason, error: anyhow!("seeking partition {p}: {e}") });
            return;
        }
        let inputs: Vec<InputLag> = if self.align {
            let ends = self.input_ends(&[p]);
            self.config
                .topics
                .iter()
                .map(|t| {
                    let key = (t.name.clone(), p);
                    input_lag(state.offsets.get(&key).copied(), ends.get(&key).copied(), self.latest())
                })
                .collect()
        } else {
            Vec::new()
        };
        let records = state.records;
        self.spawn(p, state, inputs, queues);
        if let Err(e) = consumer.resume(&resume) {
            self.poison(anyhow!("resuming a recovered partition failed: {e}"));
            return;
        }
        PartitionRecovered { partition: p, reason: failed.reason, quiet: false }.emit();
        tracing::info!(partition = p, records, attempts = failed.attempts, "partition assigned and restored");
        Assigned { partitions: self.tasks.len() }.emit();
        self.report_lag();
        self.report_readiness();
    }

    /// Forgets the failed partitions among `parts` (being revoked) and resumes their inputs:
    /// a pause outlives the assignment.
    pub(super) fn release_failed(&mut self, consumer: &BaseConsumer<Ctx>, parts: &[i32]) {
        let mut resume = TopicPartitionList::new();
        for p in parts {
            if let Some(f) = self.failed.remove(p) {
                PartitionRecovered { partition: *p, reason: f.reason, quiet: true }.emit();
                for t in &self.config.topics {
                    resume.add_partition(&t.name, *p);
                }
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                self.poison(anyhow!("resuming failed partitions being revoked: {e}"));
            }
        }
    }

    /// Ready when no assigned partition is failed (the driver says when a rebalance runs).
    pub(super) fn report_readiness(&self) {
        match self.failed.iter().next() {
            None => self.health.set_ready(true, ""),
            Some((p, f)) => self.health.set_ready(
                false,
                &format!(
                    "{} partition(s) failed to restore (partition {p}: {})",
                    self.failed.len(),
                    f.reason
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_one_second_to_a_minute() {
        let s = |n| backoff(n).as_secs();
        assert_eq!([s(1), s(2), s(3), s(6), s(7), s(40)], [1, 2, 4, 32, 60, 60]);
    }
}
