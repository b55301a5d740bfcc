//! Values on the snapshot topic, and how a value larger than the broker's maximum message size
//! is split into chunks and put back together.
//!
//! Scheme: a value of at most `max_record_bytes` is one record `key → StoredBlob{INLINE}`.
//! A larger one becomes `chunk_count` records `key#<i> → StoredBlob{CHUNK, i}` plus the manifest
//! `key → StoredBlob{MANIFEST, chunk_count, total_len, checksum}`, all carrying the same
//! version and written in one transaction. A reader takes the newest record of `key`; for a
//! manifest it takes chunks `0..chunk_count` of exactly that version and checks length and
//! checksum. Because all records of a version commit together (read_committed), a reader sees
//! either the whole new value or the whole old one — never a mix. Chunks left over from an
//! older, longer value keep their old version and are ignored (the writer also deletes them
//! with tombstones so compaction removes them).

use std::collections::HashMap;

use prost::Message;
use xxhash_rust::xxh3::xxh3_64;

use super::pb;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlobError {
    #[error("record `{key}` is not a snapshot-topic value: {detail}")]
    Decode { key: String, detail: String },
    #[error("chunked value `{key}` version {version}: chunk {index} of {count} is missing")]
    MissingChunk { key: String, version: u64, index: u32, count: u32 },
    #[error("chunked value `{key}` version {version}: reassembled {got} bytes, manifest says {want}")]
    Length { key: String, version: u64, got: usize, want: u64 },
    #[error("value `{key}` version {version}: checksum mismatch")]
    Checksum { key: String, version: u64 },
    #[error("record `{0}` is a chunk; read its manifest key instead")]
    NotAValue(String),
}

/// One record to write: `value == None` is a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobRecord {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

pub fn chunk_key(key: &str, index: u32) -> String {
    format!("{key}#{index}")
}

