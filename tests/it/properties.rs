//! Property tests of the exactness contract (1,000 cases each):
//! - merging the shards of any split of a stream (split by impression id, as Kafka partitions
//!   split it) gives the one-stream state;
//! - the order in which impressions and feedback arrive does not change the final state.
//!
//! Integer statistics (counts, rewards in millionths, per-variant sums of squares) are compared
//! exactly; decayed floating-point sums within 1e-9 relative, because floating-point addition
//! is not associative: the same terms added in another order can differ in the last bits.
//! Windows and caps are generous here so that no attribution decision depends on order; how
//! bounded windows decide is specified by the table tests in `join.rs`.

use proptest::prelude::*;

use banditflow::core::event::{Event, FeedbackKind, Variant};
use banditflow::core::model::ModelShard;
use banditflow::core::snapshot::{self, DecodedSnapshot, SnapshotMeta};

use crate::support::*;

const ITEMS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const MODELS: [&str; 3] = ["pbm", "lin", "est"];

#[derive(Debug, Clone)]
struct Stream {
    events: Vec<Event>,
}

fn stream() -> impl Strategy<Value = Stream> {
    let imp = (
        0usize..3,
        0usize..3,
        0usize..2,
        proptest::sample::subsequence(ITEMS.to_vec(), 1..=4),
        0i64..(5 * DAY),
        prop::bool::weighted(0.1),
        prop::sample::select(vec![0.1, 0.25, 0.5, 1.0]),
    );
    let fb = (0usize..10, 0usize..5, 0usize..4, 0i64..(40 * DAY), 0u32..3, prop::bool::weighted(0.05));
    (
        prop::collection::vec(imp, 1..10),
        prop::collection::vec(fb, 0..25),
        prop::collection::vec(0usize..40, 0..4),
    )
        .prop_map(|(imps, fbs, dups)| {
            let mut events = Vec::new();
            let mut placed = Vec::new();
            for (i, (m, v, s, items, t, opted, prop)) in imps.into_iter().enumerate() {
                let variant = [Variant::Treatment, Variant::Holdout, Variant::Arm("b".into())][v].clone();
                let mut imp =
                    impression(&format!("i{i}"), MODELS[m], T0 + t, variant, ["women", "men"][s], &items);
                imp.opted_out = opted;
                for e in &mut imp.slate {
                    e.propensity = prop;
                }
                placed.push(imp.clone());
                events.push(Event::Impression(imp));
            }
            for (target, slot, kind, delay, value, wrong) in fbs {
                let Some(imp) = placed.get(target % (placed.len() + 1)) else {
                    // Feedback for an impression that never comes.
                    events.push(Event::Feedback(feedback("ghost", "a", 1, FeedbackKind::Click, T0 + delay)));
                    continue;
                };
                let e = &imp.slate[slot % imp.slate.len()];
                let mut f = feedback(
                    &imp.impression_id,
                    &e.item_id,
                    e.position,
                    FeedbackKind::ALL[kind],
                    imp.time_ms + delay,
                );
                f.value = f64::from(value) * 10.0;
                if wrong {
                    f.item_id = "not-shown".into();
                }
                events.push(Event::Feedback(f));
            }
            for d in dups {
                if let Some(e) = events.get(d % events.len()).cloned() {
                    events.push(e);
                }
            }
            Stream { events }
        })
}

fn run(spec: &banditflow::core::params::CoreSpec, events: &[Event], partition: i32) -> Feeder {
    let mut f = Feeder::new(spec, partition);
    for e in events {
        f.feed(spec, e);
    }
    f
}

fn latest(events: &[Event]) -> i64 {
    events.iter().map(Event::time_ms).max().unwrap_or(T0)
}

fn impression_id(e: &Event) -> &str {
    match e {
        Event::Impression(i) => &i.impression_id,
        Event::Feedback(f) => &f.impression_id,
    }
}

