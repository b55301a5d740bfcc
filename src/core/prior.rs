//! Priors of Beta models: the configured one, or empirical Bayes — a Beta fitted at read time
//! by the method of moments on the model's own arms, per segment (ARCHITECTURE.md, "Modelling
//! choices"; BENCHMARKS.md, "Priors and early regret").

use std::collections::BTreeMap;

use super::model::{ArmStats, ModelShard};
use super::params::{Examination, ModelSpec, PositionModel, Prior};

/// Fewest arms with at least one (decayed, examination-weighted) exposure that an empirical
/// prior is fitted on.
pub const EMPIRICAL_MIN_ARMS: usize = 5;
/// Largest strength (α + β) of a fitted prior: when the arms look alike the moment estimate of
/// the spread goes to 0 and the strength to infinity, which would keep new arms from ever
/// leaving the prior; 1,000 pseudo-exposures still lets an arm's own data dominate once it
/// has been shown a few thousand times.
pub const EMPIRICAL_MAX_STRENGTH: f64 = 1000.0;
/// Share of the fitted strength a prior gets. The moment estimate of the spread is noisy with
/// few arms, and a prior stronger than the truth makes Thompson sampling under-explore and lock
/// onto a good-enough arm: with the full strength, regret after 10,000 impressions of 20 arms
/// was up to 36 % above the flat prior's (8 seeds); with a quarter, 2–18 % below it over the
/// first 3,000 impressions, and at 10,000 from 19 % below to 13 % above depending on the
/// random streams (`cargo bench --bench priors`, 16 seeds, BENCHMARKS.md). The mean is kept
/// whole: it is what an unseen arm most needs.
pub const EMPIRICAL_TEMPER: f64 = 0.25;
/// Smallest strength of a fitted prior (Beta(1, 1) has 2).
pub const EMPIRICAL_MIN_STRENGTH: f64 = 2.0;

/// Where the prior in force for a segment comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorSource {
    /// Configured (`segment_priors`, else `prior`).
    Configured,
    /// Fitted on the segment's own arms.
    Segment,
    /// Fitted on all the model's arms (the segment has too few with data).
    Model,
    /// The configured prior, because the model has too few arms with data to fit one.
    Fallback,
}

impl PriorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PriorSource::Configured => "configured",
            PriorSource::Segment => "empirical (segment)",
            PriorSource::Model => "empirical (model)",
            PriorSource::Fallback => "fallback (too little data to fit)",
        }
    }
}

/// Method-of-moments fit of a Beta prior to arms given as (success, exposure): the pooled rate
/// μ = Σs / Σe (smoothed by half a success), and the spread of the true rates from the
/// exposure-weighted spread of the observed ones less its binomial part,
/// var = (Σ e (s/e − μ)² − K μ(1 − μ)) / Σ e over the K arms with e ≥ 1; then
/// α + β = μ(1 − μ) / var − 1, clamped to [EMPIRICAL_MIN_STRENGTH, EMPIRICAL_MAX_STRENGTH] and
/// to at most the mean exposure per arm (what the arms' own evidence can support), then
/// tempered to [`EMPIRICAL_TEMPER`] of that (at least EMPIRICAL_MIN_STRENGTH).
/// Successes are taken within [0, e]. None with fewer than [`EMPIRICAL_MIN_ARMS`] such arms.
pub fn fit_beta_prior(arms: &[(f64, f64)]) -> Option<Prior> {
    let m = beta_moments(arms)?;
    let strength = (m.strength * EMPIRICAL_TEMPER).max(EMPIRICAL_MIN_STRENGTH);
    Some(Prior { alpha: m.mean * strength, beta: (1.0 - m.mean) * strength })
}

/// The method-of-moments estimate behind [`fit_beta_prior`], before tempering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BetaMoments {
    /// Pooled rate, smoothed by half a success.
    pub mean: f64,
    /// α + β, within its bounds.
    pub strength: f64,
    /// Arms used (exposure ≥ 1).
    pub arms: usize,
}

/// See [`fit_beta_prior`].
pub fn beta_moments(arms: &[(f64, f64)]) -> Option<BetaMoments> {
    let mut used: Vec<(f64, f64)> =
        arms.iter().filter(|(_, e)| *e >= 1.0 && e.is_finite()).map(|&(s, e)| (s.clamp(0.0, e), e)).collect();
    // Sums in a fixed order: the same arms give the same bits whatever map they came from.
    used.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.total_cmp(&b.0)));
    if used.len() < EMPIRICAL_MIN_ARMS {
        return None;
    }
    let k = used.len() as f64;
    let total_e: f64 = used.iter().map(|(_, e)| e).sum();
    let total_s: f64 = used.iter().map(|(s, _)| s).sum();
    let mu = (total_s + 0.5) / (total_e + 1.0);
    let spread: f64 = used.iter().map(|(s, e)| e * (s / e - mu) * (s / e - mu)).sum();
    let var = (spread - k * mu * (1.0 - mu)) / total_e;
    // The spread can only be told from the binomial noise once arms have been shown about
    // 1 / var times; until then a small or negative estimate says "too little data", not
    // "the arms are alike". So the prior is never stronger than an average arm's own
    // evidence: it centres new arms on the shop's rate without drowning what they show.
    let evidence = (total_e / k).max(EMPIRICAL_MIN_STRENGTH);
    let cap = EMPIRICAL_MAX_STRENGTH.min(evidence);
    let strength =
        if var > 0.0 { (mu * (1.0 - mu) / var - 1.0).clamp(EMPIRICAL_MIN_STRENGTH, cap) } else { cap };
    Some(BetaMoments { mean: mu, strength, arms: used.len() })
}

