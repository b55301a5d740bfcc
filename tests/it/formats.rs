//! Checkpoint format versions. The policy (ARCHITECTURE.md, "Format versions"): a build
//! reads the checkpoint format before its own and its own, so a rolling upgrade or a rollback
//! by one version restores every partition. The previous format's bytes are checked in
//! (`tests/fixtures/checkpoint-v3.jsonl`, written by `c598598`'s own test with
//! `BANDITFLOW_WRITE_FORMAT_GOLDEN=1`): restoring them must give exactly the state this build
//! computes from the same events. Format 2's (`checkpoint-v2.jsonl`, written the same way by
//! the build that wrote format 2) is still upgraded, with one exception by design: that
//! fixture's linear model was written in the one-shared-model layout of older builds, which per-arm
//! statistics cannot be recovered from, and its estimated-examination model kept exposures per
//! position without clicks, so both restore as a reset of that model (empty, its buffered
//! impressions dropped), exactly like a configuration change that resets it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use banditflow::config::Config;
use banditflow::core::blob::{self, LatestByKey};
use banditflow::core::checkpoint;
use banditflow::core::event;
use banditflow::core::partition::PartitionState;
use banditflow::core::pb;
use banditflow::core::snapshot::SnapshotError;
use base64::Engine as _;
use prost::Message as _;

use crate::support::apply_event;

/// Format 2, still upgraded.
const GOLDEN_V2: &str = "tests/fixtures/checkpoint-v2.jsonl";
/// Format 3, the previous format, written by `c598598` (the attribution changelog on the
/// snapshot topic): what a rolling upgrade finds.
const GOLDEN_V3: &str = "tests/fixtures/checkpoint-v3.jsonl";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_config() -> Config {
    Config::load(Some(&root().join("tests/fixtures/shop.toml")), Vec::new()).expect("fixture config")
}

/// Partition 0's events of the fixture, decoded, in file order but reversed in blocks of 16
/// (so some feedback comes before its impression and is held for a while), and last a click
/// whose impression never comes (held when the state is saved).
fn fixture_events(config: &Config) -> Vec<(event::Event, Option<i64>)> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/shop.jsonl")).expect("fixture");
    let mut events = text
        .lines()
        .enumerate()
        .map(|(i, l)| banditflow::recording::parse_line(i + 1, l).expect("fixture line"))
        .filter(|r| r.partition == 0)
        .filter_map(|r| {
            let t = config.topic(&r.topic)?;
            let e = event::decode(t.role, t.encoding, &r.payload).ok()?;
            Some((e, r.timestamp_ms))
        })
        .collect::<Vec<_>>()
        .chunks(16)
        .flat_map(|c| c.iter().rev().cloned())
        .collect::<Vec<_>>();
    let (last, ts) = events.iter().map(|(e, ts)| (e.time_ms(), *ts)).max().expect("events");
    let click = crate::support::feedback("never-arrived", "item-1", 1, event::FeedbackKind::Click, last);
    events.push((event::Event::Feedback(click), ts));
    events
}

/// The fixture's partition 0 through one combined input, saved every `every` events as the
/// processor saves each interval; returns the state and the snapshot topic's newest value per
/// key (deleted keys gone), as restore reads it.
fn state_and_store(config: &Config, every: usize) -> (PartitionState, BTreeMap<String, Vec<u8>>) {
    let spec = &config.core;
    let mut state = PartitionState::new(spec, 0);
    let mut topic: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let events = fixture_events(config);
    for (i, (e, ts)) in events.iter().enumerate() {
        apply_event(&mut state, spec, e, i as i64, *ts);
        if (i + 1) % every == 0 || i + 1 == events.len() {
            let saved = checkpoint::save_changes(spec, &mut state);
            for k in &saved.deletes {
                topic.remove(k);
            }
            for (k, v) in saved.puts {
                topic.insert(k, v);
            }
            for (m, v) in saved.models {
                topic.insert(checkpoint::model_key(&m, 0), v);
            }
            topic.insert(checkpoint::header_key(0), saved.header);
        }
    }
    (state, topic)
}

