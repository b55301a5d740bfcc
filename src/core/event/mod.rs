//! Validated domain events and their decoding from protobuf or JSON bytes.
//!
//! Everything that arrives from outside passes through [`decode`]: it either yields a
//! well-formed [`Event`] or an [`InvalidEvent`] with a stable reason code. Nothing here panics on
//! input, and nothing here performs I/O.

use std::fmt;

use prost::Message;

use super::pb;
use super::wire;

mod json;
mod view;

pub use view::{EventView, FeedbackView, ImpressionView, SlateView};

/// How the records of one topic are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Protobuf,
    Json,
}

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    Impressions,
    Feedback,
    /// Both kinds, as `banditflow.v1.Event` (protobuf) or `{"type": ...}` objects (JSON).
    Combined,
}

/// How the slate was chosen. Ordered so that statistics sort treatment, holdout, arms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    Treatment,
    Holdout,
    Arm(String),
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Variant::Treatment => f.write_str("treatment"),
            Variant::Holdout => f.write_str("holdout"),
            Variant::Arm(a) => write!(f, "arm:{a}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FeedbackKind {
    Click,
    AddToCart,
    Purchase,
    Return,
}

impl FeedbackKind {
    pub const ALL: [FeedbackKind; 4] =
        [FeedbackKind::Click, FeedbackKind::AddToCart, FeedbackKind::Purchase, FeedbackKind::Return];

    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackKind::Click => "click",
            FeedbackKind::AddToCart => "add_to_cart",
            FeedbackKind::Purchase => "purchase",
            FeedbackKind::Return => "return",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(s: &str) -> Option<FeedbackKind> {
        FeedbackKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn to_pb(self) -> pb::FeedbackKind {
        match self {
            FeedbackKind::Click => pb::FeedbackKind::Click,
            FeedbackKind::AddToCart => pb::FeedbackKind::AddToCart,
            FeedbackKind::Purchase => pb::FeedbackKind::Purchase,
            FeedbackKind::Return => pb::FeedbackKind::Return,
        }
    }

    fn from_pb(v: i32) -> Option<FeedbackKind> {
        match pb::FeedbackKind::try_from(v).ok()? {
            pb::FeedbackKind::Click => Some(FeedbackKind::Click),
            pb::FeedbackKind::AddToCart => Some(FeedbackKind::AddToCart),
            pb::FeedbackKind::Purchase => Some(FeedbackKind::Purchase),
            pb::FeedbackKind::Return => Some(FeedbackKind::Return),
            pb::FeedbackKind::Unspecified => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlateEntry {
    pub item_id: String,
    /// 1-based.
    pub position: u32,
    pub propensity: f64,
    /// The score the serving policy ranked the item by (logged for offline evaluation; never
    /// learned from, and not kept in the attribution buffer).
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Impression {
    pub impression_id: String,
    pub time_ms: i64,
    pub model_id: String,
    pub model_version: u64,
    pub variant: Variant,
    pub segment: String,
    pub features: Vec<(String, f64)>,
    pub slate: Vec<SlateEntry>,
    pub opted_out: bool,
    // The pseudonymous user key is deliberately not kept: model state holds aggregates only.
}

#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub impression_id: String,
    pub item_id: String,
    pub position: u32,
    pub kind: FeedbackKind,
    pub value: f64,
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Impression(Impression),
    Feedback(Feedback),
}

impl Event {
    pub fn time_ms(&self) -> i64 {
        match self {
            Event::Impression(i) => i.time_ms,
            Event::Feedback(f) => f.time_ms,
        }
    }

    /// The event seen through borrowed strings, as the join takes it.
    pub fn view(&self) -> EventView<'_> {
        match self {
            Event::Impression(i) => EventView::Impression(i.view()),
            Event::Feedback(f) => EventView::Feedback(f.view()),
        }
    }
}

/// Why a record was rejected. `code()` is a stable label for metrics and dead-letter headers;
/// `Display` says what the producer should fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("payload is not a valid protobuf {message}: {detail}")]
    BadProtobuf { message: &'static str, detail: String },
    #[error("payload is not valid JSON for {message}: {detail}")]
    BadJson { message: &'static str, detail: String },
    #[error("required field `{0}` is missing or empty")]
    MissingField(&'static str),
    #[error("field `{field}` must be a 1-based position, got {value}")]
    BadPosition { field: &'static str, value: i64 },
    #[error("field `{0}` is NaN or infinite")]
    NonFinite(&'static str),
    #[error("propensity of item `{item}` must be in (0, 1], got {value}")]
    BadPropensity { item: String, value: f64 },
    #[error("unknown feedback kind {0}; expected click, add_to_cart, purchase or return")]
    UnknownKind(String),
    #[error(
        "event time must be milliseconds since the Unix epoch, at or after 2000-01-01, got {0} (seconds?)"
    )]
    BadEventTime(i64),
    #[error("slate is invalid: {0}")]
    BadSlate(String),
    #[error("model `{0}` is not configured")]
    UnknownModel(String),
    #[error("record has no payload")]
    EmptyPayload,
    #[error("topic `{0}` is not an input topic of this processor")]
    UnknownTopic(String),
    #[error(
        "event time {time_ms} is {} ms ahead of its reference time {reference_ms} (the record's timestamp); at most {max_skew_ms} ms is allowed — a wrong clock or microseconds sent as milliseconds?",
        time_ms.saturating_sub(*reference_ms)
    )]
    FutureEventTime { time_ms: i64, reference_ms: i64, max_skew_ms: i64 },
    #[error("field `{field}` is {len} bytes long, at most {max} allowed")]
    IdTooLong { field: &'static str, len: usize, max: usize },
    #[error("{count} context features, at most {max} allowed")]
    TooManyFeatures { count: usize, max: usize },
    #[error("field `{field}` is {value:e}, outside ±{max:e}")]
    OutOfRange { field: &'static str, value: f64, max: f64 },
}

impl InvalidEvent {
    /// Every reason code, for metrics that should show zeros and for restoring counts.
    pub const CODES: [&'static str; 16] = [
        "bad_protobuf",
        "bad_json",
        "missing_field",
        "bad_position",
        "non_finite_value",
        "bad_propensity",
        "unknown_feedback_kind",
        "bad_event_time",
        "bad_slate",
        "unknown_model",
        "empty_payload",
        "unknown_topic",
        "future_event_time",
        "id_too_long",
        "too_many_features",
        "out_of_range",
    ];

    /// The static code equal to `name`, if it is one.
    pub fn code_named(name: &str) -> Option<&'static str> {
        Self::CODES.into_iter().find(|c| *c == name)
    }

    pub fn code(&self) -> &'static str {
        match self {
            InvalidEvent::BadProtobuf { .. } => "bad_protobuf",
            InvalidEvent::BadJson { .. } => "bad_json",
            InvalidEvent::MissingField(_) => "missing_field",
            InvalidEvent::BadPosition { .. } => "bad_position",
            InvalidEvent::NonFinite(_) => "non_finite_value",
            InvalidEvent::BadPropensity { .. } => "bad_propensity",
            InvalidEvent::UnknownKind(_) => "unknown_feedback_kind",
            InvalidEvent::BadEventTime(_) => "bad_event_time",
            InvalidEvent::BadSlate(_) => "bad_slate",
            InvalidEvent::UnknownModel(_) => "unknown_model",
            InvalidEvent::EmptyPayload => "empty_payload",
            InvalidEvent::UnknownTopic(_) => "unknown_topic",
            InvalidEvent::FutureEventTime { .. } => "future_event_time",
            InvalidEvent::IdTooLong { .. } => "id_too_long",
            InvalidEvent::TooManyFeatures { .. } => "too_many_features",
            InvalidEvent::OutOfRange { .. } => "out_of_range",
        }
    }
}

/// Longest slate accepted; longer ones are almost certainly a logging bug.
pub const MAX_SLATE_LEN: usize = 256;

/// Largest |value| a feedback event (e.g. an order value) or a context feature may carry.
/// Beyond it the number is a unit or logging error, and squares or sums of it would overflow.
pub const MAX_ABS_VALUE: f64 = 1e12;

fn check_range(field: &'static str, v: f64) -> Result<f64, InvalidEvent> {
    if v.abs() <= MAX_ABS_VALUE {
        Ok(v)
    } else {
        Err(InvalidEvent::OutOfRange { field, value: v, max: MAX_ABS_VALUE })
    }
}

/// Checks an event against the configured bounds on ids and features (`max_id_bytes`,
/// `max_features`), which `decode` cannot know.
pub fn check_limits(
    event: &EventView<'_>,
    max_id_bytes: usize,
    max_features: usize,
) -> Result<(), InvalidEvent> {
    let id = |field: &'static str, s: &str| {
        if s.len() > max_id_bytes {
            Err(InvalidEvent::IdTooLong { field, len: s.len(), max: max_id_bytes })
        } else {
            Ok(())
        }
    };
    match event {
        EventView::Impression(i) => {
            id("impression_id", i.impression_id)?;
            id("model_id", i.model_id)?;
            id("context.segment", i.segment)?;
            if let Variant::Arm(a) = &i.variant {
                id("variant.arm", a)?;
            }
            if i.features.len() > max_features {
                return Err(InvalidEvent::TooManyFeatures { count: i.features.len(), max: max_features });
            }
            for (name, _) in &i.features {
                id("context.features.name", name)?;
            }
            for e in &i.slate {
                id("slate.item_id", e.item_id)?;
            }
        }
        EventView::Feedback(f) => {
            id("impression_id", f.impression_id)?;
            id("item_id", f.item_id)?;
        }
    }
    Ok(())
}

/// Decodes and validates one record payload.
pub fn decode(role: TopicRole, encoding: Encoding, payload: &[u8]) -> Result<Event, InvalidEvent> {
    if payload.is_empty() {
        return Err(InvalidEvent::EmptyPayload);
    }
    match (encoding, role) {
        (Encoding::Protobuf, TopicRole::Impressions) => {
            let m = pb::Impression::decode(payload).map_err(|e| bad_pb("Impression", e))?;
            impression_from_pb(&m).map(|i| Event::Impression(i.to_impression()))
        }
        (Encoding::Protobuf, TopicRole::Feedback) => {
            let m = pb::Feedback::decode(payload).map_err(|e| bad_pb("Feedback", e))?;
            feedback_from_pb(&m).map(|f| Event::Feedback(f.to_feedback()))
        }
        (Encoding::Protobuf, TopicRole::Combined) => {
            let m = pb::Event::decode(payload).map_err(|e| bad_pb("Event", e))?;
            match &m.body {
                Some(pb::event::Body::Impression(i)) => {
                    impression_from_pb(i).map(|i| Event::Impression(i.to_impression()))
                }
                Some(pb::event::Body::Feedback(f)) => {
                    feedback_from_pb(f).map(|f| Event::Feedback(f.to_feedback()))
                }
                None => Err(InvalidEvent::MissingField("body")),
            }
        }
        (Encoding::Json, role) => json::decode(role, payload),
    }
}

/// The processor's decode: [`decode_in_place`], and [`decode`] for what that leaves, handed to
/// `f` as a view either way (serving nodes check what they log through it too).
pub fn with_view<R>(
    role: TopicRole,
    encoding: Encoding,
    payload: &[u8],
    f: impl FnOnce(Result<EventView<'_>, InvalidEvent>) -> R,
) -> R {
    match decode_in_place(role, encoding, payload) {
        Some(view) => f(view),
        None => match decode(role, encoding, payload) {
            Ok(e) => f(Ok(e.view())),
            Err(e) => f(Err(e)),
        },
    }
}

/// Decodes and validates a protobuf record without copying its strings: the processor's hot
/// path. `None` when the record is not protobuf or holds something this reader leaves to
/// prost (a message field repeated, an invalid varint or string, a group, a wire type that
/// does not match the contract): [`decode`] then answers, with prost's own error. Where it
/// answers, it answers exactly what [`decode`] does (tested against it on mutated records).
pub fn decode_in_place(
    role: TopicRole,
    encoding: Encoding,
    payload: &[u8],
) -> Option<Result<EventView<'_>, InvalidEvent>> {
    if encoding != Encoding::Protobuf || payload.is_empty() {
        return None;
    }
    match role {
        TopicRole::Impressions => {
            Some(impression_from_parts(wire::impression(payload)?).map(EventView::Impression))
        }
        TopicRole::Feedback => Some(feedback_from_parts(wire::feedback(payload)?).map(EventView::Feedback)),
        TopicRole::Combined => Some(match wire::event(payload)? {
            wire::Body::Impression(i) => impression_from_parts(i).map(EventView::Impression),
            wire::Body::Feedback(f) => feedback_from_parts(f).map(EventView::Feedback),
        }),
    }
}

fn bad_pb(message: &'static str, e: prost::DecodeError) -> InvalidEvent {
    InvalidEvent::BadProtobuf { message, detail: e.to_string() }
}

fn bad_json(message: &'static str, e: serde_json::Error) -> InvalidEvent {
    InvalidEvent::BadJson { message, detail: e.to_string() }
}

fn require<'a>(s: &'a str, field: &'static str) -> Result<&'a str, InvalidEvent> {
    if s.is_empty() {
        Err(InvalidEvent::MissingField(field))
    } else {
        Ok(s)
    }
}

/// 2000-01-01T00:00:00Z. Anything earlier is a unit error (seconds sent as milliseconds read
/// as January 1970) or garbage; it would be learned with counters but no weight.
pub const MIN_EVENT_TIME_MS: i64 = 946_684_800_000;

fn check_time(t: i64) -> Result<i64, InvalidEvent> {
    if t >= MIN_EVENT_TIME_MS {
        Ok(t)
    } else {
        Err(InvalidEvent::BadEventTime(t))
    }
}

fn check_position(field: &'static str, p: i64) -> Result<u32, InvalidEvent> {
    if (1..=i64::from(u16::MAX)).contains(&p) {
        Ok(p as u32)
    } else {
        Err(InvalidEvent::BadPosition { field, value: p })
    }
}

fn check_finite(field: &'static str, v: f64) -> Result<f64, InvalidEvent> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(InvalidEvent::NonFinite(field))
    }
}

/// An impression as decoded, before validation.
struct RawImpression<'a> {
    impression_id: &'a str,
    time_ms: i64,
    model_id: &'a str,
    model_version: u64,
    variant: Variant,
    segment: &'a str,
    features: Vec<(&'a str, f64)>,
    /// (item, position, propensity, score)
    slate: Vec<(&'a str, i64, f64, f64)>,
    opted_out: bool,
}

fn build_impression(raw: RawImpression<'_>) -> Result<ImpressionView<'_>, InvalidEvent> {
    let RawImpression {
        impression_id,
        time_ms,
        model_id,
        model_version,
        variant,
        segment,
        features,
        slate,
        opted_out,
    } = raw;
    let impression_id = require(impression_id, "impression_id")?;
    let model_id = require(model_id, "model_id")?;
    let time_ms = check_time(time_ms)?;
    for (name, v) in &features {
        if name.is_empty() {
            return Err(InvalidEvent::MissingField("context.features.name"));
        }
        check_finite("context.features.value", *v)?;
        check_range("context.features.value", *v)?;
    }
    if slate.is_empty() && !opted_out {
        return Err(InvalidEvent::MissingField("slate"));
    }
    if slate.len() > MAX_SLATE_LEN {
        return Err(InvalidEvent::BadSlate(format!(
            "{} items, at most {MAX_SLATE_LEN} allowed",
            slate.len()
        )));
    }
    let mut out = Vec::with_capacity(slate.len());
    for (item_id, position, propensity, score) in slate {
        let item_id = require(item_id, "slate.item_id")?;
        let position = check_position("slate.position", position)?;
        let propensity = check_finite("slate.propensity", propensity)?;
        if !(propensity > 0.0 && propensity <= 1.0) {
            return Err(InvalidEvent::BadPropensity { item: item_id.to_string(), value: propensity });
        }
        let score = check_finite("slate.score", score)?;
        out.push(SlateView { item_id, position, propensity, score });
    }
    // Positions and items must be unique: the join looks feedback up by (item, position).
    // Sorted by position, equal positions are neighbours; items are compared pairwise for
    // ordinary slates (no allocation) and through a sorted copy for long ones.
    out.sort_by_key(|e| e.position);
    if out.windows(2).any(|w| w[0].position == w[1].position) {
        return Err(InvalidEvent::BadSlate("two items share a position".into()));
    }
    let item_repeats = if out.len() <= 16 {
        out.iter().enumerate().any(|(i, a)| out[i + 1..].iter().any(|b| a.item_id == b.item_id))
    } else {
        let mut items: Vec<&str> = out.iter().map(|e| e.item_id).collect();
        items.sort_unstable();
        items.windows(2).any(|w| w[0] == w[1])
    };
    if item_repeats {
        return Err(InvalidEvent::BadSlate("an item appears twice".into()));
    }
    Ok(ImpressionView {
        impression_id,
        time_ms,
        model_id,
        model_version,
        variant,
        segment,
        features,
        slate: out,
        opted_out,
    })
}

/// A protobuf `Impression`'s fields, borrowed from prost's message or from the record's
/// bytes ([`wire`]): both decoders validate through the same code.
pub(crate) struct PbImpression<'a> {
    pub impression_id: &'a str,
    pub event_time_ms: i64,
    pub model_id: &'a str,
    pub model_version: u64,
    /// (kind, arm) when the message has a `variant`.
    pub variant: Option<(i32, &'a str)>,
    pub segment: &'a str,
    pub features: Vec<(&'a str, f64)>,
    pub slate: Vec<(&'a str, i64, f64, f64)>,
    pub opted_out: bool,
}

/// A protobuf `Feedback`'s fields, borrowed.
pub(crate) struct PbFeedback<'a> {
    pub impression_id: &'a str,
    pub item_id: &'a str,
    pub position: u32,
    pub kind: i32,
    pub value: f64,
    pub event_time_ms: i64,
}

fn impression_from_pb(m: &pb::Impression) -> Result<ImpressionView<'_>, InvalidEvent> {
    let (segment, features) = match &m.context {
        Some(c) => (c.segment.as_str(), c.features.iter().map(|f| (f.name.as_str(), f.value)).collect()),
        None => ("", Vec::new()),
    };
    impression_from_parts(PbImpression {
        impression_id: &m.impression_id,
        event_time_ms: m.event_time_ms,
        model_id: &m.model_id,
        model_version: m.model_version,
        variant: m.variant.as_ref().map(|v| (v.kind, v.arm.as_str())),
        segment,
        features,
        slate: m
            .slate
            .iter()
            .map(|s| (s.item_id.as_str(), i64::from(s.position), s.propensity, s.score))
            .collect(),
        opted_out: m.opted_out,
    })
}

fn impression_from_parts(m: PbImpression<'_>) -> Result<ImpressionView<'_>, InvalidEvent> {
    let variant = match m.variant {
        None => Variant::Treatment,
        Some((kind, arm)) => match pb::VariantKind::try_from(kind) {
            Ok(pb::VariantKind::Treatment) | Ok(pb::VariantKind::Unspecified) => Variant::Treatment,
            Ok(pb::VariantKind::Holdout) => Variant::Holdout,
            Ok(pb::VariantKind::Experiment) => Variant::Arm(require(arm, "variant.arm")?.to_string()),
            Err(_) => return Err(InvalidEvent::MissingField("variant.kind")),
        },
    };
    build_impression(RawImpression {
        impression_id: m.impression_id,
        time_ms: m.event_time_ms,
        model_id: m.model_id,
        model_version: m.model_version,
        variant,
        segment: m.segment,
        features: m.features,
        slate: m.slate,
        opted_out: m.opted_out,
    })
}

fn build_feedback<'a>(
    impression_id: &'a str,
    item_id: &'a str,
    position: i64,
    kind: Option<FeedbackKind>,
    kind_text: &dyn fmt::Display,
    value: f64,
    time_ms: i64,
) -> Result<FeedbackView<'a>, InvalidEvent> {
    let impression_id = require(impression_id, "impression_id")?;
    let item_id = require(item_id, "item_id")?;
    let position = check_position("position", position)?;
    let kind = kind.ok_or_else(|| InvalidEvent::UnknownKind(kind_text.to_string()))?;
    let value = check_range("value", check_finite("value", value)?)?;
    let time_ms = check_time(time_ms)?;
    Ok(FeedbackView { impression_id, item_id, position, kind, value, time_ms })
}

fn feedback_from_pb(m: &pb::Feedback) -> Result<FeedbackView<'_>, InvalidEvent> {
    feedback_from_parts(PbFeedback {
        impression_id: &m.impression_id,
        item_id: &m.item_id,
        position: m.position,
        kind: m.kind,
        value: m.value,
        event_time_ms: m.event_time_ms,
    })
}

fn feedback_from_parts(m: PbFeedback<'_>) -> Result<FeedbackView<'_>, InvalidEvent> {
    build_feedback(
        m.impression_id,
        m.item_id,
        i64::from(m.position),
        FeedbackKind::from_pb(m.kind),
        &m.kind,
        m.value,
        m.event_time_ms,
    )
}

/// Encodes an event the way [`decode`] reads it back (used by the generator and tests).
pub fn encode(role: TopicRole, encoding: Encoding, event: &Event) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => match (role, event) {
            (TopicRole::Impressions, Event::Impression(i)) => impression_to_pb(i).encode_to_vec(),
            (TopicRole::Feedback, Event::Feedback(f)) => feedback_to_pb(f).encode_to_vec(),
            (_, e) => pb::Event {
                body: Some(match e {
                    Event::Impression(i) => pb::event::Body::Impression(impression_to_pb(i)),
                    Event::Feedback(f) => pb::event::Body::Feedback(feedback_to_pb(f)),
                }),
            }
            .encode_to_vec(),
        },
        Encoding::Json => json::encode(role, event),
    }
}

