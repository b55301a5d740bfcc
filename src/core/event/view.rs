//! Events seen through borrowed strings: what the join takes, decoded in place from a record
//! or viewed from an owned event.

use super::{Event, Feedback, FeedbackKind, Impression, SlateEntry, Variant};

/// A valid [`Impression`] whose strings borrow the bytes it was decoded from (or an owned
/// impression: [`Impression::view`]). The join only hashes, interns or compares its ids, so
/// the processor's hot path decodes into views ([`decode_in_place`](super::decode_in_place)) and allocates no string
/// per id.
#[derive(Debug, Clone, PartialEq)]
pub struct ImpressionView<'a> {
    pub impression_id: &'a str,
    pub time_ms: i64,
    pub model_id: &'a str,
    pub model_version: u64,
    pub variant: Variant,
    pub segment: &'a str,
    pub features: Vec<(&'a str, f64)>,
    /// Sorted by position, as in [`Impression::slate`].
    pub slate: Vec<SlateView<'a>>,
    pub opted_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlateView<'a> {
    pub item_id: &'a str,
    pub position: u32,
    pub propensity: f64,
    pub score: f64,
}

/// A valid [`Feedback`] with borrowed ids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedbackView<'a> {
    pub impression_id: &'a str,
    pub item_id: &'a str,
    pub position: u32,
    pub kind: FeedbackKind,
    pub value: f64,
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventView<'a> {
    Impression(ImpressionView<'a>),
    Feedback(FeedbackView<'a>),
}

impl EventView<'_> {
    pub fn time_ms(&self) -> i64 {
        match self {
            EventView::Impression(i) => i.time_ms,
            EventView::Feedback(f) => f.time_ms,
        }
    }

    pub fn to_event(&self) -> Event {
        match self {
            EventView::Impression(i) => Event::Impression(i.to_impression()),
            EventView::Feedback(f) => Event::Feedback(f.to_feedback()),
        }
    }
}

impl Impression {
    pub fn view(&self) -> ImpressionView<'_> {
        ImpressionView {
            impression_id: &self.impression_id,
            time_ms: self.time_ms,
            model_id: &self.model_id,
            model_version: self.model_version,
            variant: self.variant.clone(),
            segment: &self.segment,
            features: self.features.iter().map(|(n, v)| (n.as_str(), *v)).collect(),
            slate: self
                .slate
                .iter()
                .map(|s| SlateView {
                    item_id: &s.item_id,
                    position: s.position,
                    propensity: s.propensity,
                    score: s.score,
                })
                .collect(),
            opted_out: self.opted_out,
        }
    }
}

impl ImpressionView<'_> {
    pub fn to_impression(&self) -> Impression {
        Impression {
            impression_id: self.impression_id.to_string(),
            time_ms: self.time_ms,
            model_id: self.model_id.to_string(),
            model_version: self.model_version,
            variant: self.variant.clone(),
            segment: self.segment.to_string(),
            features: self.features.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            slate: self
                .slate
                .iter()
                .map(|s| SlateEntry {
                    item_id: s.item_id.to_string(),
                    position: s.position,
                    propensity: s.propensity,
                    score: s.score,
                })
                .collect(),
            opted_out: self.opted_out,
        }
    }
}

impl Feedback {
    pub fn view(&self) -> FeedbackView<'_> {
        FeedbackView {
            impression_id: &self.impression_id,
            item_id: &self.item_id,
            position: self.position,
            kind: self.kind,
            value: self.value,
            time_ms: self.time_ms,
        }
    }
}

impl FeedbackView<'_> {
    pub fn to_feedback(&self) -> Feedback {
        Feedback {
            impression_id: self.impression_id.to_string(),
            item_id: self.item_id.to_string(),
            position: self.position,
            kind: self.kind,
            value: self.value,
            time_ms: self.time_ms,
        }
    }
}
