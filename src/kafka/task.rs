//! One partition's operator: a tokio task that owns the [`PartitionState`] of one input
//! partition, applies the records the driver routes to it (through the [`Aligner`] when two
//! input topics are merged by timestamp), and reports its shard output when asked. It does no
//! I/O besides its channels: the driver feeds it, the transaction writer stores what it reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::core::checkpoint::{self, SavedPartition};
use crate::core::event::InvalidEvent;
use crate::core::partition::{Applied, InputRecord, PartitionState};
use crate::telemetry::processor::PartitionMeter;

use super::inputs::{Aligner, Backlog, Flow};

/// Records handed to a partition task at a time.
pub(super) const BATCH: usize = 256;

/// One input record in this many (by offset) gives a sample of `banditflow_event_to_snapshot_seconds`.
pub(super) const FRESHNESS_SAMPLE: i64 = 16;

/// An input record copied out of the consumer's buffer.
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
    pub(super) fn copy(topic: usize, m: &rdkafka::message::BorrowedMessage<'_>) -> OwnedRecord {
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

/// The partition task: applies what it is sent, reports when asked, ends when told to or when
/// its channel closes.
pub(super) async fn partition_task(
    config: Arc<Config>,
    mut state: PartitionState,
    backlog: Vec<Backlog>,
    flow: Arc<Flow>,
    mut rx: mpsc::Receiver<Cmd>,
) {
    let mut last_saved = state.records;
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut timestamps = Vec::new();
    let mut meter = PartitionMeter::new(&state, config.topics.len());
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
                 timestamps: &mut Vec<i64>,
                 meter: &mut PartitionMeter| {
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
        let counts = meter.records.get_mut(r.topic);
        match state.apply(spec, input) {
            Applied::Invalid(reason) => {
                if let Some(c) = counts {
                    c[1] += 1;
                }
                dead.push(DeadLetter { record: r, reason })
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
                if let Some(ts) = r.timestamp_ms.filter(|_| r.offset % FRESHNESS_SAMPLE == 0) {
                    timestamps.push(ts);
                }
            }
        }
    };
    // Releases what the aligner lets go, telling the state first which inputs it skipped as idle.
    let drain = |aligner: &mut Aligner,
                 state: &mut PartitionState,
                 dead: &mut Vec<DeadLetter>,
                 timestamps: &mut Vec<i64>,
                 meter: &mut PartitionMeter| {
        while let Some(r) = aligner.pop(Instant::now()) {
            if std::mem::take(&mut aligner.idle_changed) {
                for (u, idle) in aligner.idle.iter().enumerate() {
                    state.set_idle(&config.topics[u].name, *idle);
                }
            }
            apply(state, r, dead, timestamps, meter);
        }
        steer(aligner);
    };
    loop {
        let cmd = match aligner.wait_hint(Instant::now()) {
            Some(wait) => match tokio::time::timeout(wait, rx.recv()).await {
                Ok(c) => c,
                Err(_) => {
                    drain(&mut aligner, &mut state, &mut dead, &mut timestamps, &mut meter);
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
                        apply(&mut state, r, &mut dead, &mut timestamps, &mut meter);
                    }
                } else {
                    for r in batch {
                        aligner.push(r);
                    }
                    drain(&mut aligner, &mut state, &mut dead, &mut timestamps, &mut meter);
                }
            }
            Cmd::Backlog { topic, backlog } => {
                aligner.set_backlog(topic, backlog, Instant::now());
                drain(&mut aligner, &mut state, &mut dead, &mut timestamps, &mut meter);
            }
            Cmd::Snapshot { stop, reply } => {
                // A configuration change applied at restore must reach the snapshot topic even
                // on a partition that receives nothing (serving nodes merge all its shards).
                let saved = (state.records != last_saved || !dead.is_empty() || state.join.changes.dirty)
                    .then(|| checkpoint::save_changes(spec, &mut state));
                meter.report(&config, &state);
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