pub fn impression_to_pb(i: &Impression) -> pb::Impression {
    let (kind, arm) = match &i.variant {
        Variant::Treatment => (pb::VariantKind::Treatment, String::new()),
        Variant::Holdout => (pb::VariantKind::Holdout, String::new()),
        Variant::Arm(a) => (pb::VariantKind::Experiment, a.clone()),
    };
    pb::Impression {
        impression_id: i.impression_id.clone(),
        event_time_ms: i.time_ms,
        model_id: i.model_id.clone(),
        model_version: i.model_version,
        variant: Some(pb::Variant { kind: kind as i32, arm }),
        context: Some(pb::Context {
            segment: i.segment.clone(),
            features: i
                .features
                .iter()
                .map(|(name, value)| pb::Feature { name: name.clone(), value: *value })
                .collect(),
        }),
        slate: i
            .slate
            .iter()
            .map(|s| pb::SlateItem {
                item_id: s.item_id.clone(),
                position: s.position,
                propensity: s.propensity,
                score: s.score,
            })
            .collect(),
        opted_out: i.opted_out,
        user_key: String::new(),
    }
}

pub fn feedback_to_pb(f: &Feedback) -> pb::Feedback {
    pb::Feedback {
        impression_id: f.impression_id.clone(),
        item_id: f.item_id.clone(),
        position: f.position,
        kind: f.kind.to_pb() as i32,
        value: f.value,
        event_time_ms: f.time_ms,
    }
}