fn as_store(values: &BTreeMap<String, Vec<u8>>, version: u64) -> LatestByKey {
    let mut store = LatestByKey::default();
    for (key, value) in values {
        for r in blob::split(key, version, value, 1 << 20, 0) {
            store.put(r.key, r.value);
        }
    }
    store
}

/// `values` as this build stores them: (snapshot topic, changelog topic).
fn split_topics(
    values: &BTreeMap<String, Vec<u8>>,
) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
    values.clone().into_iter().partition(|(k, _)| !checkpoint::is_changelog_key(k))
}

fn read_golden(path: &str) -> BTreeMap<String, Vec<u8>> {
    let text = std::fs::read_to_string(root().join(path)).expect("golden file");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("golden line");
            let key = v["key"].as_str().expect("key").to_string();
            let value = B64.decode(v["value"].as_str().expect("value")).expect("base64");
            (key, value)
        })
        .collect()
}

/// Restores the checked-in store of an older build (format `format`, with segments and held
/// feedback), which kept everything on the snapshot topic: the changelog topic is empty.
fn restore_golden(config: &Config, path: &str, format: u32) -> PartitionState {
    let golden = read_golden(path);
    let header =
        pb::PartitionCheckpoint::decode(golden[&checkpoint::header_key(0)].as_slice()).expect("header");
    assert_eq!(header.format_version, format, "{path} holds format {format}");
    assert!(golden.keys().filter(|k| k.starts_with("buf/0/")).count() > 1, "several segments");
    assert!(golden.keys().any(|k| k.starts_with("held/0/")), "held feedback");
    banditflow::kafka::store::restore_partition(
        config,
        0,
        &as_store(&golden, header.records),
        &LatestByKey::default(),
    )
    .unwrap_or_else(|e| panic!("format {format} restores: {e:#}"))
}

#[test]
fn the_next_checkpoint_format_is_refused_by_name() {
    // As a build before this one refuses format 4: by its version, isolated to the partition
    // (reason format_version), never read as something it is not.
    let config = fixture_config();
    let (_, values) = state_and_store(&config, 400);
    let mut header =
        pb::PartitionCheckpoint::decode(values[&checkpoint::header_key(0)].as_slice()).expect("header");
    assert_eq!(header.format_version, checkpoint::FORMAT_VERSION);
    header.format_version = checkpoint::FORMAT_VERSION + 1;
    let err = checkpoint::restore(&config.core, &header.encode_to_vec(), &[], &[], &[], &[]).err();
    assert_eq!(err, Some(SnapshotError::CheckpointVersion { found: checkpoint::FORMAT_VERSION + 1 }));
}

#[test]
fn the_previous_checkpoint_format_restores_to_what_this_build_computes() {
    let config = fixture_config();
    let (state, values) = state_and_store(&config, 400);
    if std::env::var_os("BANDITFLOW_WRITE_FORMAT_GOLDEN").is_some() {
        // This build's format, both topics' keys in one file (a key names its topic), for the
        // build after it to check in as its previous format.
        let lines: Vec<String> = values
            .iter()
            .map(|(k, v)| serde_json::json!({ "key": k, "value": B64.encode(v) }).to_string())
            .collect();
        let path = format!("tests/fixtures/checkpoint-v{}.jsonl", checkpoint::FORMAT_VERSION);
        std::fs::write(root().join(path), lines.join("\n") + "\n").expect("write golden");
    }
    let restored = restore_golden(&config, GOLDEN_V3, checkpoint::PREVIOUS_FORMAT_VERSION);
    // Exactly what this build computes from the same events.
    assert_eq!(restored.records, state.records);
    assert_eq!(restored.offsets, state.offsets);
    assert!(restored.join == state.join, "join restored exactly");
    assert!(restored.models == state.models, "models restored exactly");
}

