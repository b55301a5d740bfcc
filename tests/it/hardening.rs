//! Regression tests of issue "one bad record, one odd id or one config change must never
//! corrupt state or stop the service", core side: each test is named after the defect it pins
//! and failed before its fix.

use std::collections::BTreeMap;
use std::path::PathBuf;

use banditflow::config::Config;
use banditflow::core::blob::{self, LatestByKey};
use banditflow::core::checkpoint;
use banditflow::core::event::{self, Event, FeedbackKind, Variant};
use banditflow::core::partition::{Applied, InputRecord, PartitionState};
use banditflow::core::reconfigure::ModelChange;
use banditflow::core::snapshot;
use banditflow::recording::Record;
use proptest::prelude::*;

use crate::support::{apply_event, feedback, impression, DAY, HOUR, T0};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_config() -> Config {
    Config::load(Some(&root().join("tests/fixtures/shop.toml")), Vec::new()).expect("fixture config")
}

fn fixture_partition(p: i32) -> Vec<Record> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/shop.jsonl")).expect("fixture");
    text.lines()
        .enumerate()
        .map(|(i, l)| banditflow::recording::parse_line(i + 1, l).expect("fixture line"))
        .filter(|r| r.partition == p)
        .collect()
}

/// Applies records of one partition in order, renumbering offsets per topic (so inserted
/// records get offsets like any other); returns the state and the dead letters' codes.
fn apply_all(config: &Config, records: &[Record]) -> (PartitionState, Vec<&'static str>) {
    let mut state = PartitionState::new(&config.core, 0);
    let mut next: BTreeMap<&str, i64> = BTreeMap::new();
    let mut dead = Vec::new();
    for r in records {
        let Some(t) = config.topic(&r.topic) else { continue };
        let offset = next.entry(r.topic.as_str()).or_default();
        let input = InputRecord {
            topic: &r.topic,
            partition: 0,
            offset: *offset,
            role: t.role,
            encoding: t.encoding,
            payload: &r.payload,
            timestamp_ms: r.timestamp_ms,
        };
        *offset += 1;
        if let Applied::Invalid(reason) = state.apply(&config.core, input) {
            dead.push(reason.code());
        }
    }
    (state, dead)
}

/// A record like `like`, carrying `event` (same topic, key and timestamp).
fn record_with(config: &Config, like: &Record, event: &Event) -> Record {
    let t = config.topic(&like.topic).expect("input topic");
    let payload = event::encode(t.role, t.encoding, event);
    Record { payload, ..like.clone() }
}

#[test]
fn a_future_dated_record_moves_nothing() {
    let config = fixture_config();
    let records = fixture_partition(0);
    assert!(records.len() > 1000, "fixture partition 0 is substantial");
    let (clean, clean_dead) = apply_all(&config, &records);
    let mid = records.len() / 2;
    let like_imp = records[mid..].iter().find(|r| r.topic == "impressions").expect("an impression after mid");
    let like_fb = records[mid..].iter().find(|r| r.topic == "feedback").expect("feedback after mid");
    let ts = like_imp.timestamp_ms.expect("fixture records carry timestamps");
    // Dated 2100-01-01, and a feedback event in microseconds sent as milliseconds.
    let year_2100 = 4_102_444_800_000;
    let future_imp = impression("from-2100", "home", year_2100, Variant::Treatment, "women", &["sku-0001"]);
    let mut micros_fb = feedback("from-2100", "sku-0001", 1, FeedbackKind::Click, ts * 1000);
    micros_fb.impression_id = "imp-7-1".into();
    let mut poisoned = records.clone();
    poisoned.insert(mid, record_with(&config, like_imp, &Event::Impression(future_imp)));
    poisoned.insert(mid + 1, record_with(&config, like_fb, &Event::Feedback(micros_fb)));
    let (got, dead) = apply_all(&config, &poisoned);

    assert_eq!(got.join, clean.join, "watermark, buffer, held feedback and counters unchanged");
    assert_eq!(got.models, clean.models, "no landmark or statistic moved");
    let mut want_dead = clean_dead.clone();
    want_dead.extend(["future_event_time", "future_event_time"]);
    let (mut a, mut b) = (dead.clone(), want_dead);
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "exactly the two future-dated records are dead-lettered");
    // The bound is relative to the record timestamp: the same event within the skew is fine.
    assert!(config.core.limits.max_event_time_skew_ms >= 60_000);
}