/// Records that store `value` under `key` at `version`. `previous_chunks` is how many chunks
/// the previous value of this key had (0 if inline or none); surplus ones get tombstones.
pub fn split(
    key: &str,
    version: u64,
    value: &[u8],
    max_record_bytes: usize,
    previous_chunks: u32,
) -> Vec<BlobRecord> {
    // Room for the envelope's own fields.
    let room = max_record_bytes.saturating_sub(64).max(1);
    let checksum = xxh3_64(value);
    let mut out = Vec::new();
    let count = if value.len() <= room {
        out.push(BlobRecord {
            key: key.to_string(),
            value: Some(
                pb::StoredBlob {
                    kind: pb::BlobKind::Inline as i32,
                    version,
                    data: value.to_vec(),
                    total_len: value.len() as u64,
                    checksum,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        });
        0
    } else {
        let chunks: Vec<&[u8]> = value.chunks(room).collect();
        let count = chunks.len() as u32;
        for (i, c) in chunks.into_iter().enumerate() {
            out.push(BlobRecord {
                key: chunk_key(key, i as u32),
                value: Some(
                    pb::StoredBlob {
                        kind: pb::BlobKind::Chunk as i32,
                        version,
                        data: c.to_vec(),
                        chunk_index: i as u32,
                        chunk_count: count,
                        total_len: value.len() as u64,
                        checksum,
                    }
                    .encode_to_vec(),
                ),
            });
        }
        // The manifest goes last: a reader that finds it knows its chunks precede it.
        out.push(BlobRecord {
            key: key.to_string(),
            value: Some(
                pb::StoredBlob {
                    kind: pb::BlobKind::Manifest as i32,
                    version,
                    chunk_count: count,
                    total_len: value.len() as u64,
                    checksum,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        });
        count
    };
    for i in count..previous_chunks {
        out.push(BlobRecord { key: chunk_key(key, i), value: None });
    }
    out
}

/// The newest record per key, as read from a snapshot-topic partition in offset order.
#[derive(Debug, Default)]
pub struct LatestByKey {
    pub values: HashMap<String, Vec<u8>>,
}

impl LatestByKey {
    /// Takes a record in offset order; a tombstone removes the key.
    pub fn put(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => {
                self.values.insert(key, v);
            }
            None => {
                self.values.remove(&key);
            }
        }
    }

    /// The whole value of `key` with its version, reassembled if chunked; `Ok(None)` if absent.
    pub fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, BlobError> {
        let Some(raw) = self.values.get(key) else { return Ok(None) };
        let blob = decode(key, raw)?;
        match pb::BlobKind::try_from(blob.kind) {
            Ok(pb::BlobKind::Inline) => {
                if xxh3_64(&blob.data) != blob.checksum {
                    return Err(BlobError::Checksum { key: key.into(), version: blob.version });
                }
                Ok(Some((blob.version, blob.data)))
            }
            Ok(pb::BlobKind::Manifest) => {
                // The manifest is outside data: reserve at most 16 MiB up front, whatever it claims.
                let mut data = Vec::with_capacity(usize::try_from(blob.total_len).unwrap_or(0).min(1 << 24));
                for i in 0..blob.chunk_count {
                    let ck = chunk_key(key, i);
                    let missing = || BlobError::MissingChunk {
                        key: key.into(),
                        version: blob.version,
                        index: i,
                        count: blob.chunk_count,
                    };
                    let c = decode(&ck, self.values.get(&ck).ok_or_else(missing)?)?;
                    if c.version != blob.version || c.chunk_index != i {
                        return Err(missing());
                    }
                    data.extend_from_slice(&c.data);
                }
                if data.len() as u64 != blob.total_len {
                    return Err(BlobError::Length {
                        key: key.into(),
                        version: blob.version,
                        got: data.len(),
                        want: blob.total_len,
                    });
                }
                if xxh3_64(&data) != blob.checksum {
                    return Err(BlobError::Checksum { key: key.into(), version: blob.version });
                }
                Ok(Some((blob.version, data)))
            }
            Ok(pb::BlobKind::Chunk) => Err(BlobError::NotAValue(key.into())),
            _ => Err(BlobError::Decode { key: key.into(), detail: format!("unknown kind {}", blob.kind) }),
        }
    }

    /// How many chunks the current value of `key` has (0 if inline or absent).
    pub fn chunk_count(&self, key: &str) -> u32 {
        self.values
            .get(key)
            .and_then(|raw| decode(key, raw).ok())
            .filter(|b| b.kind == pb::BlobKind::Manifest as i32)
            .map_or(0, |b| b.chunk_count)
    }
}

fn decode(key: &str, raw: &[u8]) -> Result<pb::StoredBlob, BlobError> {
    pb::StoredBlob::decode(raw).map_err(|e| BlobError::Decode { key: key.into(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(store: &mut LatestByKey, recs: Vec<BlobRecord>) {
        for r in recs {
            store.put(r.key, r.value);
        }
    }

    #[test]
    fn small_values_are_inline_and_large_ones_chunked() {
        let mut s = LatestByKey::default();
        apply(&mut s, split("k", 1, b"hello", 1000, 0));
        assert_eq!(s.get("k"), Ok(Some((1, b"hello".to_vec()))));
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let recs = split("k", 2, &big, 1000, 0);
        assert!(recs.len() > 10);
        assert!(recs.iter().all(|r| r.value.as_ref().is_some_and(|v| v.len() <= 1000)));
        apply(&mut s, recs);
        assert_eq!(s.get("k"), Ok(Some((2, big.clone()))));
        assert_eq!(s.chunk_count("k"), 11);
        // Shrinking to inline deletes the surplus chunks.
        let recs = split("k", 3, b"small", 1000, s.chunk_count("k"));
        assert_eq!(recs.iter().filter(|r| r.value.is_none()).count(), 11);
        apply(&mut s, recs);
        assert_eq!(s.get("k"), Ok(Some((3, b"small".to_vec()))));
        assert_eq!(s.values.len(), 1);
    }

    #[test]
    fn a_missing_or_stale_chunk_is_an_error_not_a_mix() {
        let big = vec![1u8; 5000];
        let mut s = LatestByKey::default();
        apply(&mut s, split("k", 1, &big, 1000, 0));
        let newer = split("k", 2, &vec![2u8; 5000], 1000, 0);
        // Only the new manifest arrives (an impossible partial write): refused.
        apply(&mut s, newer.into_iter().filter(|r| r.key == "k").collect());
        assert!(matches!(s.get("k"), Err(BlobError::MissingChunk { version: 2, .. })));
    }
}