#[test]
fn format_2_is_upgraded_to_what_this_build_computes() {
    let config = fixture_config();
    let (state, values) = state_and_store(&config, 400);
    let restored = restore_golden(&config, GOLDEN_V2, 2);
    assert_eq!(restored.records, state.records);
    assert_eq!(restored.offsets, state.offsets);
    // What this build computes, with the linear model reset by a configuration change on
    // restore: this build's own checkpoint restored under a different linear dimension.
    let dir = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(root().join("tests/fixtures/shop.toml")).expect("fixture config");
    std::fs::write(
        dir.path().join("c.toml"),
        text.replace("examination = \"estimated\"", "examination = [1.0, 0.5]"),
    )
    .expect("write");
    let changed = Config::load(
        Some(&dir.path().join("c.toml")),
        vec![("BANDITFLOW__MODELS__1__LINEAR__DIM".to_string(), "4".to_string())],
    )
    .expect("changed config");
    let (snapshots, changelog) = split_topics(&values);
    let expected = banditflow::kafka::store::restore_partition(
        &changed,
        0,
        &as_store(&snapshots, state.records),
        &as_store(&changelog, state.records),
    )
    .expect("this build's checkpoint restores");
    // Both resets: the linear model's (its one shared model dropped), and the
    // estimated-examination model's, whose arms kept
    // exposures per position without the clicks this build fits the curve to.
    assert_eq!(restored.models[1], banditflow::core::model::ModelShard::new(&config.core.models[1]));
    assert_eq!(restored.models[2], banditflow::core::model::ModelShard::new(&config.core.models[2]));
    assert!(restored.join == expected.join, "join restored exactly");
    assert!(restored.models == expected.models, "models restored exactly");
    assert!(restored.models[0] == state.models[0]);
}

/// Partition 0 restored from the two topics' newest values (`checkpoint/0` among the first).
fn restore_topics(
    config: &Config,
    snapshots: &BTreeMap<String, Vec<u8>>,
    changelog: &BTreeMap<String, Vec<u8>>,
) -> PartitionState {
    let records = pb::PartitionCheckpoint::decode(snapshots[&checkpoint::header_key(0)].as_slice())
        .expect("header")
        .records;
    banditflow::kafka::store::restore_partition(
        config,
        0,
        &as_store(snapshots, records),
        &as_store(changelog, records),
    )
    .expect("restores")
}

/// Applies a save to the two topics as the transaction writer does (`kafka::txn`): puts, then
/// deletes, each to the topic its key belongs on; moved keys are deleted from the snapshot
/// topic; then the heads and the header.
fn apply_to_topics(
    saved: checkpoint::SavedPartition,
    snapshots: &mut BTreeMap<String, Vec<u8>>,
    changelog: &mut BTreeMap<String, Vec<u8>>,
) {
    for (k, v) in saved.puts {
        if checkpoint::is_changelog_key(&k) {
            changelog.insert(k, v)
        } else {
            snapshots.insert(k, v)
        };
    }
    for k in &saved.deletes {
        if checkpoint::is_changelog_key(k) {
            changelog.remove(k)
        } else {
            snapshots.remove(k)
        };
    }
    for k in &saved.moved {
        snapshots.remove(k);
    }
    for (m, v) in saved.models {
        snapshots.insert(checkpoint::model_key(&m, 0), v);
    }
    snapshots.insert(checkpoint::header_key(0), saved.header);
}

