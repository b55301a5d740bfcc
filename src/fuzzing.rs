//! Entry points for coverage-guided fuzzing (`fuzz/`, run by `scripts/fuzz.sh`) and for the
//! test suite, which replays the fuzzers' corpora through the same functions
//! (`tests/it/fuzz_corpus.rs`). Each takes arbitrary bytes and must never panic; where a
//! decoder accepts the input, the function also checks a property that must hold for it
//! (re-encoding round-trips, reassembly gives back what was split), and panics if it does not,
//! so the fuzzer reports it.

use std::sync::OnceLock;

use crate::config::Config;
use crate::core::blob::{self, LatestByKey};
use crate::core::checkpoint;
use crate::core::event::{self, Encoding, TopicRole};
use crate::core::partition::{InputRecord, PartitionState};
use crate::core::snapshot;

/// A fuzz target: arbitrary bytes in, a panic on a finding.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `scripts/fuzz.sh` and the corpus replay know them.
pub const TARGETS: [(&str, Target); 4] =
    [("event", event), ("snapshot", snapshot), ("blob", blob), ("recording", recording)];

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let models = include_str!("../tests/fixtures/shop.toml");
        // The fixture's three models (all learning paths) on the embedded defaults.
        Config::from_layers(Some(("fuzz", models)), Vec::new())
            .unwrap_or_else(|e| panic!("fixture config: {e}"))
    })
}

/// Event decoding (protobuf and JSON, every topic role) and the whole record path of a
/// partition. Byte 0 picks the role (bits 0–1: impressions, feedback, combined), the encoding
/// (bit 2: JSON) and whether bytes 1..9 are a record timestamp (bit 3); the rest is the
/// payload. A protobuf event that decodes must re-encode to an event that decodes equal.
pub fn event(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let role =
        [TopicRole::Impressions, TopicRole::Feedback, TopicRole::Combined][usize::from(selector & 3) % 3];
    let encoding = if selector & 4 == 0 { Encoding::Protobuf } else { Encoding::Json };
    let (timestamp_ms, payload) = match rest.split_first_chunk::<8>() {
        Some((ts, payload)) if selector & 8 != 0 => (Some(i64::from_le_bytes(*ts)), payload),
        _ => (None, rest),
    };
    // The processor's in-place reader answers as prost does, or leaves the record to it.
    if let Some(fast) = event::decode_in_place(role, encoding, payload) {
        assert_eq!(
            fast.map(|v| v.to_event()),
            event::decode(role, encoding, payload),
            "in-place decode differs"
        );
    }
    if let Ok(e) = event::decode(role, encoding, payload) {
        if encoding == Encoding::Protobuf {
            let again = event::decode(role, encoding, &event::encode(role, encoding, &e));
            assert_eq!(again.as_ref(), Ok(&e), "protobuf event does not round-trip");
        }
    }
    let spec = &config().core;
    let mut state = PartitionState::new(spec, 0);
    for offset in 0..2 {
        state.apply(
            spec,
            InputRecord { topic: "events", partition: 0, offset, role, encoding, payload, timestamp_ms },
        );
    }
    let saved = checkpoint::save_all(spec, &state);
    for (_, bytes) in &saved.models {
        assert!(snapshot::decode(bytes).is_ok(), "a snapshot the core wrote does not decode");
    }
}

/// Snapshot and checkpoint decoding. A snapshot that decodes must re-encode to bytes that
/// decode to the same snapshot.
pub fn snapshot(data: &[u8]) {
    if let Ok(s) = snapshot::decode(data) {
        // A shard's head and a whole model each re-encode as what they are.
        let bytes = match s.arm_log {
            Some(log) => snapshot::encode_head(&s.spec, &s.shard, &s.meta, log),
            None => snapshot::encode(&s.spec, &s.shard, &s.meta),
        };
        let again = snapshot::decode(&bytes).unwrap_or_else(|e| panic!("re-encoded snapshot: {e}"));
        assert!(again.shard == s.shard && again.meta == s.meta, "snapshot does not round-trip");
        let _ = snapshot::merge(&[s, again]);
    }
    let spec = &config().core;
    let _ = checkpoint::restore(spec, data, &[data.to_vec()], &[data.to_vec()], &[data.to_vec()], &[]);
    let _ = checkpoint::decode_segment(data);
    // An arm segment, then the same bytes as its head.
    let mut reader = crate::core::armlog::ShardReader::default();
    if reader.segment(1, Some(data)).is_ok() {
        if let Ok(head) = snapshot::decode(data) {
            let _ = reader.head(head);
        }
    }
}

/// Snapshot-topic records and chunk reassembly. The input is a sequence of records
/// `[key length][key][flag][value length: 2 bytes][value]` (flag 0: tombstone) put in order,
/// then every key is read; the last record's value is also split at a small chunk size, put,
/// and must read back exactly.
pub fn blob(data: &[u8]) {
    let mut store = LatestByKey::default();
    let mut rest = data;
    let mut last: Option<(String, Vec<u8>)> = None;
    while let Some((&klen, r)) = rest.split_first() {
        let (key, r) = r.split_at(usize::from(klen).min(r.len()));
        let key = String::from_utf8_lossy(key).into_owned();
        let Some((&flag, r)) = r.split_first() else { break };
        let Some((len, r)) = r.split_first_chunk::<2>() else { break };
        let (value, r) = r.split_at(usize::from(u16::from_le_bytes(*len)).min(r.len()));
        rest = r;
        let value = (flag != 0).then(|| value.to_vec());
        if let Some(v) = &value {
            last = Some((key.clone(), v.clone()));
        }
        store.put(key, value);
    }
    let keys: Vec<String> = store.values.keys().cloned().collect();
    for k in &keys {
        let _ = store.get(k);
        let _ = store.chunk_count(k);
    }
    if let Some((key, value)) = last {
        if key.contains('#') {
            return;
        }
        let version = u64::from(data.len() as u32);
        let mut fresh = LatestByKey::default();
        for r in blob::split(&key, version, &value, 80, 0) {
            fresh.put(r.key, r.value);
        }
        assert_eq!(fresh.get(&key), Ok(Some((version, value))), "split value does not reassemble");
    }
}

/// Recording lines. A line that parses must format to a line that parses equal.
pub fn recording(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(r) = crate::recording::parse_line(1, text) {
        let again = crate::recording::parse_line(1, &crate::recording::format_line(&r))
            .unwrap_or_else(|e| panic!("formatted line does not parse: {e}"));
        assert_eq!(again, r, "recording line does not round-trip");
    }
}
