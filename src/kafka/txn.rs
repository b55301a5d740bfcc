//! The transaction writer (the state backend's write half; `store` is its read half): one
//! Kafka transaction per commit holding the shard snapshots (snapshot topic) and the
//! attribution changelog's records (changelog topic), the dead letters, and the input offsets (`send_offsets_to_transaction` with the consumer's group
//! metadata, so a zombie member is fenced). Chunks large values (`core::blob`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::core::{blob, checkpoint};
use crate::replay::{HEADER_CODE, HEADER_REASON};
use crate::telemetry::processor::{PublishedShard, TransactionCommitted, TransactionFailed};

use super::store;
use super::task::ShardOutput;

/// The transactional producer and what it needs to write a transaction: one at a time, on the
/// consumer thread or on a commit thread.
pub(super) struct Txn {
    pub(super) config: Arc<Config>,
    pub(super) producer: BaseProducer,
    pub(super) chunks: ChunkCounts,
}

/// The two compacted topics a partition's state is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dest {
    Snapshot = 0,
    Changelog = 1,
}

impl Dest {
    /// Where `key` is stored (`checkpoint::is_changelog_key`).
    fn of(key: &str) -> Dest {
        if checkpoint::is_changelog_key(key) {
            Dest::Changelog
        } else {
            Dest::Snapshot
        }
    }
}

/// Chunk counts of the stored keys of each topic, to delete surplus chunks.
#[derive(Debug, Default)]
pub(super) struct ChunkCounts {
    pub(super) snapshot: HashMap<String, u32>,
    pub(super) changelog: HashMap<String, u32>,
}

impl ChunkCounts {
    fn of(&self, d: Dest) -> &HashMap<String, u32> {
        match d {
            Dest::Snapshot => &self.snapshot,
            Dest::Changelog => &self.changelog,
        }
    }

    fn of_mut(&mut self, d: Dest) -> &mut HashMap<String, u32> {
        match d {
            Dest::Snapshot => &mut self.snapshot,
            Dest::Changelog => &mut self.changelog,
        }
    }

    /// Adds a restored partition's counts.
    pub(super) fn extend(&mut self, other: ChunkCounts) {
        self.snapshot.extend(other.snapshot);
        self.changelog.extend(other.changelog);
    }
}

