//! The JSON form of the event contract: the protobuf messages' field names, a variant as a
//! string, features as an object, and for a combined topic a `type` tag.

use serde::Deserialize;

use super::{
    bad_json, build_feedback, build_impression, Event, Feedback, FeedbackKind, FeedbackView, Impression,
    ImpressionView, InvalidEvent, RawImpression, TopicRole, Variant,
};

/// Decodes and validates a JSON record.
pub(super) fn decode(role: TopicRole, payload: &[u8]) -> Result<Event, InvalidEvent> {
    match role {
        TopicRole::Impressions => {
            let j: JsonImpression = serde_json::from_slice(payload).map_err(|e| bad_json("Impression", e))?;
            j.validate().map(|i| Event::Impression(i.to_impression()))
        }
        TopicRole::Feedback => {
            let j: JsonFeedback = serde_json::from_slice(payload).map_err(|e| bad_json("Feedback", e))?;
            j.validate().map(|f| Event::Feedback(f.to_feedback()))
        }
        TopicRole::Combined => {
            let j: JsonEvent = serde_json::from_slice(payload).map_err(|e| bad_json("Event", e))?;
            match &j {
                JsonEvent::Impression(i) => i.validate().map(|i| Event::Impression(i.to_impression())),
                JsonEvent::Feedback(f) => f.validate().map(|f| Event::Feedback(f.to_feedback())),
            }
        }
    }
}

/// Encodes an event the way [`decode`] reads it back.
pub(super) fn encode(role: TopicRole, event: &Event) -> Vec<u8> {
    let mut v = match event {
        Event::Impression(i) => impression_to_json(i),
        Event::Feedback(f) => feedback_to_json(f),
    };
    if role == TopicRole::Combined {
        if let serde_json::Value::Object(m) = &mut v {
            let t = if matches!(event, Event::Impression(_)) { "impression" } else { "feedback" };
            m.insert("type".into(), t.into());
        }
    }
    v.to_string().into_bytes()
}

/// JSON shape of an impression (field names as in the protobuf contract).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonImpression {
    #[serde(default)]
    impression_id: String,
    #[serde(default)]
    event_time_ms: i64,
    #[serde(default)]
    model_id: String,
    #[serde(default)]
    model_version: u64,
    /// "treatment" (default), "holdout", or the name of an experiment arm.
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    context: Option<JsonContext>,
    #[serde(default)]
    slate: Vec<JsonSlateItem>,
    #[serde(default)]
    opted_out: bool,
    #[serde(default)]
    #[allow(dead_code)] // accepted, never stored
    user_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonContext {
    #[serde(default)]
    segment: String,
    /// Named features as an object `{"name": value}`.
    #[serde(default)]
    features: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSlateItem {
    #[serde(default)]
    item_id: String,
    #[serde(default)]
    position: i64,
    #[serde(default)]
    propensity: f64,
    #[serde(default)]
    score: f64,
}

impl JsonImpression {
    fn validate(&self) -> Result<ImpressionView<'_>, InvalidEvent> {
        let variant = match self.variant.as_deref() {
            None | Some("treatment") => Variant::Treatment,
            Some("holdout") => Variant::Holdout,
            Some("") => return Err(InvalidEvent::MissingField("variant")),
            Some(arm) => Variant::Arm(arm.to_string()),
        };
        let (segment, features) = match &self.context {
            Some(c) => (c.segment.as_str(), c.features.iter().map(|(n, v)| (n.as_str(), *v)).collect()),
            None => ("", Vec::new()),
        };
        let slate =
            self.slate.iter().map(|s| (s.item_id.as_str(), s.position, s.propensity, s.score)).collect();
        build_impression(RawImpression {
            impression_id: &self.impression_id,
            time_ms: self.event_time_ms,
            model_id: &self.model_id,
            model_version: self.model_version,
            variant,
            segment,
            features,
            slate,
            opted_out: self.opted_out,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonFeedback {
    #[serde(default)]
    impression_id: String,
    #[serde(default)]
    item_id: String,
    #[serde(default)]
    position: i64,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    value: f64,
    #[serde(default)]
    event_time_ms: i64,
}

impl JsonFeedback {
    fn validate(&self) -> Result<FeedbackView<'_>, InvalidEvent> {
        let kind = FeedbackKind::parse(&self.kind);
        build_feedback(
            &self.impression_id,
            &self.item_id,
            self.position,
            kind,
            &self.kind,
            self.value,
            self.event_time_ms,
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JsonEvent {
    Impression(JsonImpression),
    Feedback(JsonFeedback),
}

fn impression_to_json(i: &Impression) -> serde_json::Value {
    let features: serde_json::Map<String, serde_json::Value> =
        i.features.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
    serde_json::json!({
        "impression_id": i.impression_id,
        "event_time_ms": i.time_ms,
        "model_id": i.model_id,
        "model_version": i.model_version,
        "variant": match &i.variant {
            Variant::Treatment => "treatment".to_string(),
            Variant::Holdout => "holdout".to_string(),
            Variant::Arm(a) => a.clone(),
        },
        "context": {"segment": i.segment, "features": features},
        "slate": i.slate.iter().map(|s| {
            let mut item = serde_json::json!({
                "item_id": s.item_id, "position": s.position, "propensity": s.propensity
            });
            // Like proto3's JSON mapping, a zero score (the default) is left out.
            if s.score != 0.0 {
                item["score"] = serde_json::json!(s.score);
            }
            item
        }).collect::<Vec<_>>(),
        "opted_out": i.opted_out,
    })
}

fn feedback_to_json(f: &Feedback) -> serde_json::Value {
    serde_json::json!({
        "impression_id": f.impression_id,
        "item_id": f.item_id,
        "position": f.position,
        "kind": f.kind.as_str(),
        "value": f.value,
        "event_time_ms": f.time_ms,
    })
}