#[test]
fn an_event_within_the_skew_of_its_record_timestamp_is_accepted() {
    let spec = crate::support::unbounded_spec();
    let mut state = PartitionState::new(&spec, 0);
    let skew = spec.limits.max_event_time_skew_ms;
    for (i, (t, ts, ok)) in
        [(T0, T0, true), (T0 + skew, T0, true), (T0 + skew + 1, T0, false), (T0 + DAY, T0 + DAY, true)]
            .into_iter()
            .enumerate()
    {
        let e = Event::Impression(impression(&format!("i{i}"), "pbm", t, Variant::Treatment, "s", &["a"]));
        let applied = apply_event(&mut state, &spec, &e, i as i64, Some(ts));
        assert_eq!(
            !matches!(applied, Applied::Invalid(_)),
            ok,
            "event at {t} with record timestamp {ts}: {applied:?}"
        );
    }
}

/// Stores a save as the snapshot topic would hold it (through the chunking layer, a small
/// record size so that models are chunked) and restores it the way `banditflow run` does.
fn through_the_topic(config: &Config, state: &PartitionState) -> PartitionState {
    let saved = checkpoint::save_all(&config.core, state);
    // (snapshot topic, changelog topic)
    let mut stores = (LatestByKey::default(), LatestByKey::default());
    let version = state.records;
    let mut values = saved.puts.clone();
    values.push((checkpoint::header_key(state.partition), saved.header.clone()));
    for (m, b) in &saved.models {
        values.push((checkpoint::model_key(m, state.partition), b.clone()));
    }
    for (key, value) in &values {
        let store = if checkpoint::is_changelog_key(key) { &mut stores.1 } else { &mut stores.0 };
        for r in blob::split(key, version, value, 2048, 0) {
            store.put(r.key, r.value);
        }
    }
    banditflow::kafka::store::restore_partition(config, state.partition, &stores.0, &stores.1)
        .expect("restores")
}

fn odd_id() -> impl Strategy<Value = String> {
    // Separators and escapes of keys, multi-byte UTF-8, and ordinary text.
    proptest::collection::vec(
        prop_oneof![
            Just("/".to_string()),
            Just("#".to_string()),
            Just("%".to_string()),
            Just("%2F".to_string()),
            Just("#0".to_string()),
            Just("é".to_string()),
            Just("👟".to_string()),
            "[a-z0-9]{1,3}",
        ],
        1..6,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary ids (impression, item, segment; held feedback of unknown impressions) survive
    /// save → snapshot topic → restore exactly.
    #[test]
    fn any_ids_survive_save_and_restore(
        ids in proptest::collection::vec(
            (odd_id(), odd_id(), prop_oneof![Just(String::new()), odd_id()]),
            1..12,
        ),
        ghosts in proptest::collection::vec(odd_id(), 0..4),
    ) {
        let config = fixture_config();
        let spec = &config.core;
        let mut state = PartitionState::new(spec, 0);
        let mut offset = 0;
        let mut feed = |state: &mut PartitionState, e: Event| {
            offset += 1;
            apply_event(state, spec, &e, offset, Some(T0 + HOUR))
        };
        for (i, (imp, item, segment)) in ids.iter().enumerate() {
            let model = ["home", "search", "recs"][i % 3];
            let e = impression(imp, model, T0 + i as i64, Variant::Treatment, segment, &[item.as_str()]);
            feed(&mut state, Event::Impression(e));
            if i % 2 == 0 {
                feed(&mut state, Event::Feedback(feedback(imp, item, 1, FeedbackKind::Click, T0 + i as i64 + 5)));
            }
        }
        for g in &ghosts {
            feed(&mut state, Event::Feedback(feedback(g, g, 1, FeedbackKind::Click, T0 + 10)));
        }
        let restored = through_the_topic(&config, &state);
        prop_assert!(restored.join == state.join, "join differs after restore");
        prop_assert!(restored.models == state.models, "models differ after restore");
        prop_assert_eq!(&restored.offsets, &state.offsets);
    }

    #[test]
    fn key_parts_escape_and_unescape(id in "\\PC{0,12}", p in 0i32..1000) {
        let e = checkpoint::escape_key_part(&id);
        prop_assert!(!e.contains('/') && !e.contains('#'));
        prop_assert_eq!(checkpoint::unescape_key_part(&e), Some(id.clone()));
        if !id.is_empty() {
            prop_assert_eq!(checkpoint::parse_model_key(&checkpoint::model_key(&id, p)), Some((id.clone(), p)));
        }
        prop_assert!(checkpoint::impression_key(p, &id).matches('/').count() == 2);
        prop_assert!(!blob::chunk_key(&checkpoint::impression_key(p, &id), 0).is_empty());
    }
}

/// Every float of a shard: what a serving node would read.
fn snapshot_floats(s: &snapshot::DecodedSnapshot) -> Vec<f64> {
    let mut out = Vec::new();
    for items in s.shard.arms.values() {
        for a in items.values() {
            out.push(a.exposure);
            out.push(a.success);
            out.extend(&a.position_exposure);
            out.extend(&a.linear);
        }
    }
    for p in s.shard.positions.values() {
        out.push(p.ips_impressions);
        out.push(p.ips_clicks);
    }
    out.extend(s.shard.estimated_examination());
    out
}

fn extreme_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(5e-324),
        Just(1e-300),
        Just(1e-12),
        Just(0.5),
        Just(1.0),
        Just(1e12),
        Just(-1e12),
        Just(1e300),
        Just(-1e300),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        -1e6f64..1e6,
    ]
}

