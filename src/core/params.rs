//! Validated, immutable parameters of the core: what each model learns and how the join
//! attributes feedback. Built from config by `crate::config`; the core never parses files.

use std::collections::BTreeMap;

use super::event::FeedbackKind;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prior {
    pub alpha: f64,
    pub beta: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Examination {
    /// Weight per position (index 0 = position 1); positions past the end use the last weight.
    Fixed(Vec<f64>),
    /// Estimated from propensity-weighted click rates per position, relative to position 1.
    Estimated,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PositionModel {
    Pbm(Examination),
    Cascade,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    BetaBernoulli,
    /// Disjoint linear model per arm over the context's features (see `core::linear`): `dim`
    /// slots (the intercept and `dim − 1` feature slots), ridge `lambda` on the feature
    /// coefficients, `hash_seed` for features not named in `ModelSpec::linear_features`.
    Linear {
        dim: u32,
        lambda: f64,
        hash_seed: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindReward {
    pub reward: f64,
    /// Added to the reward per unit of the feedback's `value` (e.g. order value).
    pub value_weight: f64,
    /// Feedback later than this after its impression (event time) is late.
    pub window_ms: i64,
}

/// Largest reward one feedback event may carry, in millionths (10⁹ reward units). Anything
/// larger is a unit or logging error; bounding it keeps integer sums far from overflow.
pub const MAX_REWARD_MICROS: i64 = 1_000_000_000_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Rewards {
    /// Indexed by `FeedbackKind::index()`.
    pub kinds: [KindReward; 4],
    /// Rewards are divided by this before they enter the Beta/linear statistics, so that one
    /// impression's successes stay within [0, 1] for the usual reward mix.
    pub scale: f64,
}

impl Rewards {
    pub fn of(&self, kind: FeedbackKind) -> &KindReward {
        &self.kinds[kind.index()]
    }

    /// Reward of one feedback event in millionths, rounded half away from zero. Integer so that
    /// reward counters add exactly in any order.
    pub fn micros(&self, kind: FeedbackKind, value: f64) -> i64 {
        self.micros_clamped(kind, value).0
    }

    /// [`Rewards::micros`], bounded to ±[`MAX_REWARD_MICROS`]; `true` when it had to be bounded.
    pub fn micros_clamped(&self, kind: FeedbackKind, value: f64) -> (i64, bool) {
        let k = self.of(kind);
        let r = ((k.reward + k.value_weight * value) * 1e6).round();
        if r.is_nan() {
            return (0, true);
        }
        let bound = MAX_REWARD_MICROS as f64;
        if r.abs() > bound {
            (if r > 0.0 { MAX_REWARD_MICROS } else { -MAX_REWARD_MICROS }, true)
        } else {
            (r as i64, false)
        }
    }

    pub fn max_window_ms(&self) -> i64 {
        self.kinds.iter().map(|k| k.window_ms).max().unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub id: String,
    pub algorithm: Algorithm,
    pub position: PositionModel,
    /// 0 = no decay.
    pub half_life_ms: i64,
    pub prior: Prior,
    pub segment_priors: BTreeMap<String, Prior>,
    /// Empirical Bayes: a segment without a configured prior gets one fitted at read time from
    /// the model's own arms in that segment (`ModelShard::prior_in_force`); `prior` is then
    /// only the fallback for a model with too little data to fit.
    pub empirical_prior: bool,
    pub rewards: Rewards,
    /// Linear models: the context features by name, feature `i` at slot `i + 1` (then
    /// `dim = len + 1`); empty: features are hashed into the `dim − 1` feature slots.
    pub linear_features: Vec<String>,
}

impl ModelSpec {
    /// A linear model's feature space (None for a Beta model).
    pub fn feature_space(&self) -> Option<super::linear::FeatureSpace<'_>> {
        match self.algorithm {
            Algorithm::Linear { dim, hash_seed, .. } => Some(super::linear::FeatureSpace {
                dim: dim as usize,
                hash_seed,
                names: &self.linear_features,
            }),
            Algorithm::BetaBernoulli => None,
        }
    }

    pub fn prior_for(&self, segment: &str) -> Prior {
        self.segment_priors.get(segment).copied().unwrap_or(self.prior)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JoinSpec {
    /// Watermark = newest event time seen on the partition minus this.
    pub watermark_delay_ms: i64,
    /// How long feedback that arrived before its impression waits for it.
    pub grace_ms: i64,
    /// How long after the longest attribution window an impression is still kept, so that late
    /// feedback is recognised (and learned, if `learn_late`) instead of orphaned.
    pub late_retention_ms: i64,
    pub learn_late: bool,
    pub max_impressions: usize,
    pub max_pending_feedback: usize,
    /// The funnel, per kind (`FeedbackKind::index()`): the kinds (bit `index()`) one of which an
    /// item must have received before this kind can come for it; 0 = none. It decides how long
    /// an impression is retained (`core::buffer::Retention`); all 0 keeps every impression for
    /// the longest window.
    pub funnel: [u8; 4],
}

/// The default funnel: a click needs nothing; a cart or a purchase needs a click (or a cart);
/// a return needs a purchase.
pub const DEFAULT_FUNNEL: [u8; 4] = [0, 0b0001, 0b0011, 0b0100];

/// Bounds on what one record may carry and on what state it may create: the defences against
/// bad clocks, extreme numbers and unbounded cardinality (ARCHITECTURE.md, "Bounds").
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// An event dated more than this after its Kafka record timestamp is invalid: it would move
    /// the watermark and the decay landmarks into the future. (Records without a timestamp are
    /// not bounded; see `PartitionState::apply`.)
    pub max_event_time_skew_ms: i64,
    /// Propensities below this are raised to it before they divide anything (counted).
    pub propensity_floor: f64,
    /// Longest id (impression, item, model, segment, experiment arm, feature name), in bytes.
    pub max_id_bytes: usize,
    /// Most named context features on one impression.
    pub max_features: usize,
    /// Most (segment, item) arms one model keeps per partition; placements that would create
    /// more are not learned (counted).
    pub max_arms_per_model: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_event_time_skew_ms: 10 * 60 * 1000,
            propensity_floor: 1e-4,
            max_id_bytes: 256,
            max_features: 64,
            max_arms_per_model: 1_000_000,
        }
    }
}

/// Everything the core of one partition needs.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreSpec {
    pub models: Vec<ModelSpec>,
    pub rewards: Rewards,
    pub join: JoinSpec,
    pub limits: Limits,
}

impl CoreSpec {
    pub fn model(&self, id: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.id == id)
    }
}
