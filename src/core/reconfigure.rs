//! What a change of a model's configuration does to the statistics it has learned.
//!
//! Operators change half-lives, priors, examination curves and rewards, and add and remove
//! models, while partitions hold statistics learned under the old parameters. Each difference
//! between the parameters stored with a snapshot and the configured ones falls in one class:
//!
//! | change | class | effect on restore |
//! |---|---|---|
//! | prior, segment priors, linear λ | read-time | applies at once: they are added when statistics are read |
//! | fixed examination weights (same number or not) | read-time | applies at once: new exposures use the new weights, old ones keep theirs and decay away |
//! | attribution windows | read-time | applies at once: they decide what the join attributes, not what a sum means |
//! | half-life | reinterpreted | sums keep their value at the partition's newest event time and decay with the new half-life from there |
//! | algorithm, linear dimension, hash seed or named features, position model (pbm / estimated / cascade), reward of a kind, value weight, reward scale | reset | old sums mean something else: the model starts empty on that partition (warned and counted by the edge) |
//! | a model added | added | starts empty |
//! | a model removed | removed | its state, buffered impressions and snapshot record are dropped |
//!
//! Nothing here fails: every combination of old and new parameters has an outcome, so a
//! configuration change can never make a partition unrestorable (and a service crash-loop).

use super::event::FeedbackKind;
use super::params::{Algorithm, Examination, ModelSpec, PositionModel};

/// What restoring did with one model of a partition.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChange {
    /// Parameters equal, or only read-time ones changed (listed; empty when equal).
    Kept { read_time: Vec<String> },
    /// The half-life changed; sums were re-expressed (see [`crate::core::model::ModelShard::change_half_life`]).
    HalfLifeChanged { from_ms: i64, to_ms: i64 },
    /// Statistics were dropped because `field` changed their meaning.
    Reset { field: String },
    /// Configured now, not in the checkpoint: starts empty.
    Added,
    /// In the checkpoint, not configured any more: dropped.
    Removed,
}

impl ModelChange {
    /// A stable label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ModelChange::Kept { read_time } if read_time.is_empty() => "unchanged",
            ModelChange::Kept { .. } => "read_time",
            ModelChange::HalfLifeChanged { .. } => "half_life",
            ModelChange::Reset { .. } => "reset",
            ModelChange::Added => "added",
            ModelChange::Removed => "removed",
        }
    }
}

fn position_kind(p: &PositionModel) -> &'static str {
    match p {
        PositionModel::Pbm(Examination::Fixed(_)) => "pbm with fixed examination",
        PositionModel::Pbm(Examination::Estimated) => "pbm with estimated examination",
        PositionModel::Cascade => "cascade",
    }
}

/// The first field whose change makes stored statistics meaningless, if any (config names).
pub fn reset_field(stored: &ModelSpec, configured: &ModelSpec) -> Option<String> {
    match (stored.algorithm, configured.algorithm) {
        (Algorithm::BetaBernoulli, Algorithm::BetaBernoulli) => {}
        (
            Algorithm::Linear { dim: d0, hash_seed: h0, .. },
            Algorithm::Linear { dim: d1, hash_seed: h1, .. },
        ) => {
            if d0 != d1 {
                return Some("linear.dim".into());
            }
            if h0 != h1 {
                return Some("linear.hash_seed".into());
            }
            if stored.linear_features != configured.linear_features {
                return Some("linear.features".into());
            }
        }
        _ => return Some("algorithm".into()),
    }
    if position_kind(&stored.position) != position_kind(&configured.position) {
        return Some(match (&stored.position, &configured.position) {
            (PositionModel::Pbm(_), PositionModel::Pbm(_)) => "examination".into(),
            _ => "position_model".into(),
        });
    }
    for kind in FeedbackKind::ALL {
        let (a, b) = (stored.rewards.of(kind), configured.rewards.of(kind));
        if a.reward.to_bits() != b.reward.to_bits() {
            return Some(format!("rewards.{}.reward", kind.as_str()));
        }
        if a.value_weight.to_bits() != b.value_weight.to_bits() {
            return Some(format!("rewards.{}.value_weight", kind.as_str()));
        }
    }
    if stored.rewards.scale.to_bits() != configured.rewards.scale.to_bits() {
        return Some("rewards.scale".into());
    }
    None
}

/// The read-time fields that differ (config names), given that no reset field does.
pub fn read_time_fields(stored: &ModelSpec, configured: &ModelSpec) -> Vec<String> {
    let mut out = Vec::new();
    if stored.prior != configured.prior || stored.empirical_prior != configured.empirical_prior {
        out.push("prior".to_string());
    }
    if stored.segment_priors != configured.segment_priors {
        out.push("segment_priors".to_string());
    }
    if let (Algorithm::Linear { lambda: a, .. }, Algorithm::Linear { lambda: b, .. }) =
        (stored.algorithm, configured.algorithm)
    {
        if a.to_bits() != b.to_bits() {
            out.push("linear.lambda".to_string());
        }
    }
    if stored.position != configured.position {
        out.push("examination".to_string());
    }
    for kind in FeedbackKind::ALL {
        if stored.rewards.of(kind).window_ms != configured.rewards.of(kind).window_ms {
            out.push(format!("rewards.{}.window", kind.as_str()));
        }
    }
    out
}