fn extreme_time() -> impl Strategy<Value = i64> {
    prop_oneof![Just(1i64), Just(T0), Just(T0 + 30 * DAY), Just(T0 * 1000), Just(i64::MAX), 1i64..T0 * 2]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Extreme propensities, values, feature values and times never make a snapshot field (or
    /// the estimated examination read from it) NaN or infinite, whatever the reward config.
    #[test]
    fn no_input_makes_a_snapshot_field_non_finite(
        events in proptest::collection::vec(
            (0usize..3, extreme_f64(), extreme_f64(), extreme_f64(), extreme_time(), 0usize..4, 1u32..4),
            1..40,
        ),
        value_weight in prop_oneof![Just(0.0), Just(1e6), Just(-1e6), Just(1.0)],
    ) {
        let mut config = fixture_config();
        for m in &mut config.core.models {
            m.rewards.kinds[FeedbackKind::Purchase.index()].value_weight = value_weight;
        }
        config.core.rewards.kinds[FeedbackKind::Purchase.index()].value_weight = value_weight;
        let spec = &config.core;
        let mut state = PartitionState::new(spec, 0);
        for (i, (model, propensity, value, feature, t, kind, pos)) in events.iter().enumerate() {
            let id = format!("i{}", i / 2);
            let e = if i % 2 == 0 {
                let mut imp = impression(&id, ["home", "search", "recs"][*model], *t, Variant::Treatment, "s", &["a", "b", "c"]);
                imp.features = vec![("f".into(), *feature)];
                for s in &mut imp.slate {
                    s.propensity = *propensity;
                }
                Event::Impression(imp)
            } else {
                let item = ["a", "b", "c"][(*pos as usize - 1) % 3];
                let mut f = feedback(&id, item, *pos, FeedbackKind::ALL[*kind], *t);
                f.value = *value;
                Event::Feedback(f)
            };
            apply_event(&mut state, spec, &e, i as i64, None);
        }
        let saved = checkpoint::save_all(spec, &state);
        for s in saved.shards(state.partition).expect("assembles") {
            for v in snapshot_floats(&s) {
                prop_assert!(v.is_finite(), "model {}: a snapshot field is {}", s.meta.model_id, v);
            }
        }
    }
}

#[test]
fn the_arm_cap_bounds_a_model_and_known_arms_keep_learning() {
    let mut spec = crate::support::unbounded_spec();
    spec.limits.max_arms_per_model = 10;
    let mut state = PartitionState::new(&spec, 0);
    let mut offset = 0;
    let mut feed = |state: &mut PartitionState, e: Event| {
        offset += 1;
        apply_event(state, &spec, &e, offset, None)
    };
    // 50 impressions of 2 items each, every item new: 100 placements, 10 arms allowed.
    for i in 0..50 {
        let (a, b) = (format!("item-{}", 2 * i), format!("item-{}", 2 * i + 1));
        feed(
            &mut state,
            Event::Impression(impression(
                &format!("imp-{i}"),
                "pbm",
                T0 + i,
                Variant::Treatment,
                "s",
                &[&a, &b],
            )),
        );
        feed(&mut state, Event::Feedback(feedback(&format!("imp-{i}"), &a, 1, FeedbackKind::Click, T0 + i)));
    }
    // Item 0 is known: it keeps learning.
    feed(
        &mut state,
        Event::Impression(impression("again", "pbm", T0 + 100, Variant::Treatment, "s", &["item-0"])),
    );
    feed(&mut state, Event::Feedback(feedback("again", "item-0", 1, FeedbackKind::Click, T0 + 101)));
    let shard = &state.models[0];
    assert_eq!(shard.arm_count(), 10);
    assert_eq!(shard.arms["s"].len(), 10);
    assert_eq!(state.join.counters.arms_rejected, 90, "100 placements, 10 arms");
    let item0 = &shard.arms["s"]["item-0"];
    assert_eq!((item0.impressions, item0.feedback[0]), (2, 2));
    // Variant statistics still count every impression and reward.
    let t = &shard.variants[&Variant::Treatment];
    assert_eq!(t.impressions, 51);
    assert_eq!(t.reward_micros, 51 * 1_000_000);
}

#[test]
fn over_long_ids_and_too_many_features_are_dead_lettered() {
    let spec = crate::support::unbounded_spec();
    let long = "x".repeat(spec.limits.max_id_bytes + 1);
    let mut many = impression("many", "pbm", T0, Variant::Treatment, "s", &["a"]);
    many.features = (0..=spec.limits.max_features).map(|i| (format!("f{i}"), 1.0)).collect();
    let cases: Vec<(Event, &str)> = vec![
        (Event::Impression(impression(&long, "pbm", T0, Variant::Treatment, "s", &["a"])), "id_too_long"),
        (Event::Impression(impression("i", "pbm", T0, Variant::Treatment, &long, &["a"])), "id_too_long"),
        (Event::Impression(impression("i", "pbm", T0, Variant::Treatment, "s", &[&long])), "id_too_long"),
        (Event::Feedback(feedback("i", &long, 1, FeedbackKind::Click, T0)), "id_too_long"),
        (Event::Impression(many), "too_many_features"),
    ];
    for (e, code) in cases {
        let mut f = crate::support::Feeder::new(&spec, 0);
        let before = f.state.clone();
        match f.feed(&spec, &e) {
            Applied::Invalid(reason) => assert_eq!(reason.code(), code),
            other => panic!("expected {code}, got {other:?}"),
        }
        assert_eq!(f.state.join, before.join, "{code}: nothing moved");
        assert_eq!(f.state.models, before.models, "{code}: nothing moved");
    }
}

#[test]
fn tiny_propensities_are_clipped_and_counted() {
    let spec = crate::support::unbounded_spec();
    let mut f = crate::support::Feeder::new(&spec, 0);
    let mut imp = impression("i", "est", T0, Variant::Treatment, "s", &["a", "b"]);
    imp.slate[0].propensity = 1e-300;
    f.feed(&spec, &Event::Impression(imp.clone()));
    assert_eq!(f.state.join.counters.propensities_clipped, 1);
    // A duplicate, and an impression of an unknown model, count nothing but their own outcome.
    f.feed(&spec, &Event::Impression(imp.clone()));
    imp.impression_id = "j".into();
    imp.model_id = "nope".into();
    assert!(matches!(f.feed(&spec, &Event::Impression(imp)), Applied::Invalid(_)));
    assert_eq!(f.state.join.counters.propensities_clipped, 1);
    // Raised to the floor, which is stored (like every propensity) at f32 precision.
    let p1 = &f.state.models[2].positions[&1];
    let want = 1.0 / spec.limits.propensity_floor;
    assert!((p1.ips_impressions - want).abs() <= want * 1e-7, "{} vs {want}", p1.ips_impressions);
}

/// Config changes, core side: what restore does for each class (the broker tests run the
/// service through the same changes).
#[test]
fn every_config_change_restores_with_a_defined_outcome() {
    let base = fixture_config();
    let records = fixture_partition(0);
    let (state, _) = apply_all(&base, &records);
    let saved = checkpoint::save_all(&base.core, &state);
    let models = saved.shards(state.partition).expect("assembles");
    let pick = |prefix: &str| -> Vec<Vec<u8>> {
        saved.puts.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect()
    };
    let (segs, held) = (pick("buf/"), pick("held/"));
    let restore_with = |edit: &dyn Fn(&mut Config)| {
        let mut c = base.clone();
        edit(&mut c);
        checkpoint::restore(&c.core, &saved.header, &segs, &[], &held, &models)
            .expect("a config change never fails a restore")
    };
    let change_of = |report: &[(String, ModelChange)], m: &str| {
        report.iter().find(|(id, _)| id == m).map(|(_, c)| c.clone()).expect("reported")
    };
    let home = base.core.models.iter().position(|m| m.id == "home").expect("home");

    // Read-time: the prior. Statistics kept bit for bit.
    let (st, report) = restore_with(&|c| c.core.models[home].prior.beta = 20.0);
    assert_eq!(change_of(&report, "home"), ModelChange::Kept { read_time: vec!["prior".into()] });
    assert_eq!(st.models, state.models);

    // Half-life: the value read at the newest event time is unchanged.
    let (st, report) = restore_with(&|c| c.core.models[home].half_life_ms = DAY);
    assert!(matches!(change_of(&report, "home"), ModelChange::HalfLifeChanged { .. }));
    let mut new_spec = base.core.models[home].clone();
    new_spec.half_life_ms = DAY;
    let now = state.join.max_event_time_ms.expect("events seen");
    let (old_shard, new_shard) = (&state.models[home], &st.models[home]);
    for (seg, items) in &old_shard.arms {
        for (item, a) in items {
            let b = &new_shard.arms[seg][item];
            let before = a.success * old_shard.read_factor(&base.core.models[home], now);
            let after = b.success * new_shard.read_factor(&new_spec, now);
            assert!(
                (before - after).abs() <= 1e-9 * (1.0 + before.abs()),
                "{seg}/{item}: {before} vs {after}"
            );
            assert_eq!(a.impressions, b.impressions);
        }
    }

    // Reset: the reward scale. The model starts empty and its buffered impressions are dropped.
    let (st, report) = restore_with(&|c| c.core.models[home].rewards.scale = 100.0);
    assert_eq!(change_of(&report, "home"), ModelChange::Reset { field: "rewards.scale".into() });
    assert_eq!(st.models[home].arm_count(), 0);
    assert!(st.join.buffer.entries().all(|e| usize::from(e.model) != home));
    assert!(!st.join.buffer.deleted.is_empty(), "delete markers for the dropped impressions");

    // Removed and added models.
    let remove_and_add = |c: &mut Config| {
        c.core.models.retain(|m| m.id != "recs");
        let mut added = c.core.models[0].clone();
        added.id = "new#model".into();
        c.core.models.push(added);
    };
    let (mut st, report) = restore_with(&remove_and_add);
    assert_eq!(change_of(&report, "recs"), ModelChange::Removed);
    assert_eq!(change_of(&report, "new#model"), ModelChange::Added);
    assert_eq!(st.join.changes.models_retired, vec!["recs".to_string()]);
    let mut c = base.clone();
    remove_and_add(&mut c);
    let next = checkpoint::save_changes(&c.core, &mut st);
    assert!(
        next.deletes.contains(&checkpoint::model_key("recs", 0)),
        "the removed model's record is deleted"
    );
    assert!(next.models.iter().any(|(m, _)| m == "new#model"));
}

/// The records a format-1 version wrote for a state: one `BufferedImpression` per impression
/// under its raw id (keys before id escaping), a format-1 header, model keys with raw ids.
fn format1_store(config: &Config, state: &PartitionState, ids: &[&str]) -> LatestByKey {
    use banditflow::core::buffer::Key;
    use banditflow::core::pb;
    use prost::Message as _;
    let saved = checkpoint::save_all(&config.core, state);
    let p = state.partition;
    let mut values: Vec<(String, Vec<u8>)> = Vec::new();
    for id in ids {
        let Some(e) = state.join.buffer.get(Key::of(id)) else { continue };
        let v = state.join.view(e);
        let b = pb::BufferedImpression {
            impression_id: id.to_string(),
            event_time_ms: v.time_ms,
            model_id: config.core.models[v.model].id.clone(),
            variant: Some(snapshot::variant_to_pb(&v.variant)),
            segment: v.segment.clone(),
            features: v.features.iter().map(|(n, x)| pb::Feature { name: n.clone(), value: *x }).collect(),
            slate: v
                .slate
                .iter()
                .map(|(item, pos, q, _)| pb::SlateItem {
                    item_id: item.clone(),
                    position: *pos,
                    propensity: f64::from(*q),
                    score: 0.0,
                })
                .collect(),
            opted_out: v.opted_out,
            total_reward_micros: v.total_reward_micros,
            seen: v
                .slate
                .iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    (0..4u32).filter(move |k| s.3 & (1 << k) != 0).map(move |k| i as u32 * 8 + k)
                })
                .collect(),
            last_feedback_position: 0,
        };
        values.push((format!("imp/{p}/{id}"), b.encode_to_vec()));
    }
    let mut header = pb::PartitionCheckpoint::decode(saved.header.as_slice()).expect("header");
    header.format_version = 1;
    header.next_buffer_segment = 0;
    // Format 1 kept held feedback inline in the header.
    header.held = state
        .join
        .pending
        .values()
        .flatten()
        .map(|(seq, f)| pb::HeldFeedback { sequence: *seq, feedback: Some(event::feedback_to_pb(f)) })
        .collect();
    header.checksum = 0;
    header.checksum = xxhash_rust::xxh3::xxh3_64(&header.encode_to_vec());
    values.push((checkpoint::header_key(p), header.encode_to_vec()));
    // Format 1's model records held whole snapshots (arms inline).
    for s in saved.shards(p).expect("assembles") {
        values.push((format!("model/{}/{p}", s.meta.model_id), snapshot::encode(&s.spec, &s.shard, &s.meta)));
    }
    let mut store = LatestByKey::default();
    for (key, value) in values {
        for r in blob::split(&key, state.records, &value, 1 << 20, 0) {
            store.put(r.key, r.value);
        }
    }
    store
}

