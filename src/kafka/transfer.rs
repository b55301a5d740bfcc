//! Moving recordings between files and topics: `record` captures topics (every partition, from
//! an offset or a time, until the end or for a duration) into the recording format, binary
//! payloads included; `produce_recording` writes a recording back to topics, keeping each
//! record's partition, key, headers and timestamp.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::recording::{self, Record};

/// Where recording starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Beginning,
    Offset(i64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// When recording stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAt {
    /// The end of every partition as it was when recording began.
    End,
    /// After this long, wherever the partitions are.
    Duration(Duration),
}

/// Captures `topics` into `out`; returns the number of records written. Reads committed
/// records only unless `read_uncommitted`.
pub fn record(
    client: ClientConfig,
    topics: &[String],
    start: StartAt,
    stop: StopAt,
    read_uncommitted: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut c = client;
    c.set("group.id", "banditflow-record")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", if read_uncommitted { "read_uncommitted" } else { "read_committed" });
    let consumer: BaseConsumer<super::store::QuietEof> =
        c.create_with_context(super::store::QuietEof).context("creating the recording consumer")?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|m| m.name() == t && m.error().is_none())
            .flat_map(|m| m.partitions().iter().map(|p| p.id()))
            .collect();
        if parts.is_empty() {
            bail!("topic `{t}` does not exist");
        }
        for p in parts {
            let (_, high) = consumer.fetch_watermarks(t, p, Duration::from_secs(10))?;
            ends.push((t.clone(), p, high));
            let offset = match start {
                StartAt::Beginning => Offset::Beginning,
                StartAt::Offset(o) => Offset::Offset(o),
                StartAt::Timestamp(ts) => Offset::Offset(ts),
            };
            tpl.add_partition_offset(t, p, offset)?;
        }
    }
    if let StartAt::Timestamp(_) = start {
        tpl =
            consumer.offsets_for_times(tpl, Duration::from_secs(10)).context("looking up offsets by time")?;
    }
    consumer.assign(&tpl)?;
    // With StopAt::End a partition is done at EOF or once it passes its end as of the start
    // (records committed later are not waited for).
    let mut open: BTreeSet<(String, i32)> = ends.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
    let end_of = |t: &str, p: i32| ends.iter().find(|e| e.0 == t && e.1 == p).map_or(0, |e| e.2);
    let started = Instant::now();
    let mut n = 0u64;
    loop {
        match stop {
            StopAt::End if open.is_empty() => break,
            StopAt::Duration(d) if started.elapsed() >= d => break,
            _ => {}
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let r = Record {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                };
                writeln!(out, "{}", recording::format_line(&r))?;
                n += 1;
                if stop == StopAt::End && m.offset() + 1 >= end_of(m.topic(), m.partition()) {
                    open.remove(&(m.topic().to_string(), m.partition()));
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // EOF carries only the partition; close it for every recorded topic at its end.
                let done: Vec<(String, i32)> = open.iter().filter(|(_, q)| *q == p).cloned().collect();
                for key in done {
                    let pos = consumer.position()?;
                    let at = pos
                        .find_partition(&key.0, key.1)
                        .and_then(|e| e.offset().to_raw())
                        .unwrap_or(i64::MAX);
                    if at >= end_of(&key.0, key.1) || end_of(&key.0, key.1) == 0 {
                        open.remove(&key);
                    }
                }
            }
            Some(Err(e)) => bail!("recording failed: {e}"),
        }
    }
    out.flush()?;
    Ok(n)
}

/// Produces recorded records to their topics and partitions with their keys, headers and
/// timestamps, in order per partition (idempotent producer). Returns how many were produced.
pub fn produce_recording(client: ClientConfig, records: impl Iterator<Item = Record>) -> anyhow::Result<u64> {
    let mut c = client;
    c.set("enable.idempotence", "true").set("linger.ms", "5").set("compression.type", "lz4");
    let producer: BaseProducer = c.create().context("creating the producer")?;
    let mut n = 0u64;
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k, value: Some(v.as_slice()) });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&r.topic).partition(r.partition).payload(r.payload.as_slice()).headers(headers);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(ts) = r.timestamp_ms {
            rec = rec.timestamp(ts);
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("producing to `{}`: {e}", r.topic),
            }
        }
        n += 1;
        if n % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(60)).context("flushing the producer")?;
    Ok(n)
}
