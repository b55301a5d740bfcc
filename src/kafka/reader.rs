//! The one reader of the snapshot topic: every consumer of it (restoring partitions, tools
//! reading every model, serving nodes following the models) is configured here, reads with
//! `read_committed` (an aborted transaction's records are never seen), and filters keys here.
//!
//! Must never: decode values. It hands out raw keys and values; `core::blob` reassembles and
//! `core::snapshot` / `core::checkpoint` decode.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::core::blob::LatestByKey;
use crate::core::checkpoint;

/// A client context that does not report reaching the end of a partition as an error (the
/// readers here ask for exactly that).
pub struct QuietEof;

impl rdkafka::client::ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!(%error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Which keys a reader hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Everything (restoring a partition).
    All,
    /// Model snapshots (heads `model/<m>/<p>`, arm segments `model/<m>/<p>/<seq>` and their
    /// chunks) and partition checkpoints
    /// (`checkpoint/<p>`, which say that a partition has state): what serving nodes and tools
    /// need. Attribution changelog records an older build wrote here (before they had a topic
    /// of their own) are skipped.
    Models,
}

impl Keys {
    fn wants(self, key: &str) -> bool {
        match self {
            Keys::All => true,
            Keys::Models => {
                let base = key.split('#').next().unwrap_or(key);
                checkpoint::parse_model_key(base).is_some()
                    || crate::core::armlog::parse_segment_key(base).is_some()
                    || base.starts_with("checkpoint/")
            }
        }
    }
}

/// One record of the snapshot topic that passed the key filter.
#[derive(Debug)]
pub struct SnapshotRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
}

/// What one poll brought.
#[derive(Debug)]
pub enum Read {
    Record(SnapshotRecord),
    /// A record the key filter dropped (its offset still counts as read).
    Skipped {
        partition: i32,
        offset: i64,
    },
    /// The partition has been read to its current end.
    End(i32),
    /// Nothing within the wait.
    Idle,
    /// A consumer error (logged by the caller); reading goes on.
    Error(KafkaError),
}

/// A consumer of the snapshot topic.
pub struct SnapshotReader {
    consumer: BaseConsumer<QuietEof>,
    topic: String,
    keys: Keys,
}

impl SnapshotReader {
    /// `client` holds the bootstrap servers and pass-through properties; `purpose` names the
    /// (never committed) group id, `banditflow-<purpose>`.
    pub fn new(
        client: ClientConfig,
        topic: &str,
        purpose: &str,
        keys: Keys,
    ) -> anyhow::Result<SnapshotReader> {
        let mut c = client;
        c.set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("group.id", format!("banditflow-{purpose}"))
            .set("fetch.wait.max.ms", "20")
            .set("fetch.max.bytes", "52428800");
        let consumer: BaseConsumer<QuietEof> = c
            .create_with_context(QuietEof)
            .with_context(|| format!("creating the snapshot-topic reader ({purpose})"))?;
        Ok(SnapshotReader { consumer, topic: topic.to_string(), keys })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic's partitions (empty while it does not exist).
    pub fn partitions(&self, timeout: Duration) -> anyhow::Result<BTreeSet<i32>> {
        let md = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    }

    /// Starts reading `partitions` from their beginning (added to what is already read).
    pub fn assign_from_start(&self, partitions: &[i32]) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Beginning)?;
        }
        self.consumer.incremental_assign(&tpl).context("assigning snapshot-topic partitions")
    }

    /// The end of `partition` as a read_committed reader sees it (the last stable offset).
    pub fn end_offset(&self, partition: i32, timeout: Duration) -> anyhow::Result<i64> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, timeout)
            .with_context(|| format!("end offset of `{}` partition {partition}", self.topic))?;
        Ok(high)
    }

    /// Waits up to `wait` for the next record or event.
    pub fn poll(&self, wait: Duration) -> Read {
        match self.consumer.poll(wait) {
            None => Read::Idle,
            Some(Ok(m)) => {
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                if self.keys.wants(&key) {
                    Read::Record(SnapshotRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key,
                        value: m.payload().map(<[u8]>::to_vec),
                    })
                } else {
                    Read::Skipped { partition: m.partition(), offset: m.offset() }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => Read::End(p),
            Some(Err(e)) => Read::Error(e),
        }
    }
}

/// Reads `partitions` to their current end and returns the newest value per key of each.
pub fn read_to_end(
    client: ClientConfig,
    topic: &str,
    partitions: &[i32],
    keys: Keys,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<i32, LatestByKey>> {
    let reader = SnapshotReader::new(client, topic, "restore", keys)?;
    reader.assign_from_start(partitions)?;
    let mut out: BTreeMap<i32, LatestByKey> =
        partitions.iter().map(|p| (*p, LatestByKey::default())).collect();
    let mut open: BTreeSet<i32> = partitions.iter().copied().collect();
    let deadline = Instant::now() + timeout;
    while !open.is_empty() {
        if Instant::now() > deadline {
            bail!("reading `{topic}` did not reach the end of partitions {open:?} within {timeout:?}");
        }
        match reader.poll(Duration::from_millis(100)) {
            Read::Record(r) => {
                if let Some(store) = out.get_mut(&r.partition) {
                    store.put(r.key, r.value);
                }
            }
            Read::End(p) => {
                open.remove(&p);
            }
            Read::Skipped { .. } | Read::Idle => {}
            Read::Error(e) => tracing::warn!(error = %e, "while reading the snapshot topic"),
        }
    }
    Ok(out)
}

/// The partitions of `listed` a follower does not follow yet (`followed`), within `only`, each
/// with its end offset from `end_offset`; all of them or an error. A follower records and
/// assigns them only once every end is known: recording some before a later one failed (a
/// leader election answers NotLeaderForPartition) would leave them recorded and never
/// assigned, so never read, and their state missing from every merge.
pub fn new_partitions(
    listed: &BTreeSet<i32>,
    followed: &BTreeMap<i32, i64>,
    only: Option<&std::ops::Range<i32>>,
    mut end_offset: impl FnMut(i32) -> anyhow::Result<i64>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    listed
        .iter()
        .filter(|p| !followed.contains_key(p) && only.is_none_or(|r| r.contains(p)))
        .map(|p| Ok((*p, end_offset(*p)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_end_offset_leaves_every_new_partition_to_the_next_try() {
        let listed: BTreeSet<i32> = (0..20).collect();
        let mut followed: BTreeMap<i32, i64> = BTreeMap::new();
        let group = 16..32;
        // Partition 17's leader is being elected: the first try fails there, after 16 was asked.
        let mut asked = Vec::new();
        let first = new_partitions(&listed, &followed, Some(&group), |p| {
            asked.push(p);
            if p == 17 {
                anyhow::bail!("NotLeaderForPartition")
            }
            Ok(i64::from(p) * 10)
        });
        assert!(first.is_err());
        assert_eq!(asked, [16, 17]);
        // The follower records what a successful try returns, and nothing of a failed one.
        let second =
            new_partitions(&listed, &followed, Some(&group), |p| Ok(i64::from(p) * 10)).expect("ends");
        assert_eq!(second, [(16, 160), (17, 170), (18, 180), (19, 190)], "16 is still new");
        followed.extend(second);
        let third = new_partitions(&listed, &followed, Some(&group), |_| anyhow::bail!("not asked"));
        assert_eq!(third.expect("nothing to ask"), []);
        let all = new_partitions(&listed, &followed, None, |p| Ok(i64::from(p))).expect("ends");
        assert_eq!(all.iter().map(|(p, _)| *p).collect::<Vec<_>>(), (0..16).collect::<Vec<_>>());
    }
}