#[test]
fn a_format_1_store_with_unescaped_keys_is_restored_and_rewritten() {
    let mut config = fixture_config();
    config.core.models[0].id = "home%1".into();
    let spec = config.core.clone();
    let mut state = PartitionState::new(&spec, 0);
    let ids = ["plain", "a/b", "50%off"];
    for (i, id) in ids.iter().enumerate() {
        let e = impression(id, "home%1", T0 + i as i64, Variant::Treatment, "s", &["x"]);
        apply_event(&mut state, &spec, &Event::Impression(e), i as i64, None);
    }
    let store = format1_store(&config, &state, &ids);
    assert!(store.values.contains_key("imp/0/a/b") && store.values.contains_key("model/home%1/0"));
    let mut restored =
        banditflow::kafka::store::restore_partition(&config, 0, &store, &LatestByKey::default())
            .expect("restores");
    assert!(restored.join == state.join && restored.models == state.models, "format 1 restores exactly");
    let next = checkpoint::save_changes(&spec, &mut restored);
    let mut deleted = next.deletes.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        ["imp/0/50%off", "imp/0/a/b", "imp/0/plain", "model/home%1/0"],
        "old records deleted"
    );
    let written: Vec<&str> = next.puts.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        written,
        ["buf/0/0000000000", "model/home%251/0/0000000001"],
        "the buffer written again as a segment, the model's arms as an arm segment"
    );
    assert!(next.models.iter().any(|(m, _)| m == "home%1"));
    // And that segment restores the same state.
    let seg = checkpoint::decode_segment(&next.puts[0].1).expect("segment");
    assert_eq!(seg.entries.len(), 3);
}

