//! Snapshot codec: canonical bytes, typed errors on corrupt or truncated input, merge rules.

use banditflow::core::event::{Event, FeedbackKind, Variant};
use banditflow::core::snapshot::{self, SnapshotError, SnapshotMeta};

use crate::support::*;

fn sample() -> (banditflow::core::params::CoreSpec, Vec<Vec<u8>>) {
    let spec = unbounded_spec();
    let mut f = Feeder::new(&spec, 3);
    for (k, m) in ["pbm", "lin", "est"].iter().enumerate() {
        let id = format!("i{k}");
        f.feed(
            &spec,
            &Event::Impression(impression(&id, m, T0 + k as i64, Variant::Holdout, "kids", &["a", "b", "c"])),
        );
        f.feed(&spec, &Event::Feedback(feedback(&id, "c", 3, FeedbackKind::AddToCart, T0 + 100)));
    }
    let bytes = spec
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let meta = SnapshotMeta {
                model_id: m.id.clone(),
                source_partition: 3,
                version: 6,
                watermark_ms: T0 + 100,
                input_offsets: vec![("events".into(), 3, 6)],
            };
            snapshot::encode(m, &f.state.models[i], &meta)
        })
        .collect();
    (spec, bytes)
}

#[test]
fn round_trip_is_byte_identical() {
    let (_, all) = sample();
    for bytes in all {
        let d = snapshot::decode(&bytes).expect("decodes");
        assert_eq!(snapshot::encode(&d.spec, &d.shard, &d.meta), bytes);
        assert_eq!(d.meta.input_offsets, vec![("events".to_string(), 3, 6)]);
    }
}

#[test]
fn every_truncation_is_a_typed_error() {
    let (_, all) = sample();
    for bytes in all {
        for len in 0..bytes.len() {
            assert!(
                snapshot::decode(&bytes[..len]).is_err(),
                "truncated to {len} of {} bytes decoded",
                bytes.len()
            );
        }
    }
}

#[test]
fn every_single_bit_flip_is_detected() {
    let (_, all) = sample();
    let bytes = &all[1];
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(snapshot::decode(&b).is_err(), "flip of bit {bit} in byte {i} went unnoticed");
        }
    }
}

#[test]
fn merge_refuses_different_models_and_parameters() {
    let (spec, all) = sample();
    let a = snapshot::decode(&all[0]).expect("decodes");
    let b = snapshot::decode(&all[2]).expect("decodes");
    assert!(matches!(snapshot::merge(&[a.clone(), b]), Err(SnapshotError::ModelMismatch { .. })));
    let mut other = a.clone();
    other.spec.prior.alpha = 2.0;
    assert!(matches!(snapshot::merge(&[a, other]), Err(SnapshotError::ParamsMismatch(_))));
    assert!(matches!(snapshot::merge(&[]), Err(SnapshotError::Empty)));
    let _ = spec;
}

#[test]
fn a_newer_format_is_refused_by_version() {
    use prost::Message;
    let (_, all) = sample();
    let mut m = banditflow::core::pb::ModelSnapshot::decode(all[0].as_slice()).expect("decodes");
    m.format_version = 3;
    assert_eq!(snapshot::decode(&m.encode_to_vec()).err(), Some(SnapshotError::Version { found: 3 }));
}

#[test]
fn a_partition_restores_exactly_from_its_checkpoint_and_model_snapshots() {
    use banditflow::core::checkpoint;
    use banditflow::core::params::JoinSpec;
    // Bounded windows so held, late, orphaned and buffered entries all exist when saved.
    let spec = spec_with_join(JoinSpec {
        watermark_delay_ms: 1000,
        grace_ms: 5 * MIN,
        late_retention_ms: DAY,
        learn_late: true,
        max_impressions: 1000,
        max_pending_feedback: 1000,
        funnel: banditflow::core::params::DEFAULT_FUNNEL,
    });
    let shop = banditflow::generate::generate(&banditflow::generate::ShopSpec {
        impressions: 400,
        partitions: 1,
        model_ids: vec!["pbm".into(), "lin".into(), "est".into()],
        ..Default::default()
    });
    let (first, rest) = shop.records.split_at(shop.records.len() / 2);
    let role = |t: &str| {
        if t == "impressions" {
            banditflow::core::event::TopicRole::Impressions
        } else {
            banditflow::core::event::TopicRole::Feedback
        }
    };
    let enc = |t: &str| {
        if t == "impressions" {
            banditflow::core::event::Encoding::Protobuf
        } else {
            banditflow::core::event::Encoding::Json
        }
    };
    let apply = |state: &mut banditflow::core::partition::PartitionState,
                 recs: &[banditflow::recording::Record]| {
        for r in recs {
            state.apply(
                &spec,
                banditflow::core::partition::InputRecord {
                    topic: &r.topic,
                    partition: 0,
                    offset: r.offset,
                    role: role(&r.topic),
                    encoding: enc(&r.topic),
                    payload: &r.payload,
                    timestamp_ms: r.timestamp_ms,
                },
            );
        }
    };
    let mut straight = banditflow::core::partition::PartitionState::new(&spec, 0);
    apply(&mut straight, first);
    assert!(straight.join.pending_feedback() > 0 || straight.join.counters.feedback_held > 0);
    let saved = checkpoint::save_all(&spec, &straight);
    let models = saved.shards(0).expect("assembles");
    let pick = |prefix: &str| -> Vec<Vec<u8>> {
        saved.puts.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect()
    };
    let (segs, held) = (pick("buf/"), pick("held/"));
    assert!(straight.join.buffered_impressions() > 0);
    let (mut restored, changes) =
        checkpoint::restore(&spec, &saved.header, &segs, &[], &held, &models).expect("restores");
    assert!(changes.iter().all(|(_, c)| c.code() == "unchanged"), "{changes:?}");
    assert!(restored.join == straight.join, "join state differs after restore");
    for (i, (a, b)) in restored.models.iter().zip(&straight.models).enumerate() {
        assert!(a == b, "model {i} differs after restore");
    }
    assert_eq!(
        (&restored.offsets, &restored.invalid, restored.records),
        (&straight.offsets, &straight.invalid, straight.records)
    );
    // Continuing from the restored state is the same as never stopping.
    apply(&mut straight, rest);
    apply(&mut restored, rest);
    assert_eq!(restored, straight);
    // A redelivered record (below the saved offsets) is ignored, not counted twice.
    let before = restored.clone();
    apply(&mut restored, &first[..10]);
    assert_eq!(restored.records, before.records);
    assert_eq!(restored.models, before.models);
    // Mismatched versions are refused.
    let other = checkpoint::save_all(&spec, &straight);
    let newer = other.shards(0).expect("assembles");
    assert!(checkpoint::restore(&spec, &saved.header, &segs, &[], &held, &newer).is_err());
}