fn shard_of(id: &str, salt: u64, shards: u64) -> u64 {
    let h = id
        .bytes()
        .fold(salt ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    h % shards
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn merge_of_any_split_equals_one_stream(s in stream(), shards in 1u64..5, salt in any::<u64>()) {
        let spec = unbounded_spec();
        let whole = run(&spec, &s.events, 0);
        let parts: Vec<Feeder> = (0..shards)
            .map(|k| {
                let mine: Vec<Event> = s.events.iter().filter(|e| shard_of(impression_id(e), salt, shards) == k).cloned().collect();
                run(&spec, &mine, k as i32)
            })
            .collect();
        let total: u64 = parts.iter().map(|p| p.state.join.counters.feedback_final() + p.state.join.pending_feedback() as u64).sum();
        prop_assert_eq!(total, whole.state.join.counters.feedback_final() + whole.state.join.pending_feedback() as u64);
        for (i, mspec) in spec.models.iter().enumerate() {
            // Through the snapshot codec, as serving nodes merge.
            let decoded: Vec<DecodedSnapshot> = parts
                .iter()
                .map(|p| {
                    let meta = SnapshotMeta { model_id: mspec.id.clone(), source_partition: p.state.partition, version: p.state.records, watermark_ms: 0, input_offsets: vec![] };
                    snapshot::decode(&snapshot::encode(mspec, &p.state.models[i], &meta)).expect("own snapshot decodes")
                })
                .collect();
            let merged = snapshot::merge(&decoded).expect("same model");
            assert_shards_equivalent(&merged.shard, &whole.state.models[i], mspec, latest(&s.events), &format!("model {}", mspec.id));
        }
    }

    #[test]
    fn arrival_order_does_not_change_the_state(s in stream(), keys in prop::collection::vec(any::<u32>(), 64)) {
        let spec = unbounded_spec();
        let a = run(&spec, &s.events, 0);
        let mut shuffled: Vec<(u32, usize, Event)> = s.events.iter().cloned().enumerate().map(|(i, e)| (keys[i % keys.len()] ^ (i as u32).wrapping_mul(2_654_435_761), i, e)).collect();
        shuffled.sort_by_key(|(k, i, _)| (*k, *i));
        let events: Vec<Event> = shuffled.into_iter().map(|(_, _, e)| e).collect();
        let b = run(&spec, &events, 0);
        let (ca, cb) = (&a.state.join.counters, &b.state.join.counters);
        prop_assert_eq!(ca.impressions_learned, cb.impressions_learned);
        prop_assert_eq!(ca.feedback_attributed + ca.feedback_late_learned, cb.feedback_attributed + cb.feedback_late_learned);
        prop_assert_eq!(ca.feedback_duplicate, cb.feedback_duplicate);
        for (i, m) in spec.models.iter().enumerate() {
            assert_shards_equivalent(&a.state.models[i], &b.state.models[i], m, latest(&s.events), &m.id);
        }
    }
}

#[test]
fn one_shard_merges_to_identical_bytes() {
    // Merging a single shard adds to zero, which is exact: the bytes match the shard's.
    let spec = unbounded_spec();
    let events = vec![
        Event::Impression(impression("x", "pbm", T0, Variant::Treatment, "women", &["a", "b"])),
        Event::Feedback(feedback("x", "b", 2, FeedbackKind::Click, T0 + MIN)),
    ];
    let f = run(&spec, &events, 0);
    let meta = SnapshotMeta {
        model_id: "pbm".into(),
        source_partition: 0,
        version: 2,
        watermark_ms: 0,
        input_offsets: vec![],
    };
    let d = snapshot::decode(&snapshot::encode(&spec.models[0], &f.state.models[0], &meta)).expect("decodes");
    let m = snapshot::merge(std::slice::from_ref(&d)).expect("merges");
    let empty = ModelShard::new(&spec.models[0]);
    assert_ne!(m.shard, empty);
    assert_eq!(m.shard, f.state.models[0]);
}