#[test]
fn format_1_held_feedback_is_written_out_and_the_next_restore_finds_it() {
    let config = fixture_config();
    let spec = config.core.clone();
    let mut state = PartitionState::new(&spec, 0);
    let e = impression("seen", "home", T0, Variant::Treatment, "s", &["x"]);
    apply_event(&mut state, &spec, &Event::Impression(e), 0, None);
    let early = feedback("not-yet", "x", 1, FeedbackKind::Click, T0 + 1);
    assert_eq!(
        apply_event(&mut state, &spec, &Event::Feedback(early), 1, None),
        Applied::Event(banditflow::core::join::Outcome::FeedbackHeld)
    );
    let store = format1_store(&config, &state, &["seen"]);
    let mut restored =
        banditflow::kafka::store::restore_partition(&config, 0, &store, &LatestByKey::default())
            .expect("restores");
    assert_eq!(restored.join.pending_feedback(), 1);
    let next = checkpoint::save_changes(&spec, &mut restored);
    assert!(
        next.puts.iter().any(|(k, _)| k.starts_with("held/0/")),
        "inline held feedback written as a record"
    );
    // The format-3 checkpoint counts it, and a restore from what was written finds it.
    let models = next.shards(0).expect("assembles");
    let pick = |prefix: &str| -> Vec<Vec<u8>> {
        next.puts.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect()
    };
    let (again, _) = checkpoint::restore(&spec, &next.header, &pick("buf/"), &[], &pick("held/"), &models)
        .expect("the next restore finds everything its checkpoint lists");
    assert_eq!(again.join.pending_feedback(), 1);
}