impl Txn {
    /// One transaction: the shard snapshots and dead letters of `outputs` and their input
    /// offsets, committed with the consumer's group metadata `cgm`; reported either way.
    pub(super) fn run(
        &mut self,
        outputs: &[ShardOutput],
        cgm: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> anyhow::Result<()> {
        let partitions: Vec<i32> = outputs.iter().map(|o| o.partition).collect();
        let span = tracing::info_span!("transaction", partitions = ?partitions);
        let _entered = span.enter();
        let started = Instant::now();
        match self.write(outputs, cgm) {
            Ok((bytes, changelog_bytes)) => {
                let shards: Vec<PublishedShard<'_>> = outputs
                    .iter()
                    .flat_map(|o| {
                        o.saved.iter().flat_map(move |s| {
                            s.models.iter().map(move |(model, b)| PublishedShard {
                                model,
                                partition: o.partition,
                                // The head and the model's arm segments written with it.
                                bytes: b.len()
                                    + s.puts
                                        .iter()
                                        .filter(|(k, _)| {
                                            crate::core::armlog::parse_segment_key(k)
                                                .is_some_and(|(m, _, _)| &m == model)
                                        })
                                        .map(|(_, v)| v.len())
                                        .sum::<usize>(),
                                version: o.records,
                            })
                        })
                    })
                    .collect();
                let dead_letters: Vec<&'static str> =
                    outputs.iter().flat_map(|o| o.dead_letters.iter().map(|d| d.reason.code())).collect();
                let record_timestamps: Vec<i64> =
                    outputs.iter().flat_map(|o| o.timestamps.iter().copied()).collect();
                TransactionCommitted {
                    elapsed: started.elapsed(),
                    bytes,
                    changelog_bytes,
                    shards: &shards,
                    dead_letters: &dead_letters,
                    record_timestamps: &record_timestamps,
                    now_ms: super::now_ms(),
                }
                .emit();
                Ok(())
            }
            Err(e) => {
                let models: Vec<&str> = outputs
                    .iter()
                    .flat_map(|o| o.saved.iter().flat_map(|s| s.models.iter().map(|(m, _)| m.as_str())))
                    .collect();
                TransactionFailed { error: &e, models: &models }.emit();
                Err(e)
            }
        }
    }

    /// Writes and commits the transaction; returns the bytes written to the snapshot topic and
    /// to the changelog topic.
    fn write(
        &mut self,
        outputs: &[ShardOutput],
        cgm: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> anyhow::Result<(usize, usize)> {
        let k = &self.config.kafka;
        let timeout = Duration::from_millis(k.transaction_timeout_ms as u64);
        self.producer.begin_transaction().context("begin transaction")?;
        let mut offsets = TopicPartitionList::new();
        // Per topic: [snapshot, changelog].
        let mut bytes = [0usize; 2];
        let mut new_chunks = Vec::new();
        for out in outputs {
            for (t, p, o) in &out.offsets {
                offsets.add_partition_offset(t, *p, Offset::Offset(*o))?;
            }
            if let Some(saved) = &out.saved {
                for (key, value) in &saved.puts {
                    bytes[Dest::of(key) as usize] += value.len();
                    self.put(Dest::of(key), key, out.records, out.partition, value, &mut new_chunks)?;
                }
                // Then the deletes, each on its topic, and the moved keys on the snapshot topic.
                let deletes = saved.deletes.iter().map(|k| (Dest::of(k), k));
                let moved = saved.moved.iter().map(|k| (Dest::Snapshot, k));
                for (dest, key) in deletes.chain(moved) {
                    let topic = self.topic(dest);
                    self.send(topic, Some(out.partition), key.as_bytes(), None, None)?;
                    // A deleted value that was chunked (a removed model's snapshot) takes its
                    // chunks with it, so compaction can drop them.
                    if let Some(&n) = self.chunks.of(dest).get(key) {
                        for i in 0..n {
                            let ck = blob::chunk_key(key, i);
                            self.send(topic, Some(out.partition), ck.as_bytes(), None, None)?;
                        }
                        new_chunks.push((dest, key.clone(), 0));
                    }
                }
                let mut values = vec![(store::checkpoint_key(out.partition), &saved.header)];
                for (model, b) in &saved.models {
                    values.push((store::model_key(model, out.partition), b));
                }
                for (key, value) in values {
                    bytes[Dest::Snapshot as usize] += value.len();
                    self.put(Dest::Snapshot, &key, out.records, out.partition, value, &mut new_chunks)?;
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
            }
        }
        self.producer
            .send_offsets_to_transaction(&offsets, cgm, timeout)
            .map_err(|e| self.txn_error("send offsets", e))?;
        super::commit_transaction(&self.producer, timeout).map_err(|e| self.txn_error("commit", e))?;
        for (dest, key, n) in new_chunks {
            if n > 0 {
                self.chunks.of_mut(dest).insert(key, n);
            } else {
                self.chunks.of_mut(dest).remove(&key);
            }
        }
        Ok((bytes[0], bytes[1]))
    }

    fn topic(&self, d: Dest) -> &str {
        match d {
            Dest::Snapshot => &self.config.kafka.snapshot_topic,
            Dest::Changelog => &self.config.kafka.changelog_topic,
        }
    }

    /// Writes one value of the snapshot or changelog topic, chunked if large.
    fn put(
        &self,
        dest: Dest,
        key: &str,
        version: u64,
        partition: i32,
        value: &[u8],
        chunks: &mut Vec<(Dest, String, u32)>,
    ) -> anyhow::Result<()> {
        let k = &self.config.kafka;
        let previous = self.chunks.of(dest).get(key).copied().unwrap_or(0);
        let recs = blob::split(key, version, value, k.max_record_bytes, previous);
        let n = recs.iter().filter(|r| r.value.is_some() && r.key != key).count() as u32;
        if n > 0 || previous > 0 {
            chunks.push((dest, key.to_string(), n));
        }
        for r in recs {
            self.send(self.topic(dest), Some(partition), r.key.as_bytes(), r.value.as_deref(), None)?;
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
        super::send_waiting(&self.producer, rec)
    }
}