/// The prior in force per segment ([`ModelShard::fit_priors`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FittedPriors {
    pub by_segment: BTreeMap<String, (Prior, PriorSource)>,
    /// For a segment the model has no arms of.
    pub other: (Prior, PriorSource),
}

impl FittedPriors {
    pub fn for_segment(&self, segment: &str) -> Prior {
        self.by_segment.get(segment).unwrap_or(&self.other).0
    }
}

/// (success, exposure) of `arms` read with the decay factor `f`: what a fit sees.
fn rates<'a>(
    arms: impl Iterator<Item = &'a ArmStats>,
    f: f64,
    examination: Option<&[f64]>,
) -> Vec<(f64, f64)> {
    arms.map(|a| (a.success * f, ModelShard::exposure_of(a, examination) * f)).collect()
}

impl ModelShard {
    /// The prior in force for `segment` and where it comes from: the configured one (per
    /// segment, else the model's), or with `empirical_prior` and no prior configured for the
    /// segment, one fitted by the method of moments ([`fit_beta_prior`]) on the segment's arms
    /// read at `now_ms` — on all the model's arms when the segment has fewer than
    /// [`EMPIRICAL_MIN_ARMS`] with data, and the configured fallback when the model has too.
    /// Fitted from sums over arms, so it is the same for a merged model however it was sharded.
    pub fn prior_in_force(
        &self,
        spec: &ModelSpec,
        segment: &str,
        now_ms: i64,
        examination: Option<&[f64]>,
    ) -> (Prior, PriorSource) {
        if let Some(p) = spec.segment_priors.get(segment) {
            return (*p, PriorSource::Configured);
        }
        if !spec.empirical_prior {
            return (spec.prior, PriorSource::Configured);
        }
        let f = self.read_factor(spec, now_ms);
        if let Some(p) =
            self.arms.get(segment).and_then(|items| fit_beta_prior(&rates(items.values(), f, examination)))
        {
            return (p, PriorSource::Segment);
        }
        self.model_prior(spec, now_ms, examination)
    }

    /// The empirical prior fitted on all of the model's arms (or the configured fallback): what
    /// a segment with too little data of its own gets.
    pub fn model_prior(
        &self,
        spec: &ModelSpec,
        now_ms: i64,
        examination: Option<&[f64]>,
    ) -> (Prior, PriorSource) {
        if !spec.empirical_prior {
            return (spec.prior, PriorSource::Configured);
        }
        let f = self.read_factor(spec, now_ms);
        match fit_beta_prior(&rates(self.arms.values().flat_map(|items| items.values()), f, examination)) {
            Some(p) => (p, PriorSource::Model),
            None => (spec.prior, PriorSource::Fallback),
        }
    }

    /// The prior in force for every segment the model knows, and for any other segment, read
    /// at `now_ms`: what a serving node computes once per model version.
    pub fn fit_priors(&self, spec: &ModelSpec, now_ms: i64) -> FittedPriors {
        let estimated = match spec.position {
            PositionModel::Pbm(Examination::Estimated) => Some(self.estimated_examination()),
            _ => None,
        };
        self.fit_priors_with(spec, now_ms, estimated.as_deref())
    }

    /// [`ModelShard::fit_priors`] with the estimated examination curve already fitted (None
    /// unless the model estimates examination): a serving node fits the curve once per model
    /// version and uses it for both.
    pub fn fit_priors_with(&self, spec: &ModelSpec, now_ms: i64, exam: Option<&[f64]>) -> FittedPriors {
        // The model-wide fit once (not per segment that is too small for its own): one pass
        // over the arms for it and one for the segments' own fits.
        let other = self.model_prior(spec, now_ms, exam);
        let f = self.read_factor(spec, now_ms);
        let mut by_segment: BTreeMap<String, (Prior, PriorSource)> = BTreeMap::new();
        for (seg, items) in &self.arms {
            let fitted = if !spec.empirical_prior {
                (spec.prior, PriorSource::Configured)
            } else {
                fit_beta_prior(&rates(items.values(), f, exam)).map_or(other, |p| (p, PriorSource::Segment))
            };
            by_segment.insert(seg.clone(), fitted);
        }
        for (seg, p) in &spec.segment_priors {
            by_segment.insert(seg.clone(), (*p, PriorSource::Configured));
        }
        FittedPriors { by_segment, other }
    }
}