fn impressions_record(offset: i64, payload: &[u8]) -> InputRecord<'_> {
    InputRecord {
        topic: "impressions",
        partition: 0,
        offset,
        role: event::TopicRole::Impressions,
        encoding: event::Encoding::Protobuf,
        payload,
        timestamp_ms: None,
    }
}

#[test]
fn an_input_topic_no_longer_configured_stops_holding_the_watermark() {
    let spec = fixture_config().core;
    let mut state = PartitionState::new(&spec, 0);
    state.declare_inputs(["impressions", "feedback"]);
    let imp = impression("i1", "home", T0, Variant::Treatment, "s", &["x"]);
    let payload =
        event::encode(event::TopicRole::Impressions, event::Encoding::Protobuf, &Event::Impression(imp));
    state.apply(&spec, impressions_record(0, &payload));
    assert_eq!(state.watermark_ms(&spec), None, "the feedback input has delivered nothing yet");
    // The feedback topic is removed from the configuration (restore declares the inputs again).
    state.declare_inputs(["impressions"]);
    let imp = impression("i2", "home", T0 + HOUR, Variant::Treatment, "s", &["x"]);
    let payload =
        event::encode(event::TopicRole::Impressions, event::Encoding::Protobuf, &Event::Impression(imp));
    state.apply(&spec, impressions_record(1, &payload));
    assert_eq!(state.watermark_ms(&spec), Some(T0 + HOUR - spec.join.watermark_delay_ms));
}

