//! The snapshot and changelog topics: record keys, restoring partitions from them, and reading
//! every model.
//!
//! Layout: the state of input partition `p` lives in partition `p` of both topics, under the
//! keys of `core::checkpoint`, written in one transaction per version: on the snapshot topic
//! `checkpoint/<p>`, the model heads `model/<model>/<p>` and their arm segments
//! `model/<model>/<p>/<seq>` (and format 1's `imp/<p>/<id>`, only ever deleted); on the
//! changelog topic the attribution changelog, `buf/<p>/<seq>` and `held/<p>/<seq>`
//! (`checkpoint::is_changelog_key`). Values are `StoredBlob`s, chunked when large (see
//! `core::blob`). Restoring reads the partition of both from the beginning to its end with
//! read_committed, so only committed transactions are seen.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;
use crate::core::blob::LatestByKey;

use super::reader::{Keys, SnapshotReader};
use crate::core::partition::PartitionState;
use crate::core::snapshot::DecodedSnapshot;
use crate::core::{armlog, checkpoint};

pub use super::reader::QuietEof;

pub use crate::core::checkpoint::{header_key as checkpoint_key, model_key};

/// The (low, high) watermarks of `partitions` of each of `topics`, as a read_committed
/// consumer sees them (one ListOffsets query each, through one client), all within `timeout`.
pub fn watermarks(
    client: rdkafka::config::ClientConfig,
    topics: &[&str],
    partitions: &[i32],
    timeout: Duration,
) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    let mut c = client;
    c.set("isolation.level", "read_committed").set("group.id", "banditflow-watermarks");
    let consumer: BaseConsumer = c.create().context("creating the watermark client")?;
    let deadline = Instant::now() + timeout;
    let mut out = BTreeMap::new();
    for topic in topics {
        for p in partitions {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("watermarks of `{topic}` not read within {timeout:?}");
            }
            let w = consumer
                .fetch_watermarks(topic, *p, left)
                .with_context(|| format!("watermarks of `{topic}` partition {p}"))?;
            out.insert((topic.to_string(), *p), w);
        }
    }
    Ok(out)
}

