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