#[test]
fn caps_lowered_since_the_save_apply_at_restore() {
    let base = fixture_config();
    let (state, _) = apply_all(&base, &fixture_partition(0));
    let buffered = state.join.buffered_impressions();
    assert!(buffered > 100);
    let saved = checkpoint::save_all(&base.core, &state);
    let models = saved.shards(state.partition).expect("assembles");
    let segs: Vec<Vec<u8>> =
        saved.puts.iter().filter(|(k, _)| k.starts_with("buf/")).map(|(_, v)| v.clone()).collect();
    let held: Vec<Vec<u8>> =
        saved.puts.iter().filter(|(k, _)| k.starts_with("held/")).map(|(_, v)| v.clone()).collect();
    let mut spec = base.core.clone();
    spec.join.max_impressions = 100;
    let (restored, _) =
        checkpoint::restore(&spec, &saved.header, &segs, &[], &held, &models).expect("restores");
    assert_eq!(restored.join.buffered_impressions(), 100);
    assert_eq!(
        restored.join.counters.impressions_evicted,
        state.join.counters.impressions_evicted + (buffered - 100) as u64
    );
    // The 100 retained longest are the ones kept.
    let r = banditflow::core::join::AttributionJoin::retention(&spec);
    let until = |e: &banditflow::core::buffer::Entry| (r.retained_until(e), e.key);
    let first_kept = restored.join.buffer.entries().map(until).min().expect("kept");
    let dropped = state.join.buffer.entries().filter(|e| until(e) < first_kept).count();
    assert_eq!(dropped, buffered - 100);
}