#[test]
fn the_attribution_changelog_moves_off_the_snapshot_topic_in_one_save() {
    // The previous build's store: buffer segments and held feedback on the snapshot topic.
    let config = fixture_config();
    let golden = read_golden(GOLDEN_V3);
    let on_snapshots: Vec<String> =
        golden.keys().filter(|k| checkpoint::is_changelog_key(k)).cloned().collect();
    assert!(on_snapshots.len() > 2, "the fixture has segments and held feedback");
    let restore = |snapshots: &BTreeMap<String, Vec<u8>>, changelog: &BTreeMap<String, Vec<u8>>| {
        restore_topics(&config, snapshots, changelog)
    };
    let mut state = restore(&golden, &BTreeMap::new());
    let saved = checkpoint::save_changes(&config.core, &mut state);
    // The first save moves every changelog value, unchanged, ahead of anything else it writes
    // (or deletes it, if it reclaims it).
    assert_eq!(saved.moved, on_snapshots, "every changelog key on the snapshot topic is moved");
    let kept: Vec<&String> = on_snapshots.iter().filter(|k| !saved.deletes.contains(k)).collect();
    assert!(!kept.is_empty());
    for (i, key) in kept.into_iter().enumerate() {
        assert_eq!(&saved.puts[i], &(key.clone(), golden[key].clone()), "{key} is written as it was");
    }
    let (mut snapshots, mut changelog) = (golden.clone(), BTreeMap::new());
    apply_to_topics(saved, &mut snapshots, &mut changelog);
    assert!(
        !snapshots.keys().any(|k| checkpoint::is_changelog_key(k)),
        "the snapshot topic keeps no changelog key"
    );
    assert!(changelog.keys().all(|k| checkpoint::is_changelog_key(k)) && !changelog.is_empty());
    // Restoring the new layout gives the same partition, and moves nothing again.
    let mut again = restore(&snapshots, &changelog);
    assert!(again.join == state.join, "join restored exactly from the changelog topic");
    assert!(again.models == state.models, "models restored exactly");
    assert!(checkpoint::save_changes(&config.core, &mut again).moved.is_empty());
    // The changelog topic is needed: without it (deleted, or `kafka.changelog_topic` naming
    // another topic) the restore fails loudly, naming what is missing.
    let records = again.records;
    let missing = banditflow::kafka::store::restore_partition(
        &config,
        0,
        &as_store(&snapshots, records),
        &LatestByKey::default(),
    );
    let err = format!("{:#}", missing.expect_err("a restore without the changelog topic fails"));
    assert!(err.contains("buffer segment") || err.contains("held"), "{err}");
}

#[test]
fn a_large_changelog_moves_over_several_saves_and_every_step_restores_exactly() {
    // One value per save (a budget of one byte): every intermediate layout, part on each
    // topic, must restore to the same partition, and a restore in between picks the move up.
    let config = fixture_config();
    let golden = read_golden(GOLDEN_V3);
    let restore = |snapshots: &BTreeMap<String, Vec<u8>>, changelog: &BTreeMap<String, Vec<u8>>| {
        restore_topics(&config, snapshots, changelog)
    };
    let on_snapshots = golden.keys().filter(|k| checkpoint::is_changelog_key(k)).count();
    let (mut snapshots, mut changelog) = (golden.clone(), BTreeMap::new());
    let first = restore(&snapshots, &changelog);
    let mut state = restore(&snapshots, &changelog);
    let mut saves = 0;
    while snapshots.keys().any(|k| checkpoint::is_changelog_key(k)) {
        assert!(saves < on_snapshots, "each save moves at least one value");
        let saved = checkpoint::save_changes_moving(&config.core, &mut state, 1);
        assert_eq!(saved.moved.len(), 1, "one value per save");
        apply_to_topics(saved, &mut snapshots, &mut changelog);
        saves += 1;
        let again = restore(&snapshots, &changelog);
        assert!(again.join == first.join && again.models == first.models, "after {saves} saves");
        if saves == 2 {
            // A restart in the middle: the new owner moves what is left.
            state = again;
        }
    }
    assert_eq!(saves, on_snapshots);
    assert_eq!(changelog.len(), on_snapshots, "every value is on the changelog topic");
    assert!(state.join.changes.moved.is_empty());
}