/// Reads partitions of the snapshot or changelog topic to their current end (every key) and
/// returns the newest value per key of each: what restoring a partition needs.
pub fn read_partitions(
    client: rdkafka::config::ClientConfig,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> anyhow::Result<BTreeMap<i32, LatestByKey>> {
    super::reader::read_to_end(client, topic, partitions, Keys::All, timeout)
}

/// A partition's state rebuilt from its stored values on the snapshot topic (`snapshots`) and
/// the changelog topic (`changelog`); a fresh state if there are none. Changelog values an
/// older build kept on the snapshot topic are read there and moved by the next save.
pub fn restore_partition(
    config: &Config,
    partition: i32,
    snapshots: &LatestByKey,
    changelog: &LatestByKey,
) -> anyhow::Result<PartitionState> {
    let inputs = config.topics.iter().map(|t| t.name.as_str());
    let Some((version, cp)) = snapshots.get(&checkpoint_key(partition))? else {
        let mut state = PartitionState::new(&config.core, partition);
        state.declare_inputs(inputs);
        return Ok(state);
    };
    let mut model_values: Vec<(String, Vec<u8>)> = Vec::new();
    let mut segments = Vec::new();
    let mut legacy_impressions = Vec::new();
    let mut held = Vec::new();
    let (seg_prefix, imp_prefix, held_prefix) =
        (format!("buf/{partition}/"), format!("imp/{partition}/"), format!("held/{partition}/"));
    // Keys written by older versions: read, then deleted (model keys of unescaped ids are
    // written again under their escaped key; format-1 impressions go into a segment).
    let mut legacy_keys = Vec::new();
    // Changelog values on the snapshot topic: read, then moved to the changelog topic.
    let mut moved = Vec::new();
    let is_changelog = |key: &str| key.starts_with(&seg_prefix) || key.starts_with(&held_prefix);
    let mut keep = |key: &str, bytes: Vec<u8>| {
        if key.starts_with(&seg_prefix) {
            segments.push((key.to_string(), bytes));
        } else {
            held.push(bytes);
        }
    };
    for key in changelog.values.keys().filter(|k| !k.contains('#') && is_changelog(k)) {
        if let Some((_, bytes)) = changelog.get(key)? {
            keep(key, bytes);
        }
    }
    for key in snapshots.values.keys() {
        // Ids are escaped in keys (`checkpoint::escape_key_part`), so `#` marks a chunk only.
        if key.contains('#') {
            continue;
        }
        if checkpoint::parse_model_key(key).is_some_and(|(_, p)| p == partition) {
            // A head of another version is not this checkpoint's.
            if let Some((v, bytes)) = snapshots.get(key)? {
                if v == version {
                    model_values.push((key.clone(), bytes));
                }
            }
            let segment = key.trim_start_matches("model/").rsplit_once('/').map_or("", |(m, _)| m);
            if !checkpoint::is_escaped_key_part(segment) {
                legacy_keys.push(key.clone());
            }
        } else if armlog::parse_segment_key(key).is_some_and(|(_, p, _)| p == partition) {
            if let Some((_, bytes)) = snapshots.get(key)? {
                model_values.push((key.clone(), bytes));
            }
        } else if is_changelog(key) {
            let Some((_, bytes)) = snapshots.get(key)? else { continue };
            // Both places (not written by any build): the changelog topic's value wins, and is
            // written again so the snapshot topic's goes.
            match changelog.get(key)? {
                Some((_, newer)) => moved.push((key.clone(), newer)),
                None => {
                    keep(key, bytes.clone());
                    moved.push((key.clone(), bytes));
                }
            }
        } else if key.starts_with(&imp_prefix) {
            if let Some((_, bytes)) = snapshots.get(key)? {
                legacy_keys.push(key.clone());
                legacy_impressions.push(bytes);
            }
        }
    }
    // In key order, so the same store is rewritten by the same records.
    legacy_keys.sort_unstable();
    let models = armlog::assemble(partition, model_values.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        .with_context(|| format!("model snapshots of partition {partition}"))?;
    // Sequence order (keys are zero-padded), as restore applies them.
    segments.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let segments: Vec<Vec<u8>> = segments.into_iter().map(|(_, v)| v).collect();
    let (mut state, changes) =
        checkpoint::restore(&config.core, &cp, &segments, &legacy_impressions, &held, &models)
            .with_context(|| format!("restoring partition {partition} from version {version}"))?;
    state.declare_inputs(inputs);
    if !legacy_keys.is_empty() {
        tracing::info!(
            partition,
            keys = legacy_keys.len(),
            "rewriting snapshot-topic records of an older format"
        );
        state.join.changes.keys_deleted.extend(legacy_keys);
        state.join.changes.dirty = true;
    }
    if !moved.is_empty() {
        // In key order, so the same store is moved by the same records.
        moved.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        tracing::info!(
            partition,
            keys = moved.len(),
            bytes = moved.iter().map(|(_, v)| v.len()).sum::<usize>(),
            "moving the attribution changelog from the snapshot topic to the changelog topic"
        );
        state.join.changes.moved = moved;
        state.join.changes.dirty = true;
    }
    for (model, change) in &changes {
        crate::telemetry::processor::ModelRestored { partition, model, change }.emit();
    }
    Ok(state)
}

/// Every model snapshot on the topic: (model, partition) → snapshot. For tests, tools and
/// serving nodes that merge shards.
pub fn read_models(
    client: rdkafka::config::ClientConfig,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<(String, i32), DecodedSnapshot>> {
    let parts: Vec<i32> = SnapshotReader::new(client.clone(), topic, "tools", Keys::Models)?
        .partitions(Duration::from_secs(10))?
        .into_iter()
        .collect();
    let stores = super::reader::read_to_end(client, topic, &parts, Keys::Models, timeout)?;
    let mut out = BTreeMap::new();
    for (p, store) in &stores {
        let mut values = Vec::new();
        for key in store.values.keys().filter(|k| !k.contains('#')) {
            if let Some((_, bytes)) = store.get(key)? {
                values.push((key.clone(), bytes));
            }
        }
        let shards = armlog::assemble(*p, values.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .with_context(|| format!("model snapshots of partition {p}"))?;
        for s in shards {
            out.insert((s.meta.model_id.clone(), *p), s);
        }
    }
    Ok(out)
}

/// Chunk counts of every stored key, so a writer can delete surplus chunks.
pub fn chunk_counts(store: &LatestByKey) -> HashMap<String, u32> {
    store
        .values
        .keys()
        .filter(|k| !k.contains('#'))
        .map(|k| (k.clone(), store.chunk_count(k)))
        .filter(|(_, n)| *n > 0)
        .collect()
}
