//! Every kind of malformed record yields a typed reason; nothing panics.

use banditflow::core::event::{decode, Encoding, TopicRole};
use banditflow::core::pb;
use prost::Message;

fn pb_impression(f: impl FnOnce(&mut pb::Impression)) -> Vec<u8> {
    let mut m = pb::Impression {
        impression_id: "imp-1".into(),
        event_time_ms: 1_767_225_600_000,
        model_id: "home".into(),
        slate: vec![pb::SlateItem { item_id: "a".into(), position: 1, propensity: 0.5, score: 0.0 }],
        ..Default::default()
    };
    f(&mut m);
    m.encode_to_vec()
}

fn pb_feedback(f: impl FnOnce(&mut pb::Feedback)) -> Vec<u8> {
    let mut m = pb::Feedback {
        impression_id: "imp-1".into(),
        item_id: "a".into(),
        position: 1,
        kind: pb::FeedbackKind::Click as i32,
        value: 0.0,
        event_time_ms: 1_767_225_600_000,
    };
    f(&mut m);
    m.encode_to_vec()
}

#[test]
fn malformed_records_get_their_reason() {
    use Encoding::{Json, Protobuf};
    use TopicRole::{Combined, Feedback, Impressions};
    let fb = |body: &str| body.as_bytes().to_vec();
    let cases: Vec<(&str, TopicRole, Encoding, Vec<u8>, &str)> = vec![
        ("valid impression", Impressions, Protobuf, pb_impression(|_| {}), "ok"),
        ("valid feedback", Feedback, Protobuf, pb_feedback(|_| {}), "ok"),
        ("empty payload", Impressions, Protobuf, vec![], "empty_payload"),
        ("garbage bytes", Impressions, Protobuf, vec![0xff, 0xfe, 0x01], "bad_protobuf"),
        (
            "truncated protobuf",
            Impressions,
            Protobuf,
            {
                let mut b = pb_impression(|_| {});
                b.truncate(b.len() - 2);
                b
            },
            "bad_protobuf",
        ),
        (
            "missing impression id",
            Impressions,
            Protobuf,
            pb_impression(|m| m.impression_id.clear()),
            "missing_field",
        ),
        ("missing model id", Impressions, Protobuf, pb_impression(|m| m.model_id.clear()), "missing_field"),
        ("empty slate", Impressions, Protobuf, pb_impression(|m| m.slate.clear()), "missing_field"),
        ("position 0", Impressions, Protobuf, pb_impression(|m| m.slate[0].position = 0), "bad_position"),
        (
            "NaN propensity",
            Impressions,
            Protobuf,
            pb_impression(|m| m.slate[0].propensity = f64::NAN),
            "non_finite_value",
        ),
        (
            "propensity above 1",
            Impressions,
            Protobuf,
            pb_impression(|m| m.slate[0].propensity = 1.5),
            "bad_propensity",
        ),
        (
            "zero propensity",
            Impressions,
            Protobuf,
            pb_impression(|m| m.slate[0].propensity = 0.0),
            "bad_propensity",
        ),
        (
            "infinite feature",
            Impressions,
            Protobuf,
            pb_impression(|m| {
                m.context = Some(pb::Context {
                    segment: "s".into(),
                    features: vec![pb::Feature { name: "x".into(), value: f64::INFINITY }],
                })
            }),
            "non_finite_value",
        ),
        (
            "shared position",
            Impressions,
            Protobuf,
            pb_impression(|m| {
                m.slate.push(pb::SlateItem { item_id: "b".into(), position: 1, propensity: 0.5, score: 0.0 })
            }),
            "bad_slate",
        ),
        (
            "item twice",
            Impressions,
            Protobuf,
            pb_impression(|m| {
                m.slate.push(pb::SlateItem { item_id: "a".into(), position: 2, propensity: 0.5, score: 0.0 })
            }),
            "bad_slate",
        ),
        ("negative time", Impressions, Protobuf, pb_impression(|m| m.event_time_ms = -5), "bad_event_time"),
        (
            "seconds sent as milliseconds",
            Impressions,
            Protobuf,
            pb_impression(|m| m.event_time_ms = 1_767_225_600),
            "bad_event_time",
        ),
        ("unknown kind (protobuf)", Feedback, Protobuf, pb_feedback(|m| m.kind = 9), "unknown_feedback_kind"),
        ("unspecified kind", Feedback, Protobuf, pb_feedback(|m| m.kind = 0), "unknown_feedback_kind"),
        ("NaN value", Feedback, Protobuf, pb_feedback(|m| m.value = f64::NAN), "non_finite_value"),
        ("feedback position 0", Feedback, Protobuf, pb_feedback(|m| m.position = 0), "bad_position"),
        ("missing item id", Feedback, Protobuf, pb_feedback(|m| m.item_id.clear()), "missing_field"),
        ("combined without body (unknown field only)", Combined, Protobuf, vec![0x78, 0x01], "missing_field"),
        (
            "valid JSON feedback",
            Feedback,
            Json,
            fb(
                r#"{"impression_id":"i","item_id":"a","position":1,"kind":"purchase","value":12.5,"event_time_ms":1767225600000}"#,
            ),
            "ok",
        ),
        ("truncated JSON", Feedback, Json, fb(r#"{"impression_id":"i","item"#), "bad_json"),
        (
            "JSON NaN",
            Feedback,
            Json,
            fb(
                r#"{"impression_id":"i","item_id":"a","position":1,"kind":"click","value":NaN,"event_time_ms":1767225600000}"#,
            ),
            "bad_json",
        ),
        (
            "negative position",
            Feedback,
            Json,
            fb(
                r#"{"impression_id":"i","item_id":"a","position":-2,"kind":"click","event_time_ms":1767225600000}"#,
            ),
            "bad_position",
        ),
        (
            "unknown kind (JSON)",
            Feedback,
            Json,
            fb(
                r#"{"impression_id":"i","item_id":"a","position":1,"kind":"wishlist","event_time_ms":1767225600000}"#,
            ),
            "unknown_feedback_kind",
        ),
        (
            "missing id (JSON)",
            Feedback,
            Json,
            fb(r#"{"item_id":"a","position":1,"kind":"click","event_time_ms":1767225600000}"#),
            "missing_field",
        ),
        (
            "unknown field (JSON)",
            Feedback,
            Json,
            fb(
                r#"{"impression_id":"i","item_id":"a","position":1,"kind":"click","event_time_ms":1767225600000,"colour":"red"}"#,
            ),
            "bad_json",
        ),
        (
            "JSON impression",
            Impressions,
            Json,
            fb(
                r#"{"impression_id":"i","event_time_ms":1767225600000,"model_id":"home","variant":"holdout","context":{"segment":"women","features":{"mobile":1}},"slate":[{"item_id":"a","position":1,"propensity":0.2}]}"#,
            ),
            "ok",
        ),
        ("JSON combined untagged", Combined, Json, fb(r#"{"impression_id":"i"}"#), "bad_json"),
        ("JSON array", Impressions, Json, fb("[1,2]"), "bad_json"),
    ];
    let mut failures = Vec::new();
    for (name, role, enc, payload, want) in &cases {
        let got = match decode(*role, *enc, payload) {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                e.code().to_string()
            }
        };
        if got != *want {
            failures.push(format!("{name}: expected {want}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz over every role and encoding.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..400usize {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for role in [TopicRole::Impressions, TopicRole::Feedback, TopicRole::Combined] {
            for enc in [Encoding::Protobuf, Encoding::Json] {
                let _ = decode(role, enc, &bytes);
            }
        }
    }
}

/// The processor decodes protobuf records in place (`decode_in_place`, strings borrowed from
/// the record) and leaves what that reader does not handle to prost (`decode`). The oracle is
/// prost: over random messages of every shape (valid and invalid values, non-ASCII and empty
/// ids, unknown fields, fields given twice, overlong varints, wrong wire types, groups, flipped
/// bytes, truncation), decoded as every role, the in-place reader either leaves the record to
/// prost or gives exactly prost's event or error. It must answer every record prost encoded
/// itself and every record with unknown non-group fields added, so the hot path is the one
/// that runs.
#[test]
fn the_in_place_decoder_answers_as_prost_does_or_leaves_the_record_to_it() {
    use banditflow::core::event::decode_in_place;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    let strings = ["", "a", "imp-1", "home", "item|7", "ä→ß", "x\u{0}y", "a-very-long-identifier-0123456789"];
    let pick = |rng: &mut rand_chacha::ChaCha8Rng| strings[rng.random_range(0..strings.len())].to_string();
    let number = |rng: &mut rand_chacha::ChaCha8Rng| match rng.random_range(0..8) {
        0 => f64::NAN,
        1 => -0.0,
        2 => 2e12,
        3 => 1.0,
        _ => rng.random_range(-1.0..1.5),
    };
    let time = |rng: &mut rand_chacha::ChaCha8Rng| match rng.random_range(0..6) {
        0 => 0,
        1 => -5,
        2 => 1_767_225_600, // seconds
        _ => 1_767_225_600_000 + rng.random_range(0..1_000_000),
    };
    let mut answered = [0usize; 8];
    let mut previous: [Vec<u8>; 3] = Default::default();
    let mut total = [0usize; 8];
    for _ in 0..4000 {
        let impression = pb::Impression {
            impression_id: pick(&mut rng),
            event_time_ms: time(&mut rng),
            model_id: pick(&mut rng),
            model_version: rng.random(),
            variant: rng
                .random_bool(0.5)
                .then(|| pb::Variant { kind: rng.random_range(-1..5), arm: pick(&mut rng) }),
            context: rng.random_bool(0.5).then(|| pb::Context {
                segment: pick(&mut rng),
                features: (0..rng.random_range(0..4))
                    .map(|_| pb::Feature { name: pick(&mut rng), value: number(&mut rng) })
                    .collect(),
            }),
            slate: (0..rng.random_range(0..20))
                .map(|i| pb::SlateItem {
                    item_id: if rng.random_bool(0.9) {
                        format!("item-{}", rng.random_range(0..40))
                    } else {
                        pick(&mut rng)
                    },
                    position: match rng.random_range(0..10) {
                        0 => 0,
                        1 => 70_000,
                        2 => rng.random(),
                        _ => i + 1,
                    },
                    propensity: number(&mut rng),
                    score: number(&mut rng),
                })
                .collect(),
            opted_out: rng.random_bool(0.1),
            user_key: pick(&mut rng),
        };
        let feedback = pb::Feedback {
            impression_id: pick(&mut rng),
            item_id: pick(&mut rng),
            position: if rng.random_bool(0.8) { rng.random_range(0..30) } else { rng.random() },
            kind: rng.random_range(-1..6),
            value: number(&mut rng),
            event_time_ms: time(&mut rng),
        };
        let body = if rng.random_bool(0.5) {
            pb::event::Body::Impression(impression.clone())
        } else {
            pb::event::Body::Feedback(feedback.clone())
        };
        let shape = rng.random_range(0..3);
        let base = match shape {
            0 => impression.encode_to_vec(),
            1 => feedback.encode_to_vec(),
            _ => pb::Event { body: Some(body) }.encode_to_vec(),
        };
        let own_role = [TopicRole::Impressions, TopicRole::Feedback, TopicRole::Combined][shape];
        let mutation = rng.random_range(0..8usize);
        let mut bytes = base.clone();
        match mutation {
            0 => {}
            // Unknown fields of every non-group wire type (numbers 20..), before or after.
            1 => {
                let mut extra = Vec::new();
                for _ in 0..rng.random_range(1..4) {
                    let field: u64 = rng.random_range(20..5000);
                    let wire_type = [0u64, 1, 2, 5][rng.random_range(0..4)];
                    prost::encoding::encode_varint(field << 3 | wire_type, &mut extra);
                    match wire_type {
                        0 => prost::encoding::encode_varint(rng.random(), &mut extra),
                        1 => extra.extend_from_slice(&rng.random::<u64>().to_le_bytes()),
                        2 => {
                            let n = rng.random_range(0..6);
                            prost::encoding::encode_varint(n, &mut extra);
                            extra.extend((0..n).map(|_| rng.random::<u8>()));
                        }
                        _ => extra.extend_from_slice(&rng.random::<u32>().to_le_bytes()),
                    }
                }
                if rng.random_bool(0.5) {
                    bytes.extend_from_slice(&extra);
                } else {
                    bytes.splice(0..0, extra);
                }
            }
            // Another message of the same type after it: scalars given twice (the last wins),
            // lists appended, singular messages merged.
            2 => bytes.extend_from_slice(&previous[shape]),
            3 => {
                if !bytes.is_empty() {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            4 => bytes.truncate(rng.random_range(0..=bytes.len())),
            // A group, a wire type prost skips and this reader leaves to it.
            5 => {
                let mut g = Vec::new();
                prost::encoding::encode_varint(33 << 3 | 3, &mut g);
                prost::encoding::encode_varint(7 << 3, &mut g);
                prost::encoding::encode_varint(1, &mut g);
                prost::encoding::encode_varint(33 << 3 | 4, &mut g);
                bytes.extend_from_slice(&g);
            }
            // An overlong varint for the first key (valid protobuf, 1-byte key written in 3).
            6 => {
                if bytes.first().is_some_and(|b| *b < 0x80) {
                    let k = bytes[0];
                    bytes.splice(0..1, [k | 0x80, 0x80, 0x00]);
                }
            }
            // A known field with another wire type.
            _ => {
                let mut f = Vec::new();
                prost::encoding::encode_varint(
                    rng.random_range(1..10u64) << 3 | [0u64, 1, 2, 5][rng.random_range(0..4)],
                    &mut f,
                );
                f.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
                bytes.extend_from_slice(&f);
            }
        }
        previous[shape] = base;
        for role in [TopicRole::Impressions, TopicRole::Feedback, TopicRole::Combined] {
            let reference = decode(role, Encoding::Protobuf, &bytes);
            let fast = decode_in_place(role, Encoding::Protobuf, &bytes);
            if role == own_role {
                total[mutation] += 1;
                answered[mutation] += usize::from(fast.is_some());
            }
            if let Some(fast) = fast {
                assert_eq!(
                    fast.map(|v| v.to_event()),
                    reference,
                    "mutation {mutation}, role {role:?}, bytes {bytes:02x?}"
                );
            }
        }
    }
    // As prost wrote them, with unknown fields, with an overlong key: always answered here.
    for m in [0, 1, 6] {
        assert_eq!(answered[m], total[m], "mutation {m}: {answered:?} of {total:?}");
    }
    // Every mutation happened, and flipped or cut records were answered too where they still
    // parse (their values checked above against prost's).
    assert!(total.iter().all(|t| *t > 300), "{total:?}");
    assert!(answered[3] > 0 && answered[4] > 0, "{answered:?}");
}
