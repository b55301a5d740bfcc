//! One model's learned state on one partition (a shard), and the merge of shards.
//!
//! Everything here is an additive sufficient statistic: exact integer counters (impressions,
//! feedback per kind, rewards in millionths, per-variant sums of squares) and forward-decayed
//! floating-point sums (examination-weighted exposure, scaled reward, linear statistics).
//! Integer parts are exact in any order; floating-point parts are equal up to summation
//! rounding (see ARCHITECTURE.md, "Exactness").

use std::collections::BTreeMap;

/// hashbrown's map for its `entry_ref`: one hash per lookup, and a key allocated only when a
/// new arm is inserted.
pub type HashMap<K, V> = hashbrown::HashMap<K, V, rustc_hash::FxBuildHasher>;

use super::armlog::ArmLog;
use super::decay;
use super::event::{FeedbackKind, Variant};
use super::linear::{self, ArmPosterior, LinearPrior};
use super::params::{Algorithm, Examination, ModelSpec, PositionModel, Prior};

/// Positions past this share the last histogram bucket of estimated examination.
pub const MAX_TRACKED_POSITIONS: usize = 32;

#[derive(Debug, Clone, Default)]
pub struct ArmStats {
    pub impressions: u64,
    /// Indexed by `FeedbackKind::index()`.
    pub feedback: [u64; 4],
    pub reward_micros: i64,
    /// Decayed examination-weighted exposure (not used with estimated examination).
    pub exposure: f64,
    /// Decayed scaled reward.
    pub success: f64,
    /// Decayed impressions per position (estimated examination only).
    pub position_exposure: Vec<f64>,
    /// Decayed clicks per position (estimated examination only): with `position_exposure`, what
    /// the examination curve is fitted to ([`ModelShard::estimated_examination`]).
    pub position_clicks: Vec<f64>,
    /// Linear models: decayed `Σ w x xᵀ` (packed upper triangle) then `Σ r x` over the
    /// context's feature vector ([`linear::stats_len`] numbers; empty until the first update).
    pub linear: Vec<f64>,
    /// Where the arm's newest version is stored: the sequence of its arm segment
    /// (`core::armlog`), [`super::armlog::NEVER_STORED`] or [`super::armlog::CHANGED`]. Bookkeeping, not
    /// state: not compared.
    pub stored: u32,
}

impl PartialEq for ArmStats {
    fn eq(&self, o: &ArmStats) -> bool {
        self.impressions == o.impressions
            && self.feedback == o.feedback
            && self.reward_micros == o.reward_micros
            && self.exposure == o.exposure
            && self.success == o.success
            && self.position_exposure == o.position_exposure
            && self.position_clicks == o.position_clicks
            && self.linear == o.linear
    }
}

impl ArmStats {
    /// Equal bit for bit in everything stored (`PartialEq` takes 0.0 for -0.0): whether a
    /// stored copy of `o` stands for this arm.
    pub fn same_bits(&self, o: &ArmStats) -> bool {
        fn bits(a: &[f64], b: &[f64]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        }
        self.impressions == o.impressions
            && self.feedback == o.feedback
            && self.reward_micros == o.reward_micros
            && self.exposure.to_bits() == o.exposure.to_bits()
            && self.success.to_bits() == o.success.to_bits()
            && bits(&self.position_exposure, &o.position_exposure)
            && bits(&self.position_clicks, &o.position_clicks)
            && bits(&self.linear, &o.linear)
    }

    fn scale(&mut self, f: f64) {
        self.exposure *= f;
        self.success *= f;
        self.position_exposure.iter_mut().for_each(|v| *v *= f);
        self.position_clicks.iter_mut().for_each(|v| *v *= f);
        self.linear.iter_mut().for_each(|v| *v *= f);
    }

    fn add(&mut self, o: &ArmStats) {
        self.impressions += o.impressions;
        for (a, b) in self.feedback.iter_mut().zip(o.feedback) {
            *a += b;
        }
        self.reward_micros = self.reward_micros.saturating_add(o.reward_micros);
        self.exposure += o.exposure;
        self.success += o.success;
        if self.position_exposure.len() < o.position_exposure.len() {
            self.position_exposure.resize(o.position_exposure.len(), 0.0);
        }
        for (a, b) in self.position_exposure.iter_mut().zip(&o.position_exposure) {
            *a += b;
        }
        if self.position_clicks.len() < o.position_clicks.len() {
            self.position_clicks.resize(o.position_clicks.len(), 0.0);
        }
        for (a, b) in self.position_clicks.iter_mut().zip(&o.position_clicks) {
            *a += b;
        }
        if self.linear.len() < o.linear.len() {
            self.linear.resize(o.linear.len(), 0.0);
        }
        for (a, b) in self.linear.iter_mut().zip(&o.linear) {
            *a += b;
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PositionStats {
    pub impressions: u64,
    pub clicks: u64,
    pub ips_impressions: f64,
    pub ips_clicks: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VariantStats {
    pub impressions: u64,
    pub reward_micros: i64,
    /// Σ over impressions of (that impression's total reward in micros)².
    pub reward_sq_micros2: i128,
}

/// Reward per impression of treatment against holdout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lift {
    pub treatment_mean: f64,
    pub holdout_mean: f64,
    /// treatment − holdout, reward units per impression, with a 95 % normal interval.
    pub diff: f64,
    pub diff_low: f64,
    pub diff_high: f64,
    /// diff / holdout mean (NaN without holdout reward).
    pub relative: f64,
}

impl VariantStats {
    /// Mean and variance of reward per impression, in reward units.
    pub fn mean_var(&self) -> Option<(f64, f64)> {
        if self.impressions == 0 {
            return None;
        }
        let n = self.impressions as f64;
        let mean = self.reward_micros as f64 / 1e6 / n;
        let ex2 = self.reward_sq_micros2 as f64 / 1e12 / n;
        let var = if self.impressions > 1 { ((ex2 - mean * mean) * n / (n - 1.0)).max(0.0) } else { 0.0 };
        Some((mean, var))
    }
}

/// Lift of treatment over holdout with a Welch normal 95 % interval; `None` until both have two
/// impressions.
pub fn lift(treatment: &VariantStats, holdout: &VariantStats) -> Option<Lift> {
    if treatment.impressions < 2 || holdout.impressions < 2 {
        return None;
    }
    let (mt, vt) = treatment.mean_var()?;
    let (mh, vh) = holdout.mean_var()?;
    let diff = mt - mh;
    let se = (vt / treatment.impressions as f64 + vh / holdout.impressions as f64).sqrt();
    Some(Lift {
        treatment_mean: mt,
        holdout_mean: mh,
        diff,
        diff_low: diff - 1.959_963_984_540_054 * se,
        diff_high: diff + 1.959_963_984_540_054 * se,
        relative: if mh != 0.0 { diff / mh } else { f64::NAN },
    })
}

/// The posterior of one arm's attractiveness at a reading time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BetaPosterior {
    pub alpha: f64,
    pub beta: f64,
}

impl BetaPosterior {
    pub fn mean(&self) -> f64 {
        self.alpha / (self.alpha + self.beta)
    }

    pub fn variance(&self) -> f64 {
        let s = self.alpha + self.beta;
        self.alpha * self.beta / (s * s * (s + 1.0))
    }
}

#[derive(Debug, Clone)]
pub struct ModelShard {
    /// Decay landmark; `None` until the first event.
    pub landmark_ms: Option<i64>,
    /// segment → item → stats.
    pub arms: HashMap<String, HashMap<String, ArmStats>>,
    pub positions: BTreeMap<u32, PositionStats>,
    pub variants: BTreeMap<Variant, VariantStats>,
    /// Linear models: placements learned into arms' linear statistics (cascade corrections are
    /// not counted, so the count does not depend on the order feedback arrives in).
    pub linear_updates: u64,
    /// Number of arms over all segments (kept, so the arm cap costs nothing per placement).
    pub arm_total: usize,
    /// Event time of the newest impression learned (see `newest_impression_ms` in
    /// snapshot.proto).
    pub newest_impression_ms: Option<i64>,
    /// A processor's record of where the arms are stored and which changed since the last save
    /// (`core::armlog`); `None` until the first save, and for shards that are never saved.
    /// Bookkeeping, not state: not compared.
    pub log: Option<Box<ArmLog>>,
}

impl PartialEq for ModelShard {
    fn eq(&self, o: &ModelShard) -> bool {
        self.landmark_ms == o.landmark_ms
            && self.arms == o.arms
            && self.positions == o.positions
            && self.variants == o.variants
            && self.linear_updates == o.linear_updates
            && self.arm_total == o.arm_total
            && self.newest_impression_ms == o.newest_impression_ms
    }
}

/// What the join knows about the impression a change belongs to.
#[derive(Debug, Clone, Copy)]
pub struct ImpressionRef<'a> {
    pub time_ms: i64,
    pub segment: &'a str,
    pub features: &'a [(String, f64)],
}

impl ModelShard {
    pub fn new(_spec: &ModelSpec) -> ModelShard {
        ModelShard {
            landmark_ms: None,
            arms: HashMap::default(),
            positions: BTreeMap::new(),
            variants: BTreeMap::new(),
            linear_updates: 0,
            arm_total: 0,
            newest_impression_ms: None,
            log: None,
        }
    }

    pub fn arm_count(&self) -> usize {
        self.arm_total
    }

    /// Moves the landmark forward to `to` (no-op if not later), rescaling decayed sums exactly.
    pub fn rebase(&mut self, spec: &ModelSpec, to: i64) {
        let from = match self.landmark_ms {
            None => {
                self.landmark_ms = Some(to);
                return;
            }
            Some(l) if l >= to => return,
            Some(l) => l,
        };
        self.scale_decayed(decay::rebase_factor(spec.half_life_ms, from, to));
        self.landmark_ms = Some(to);
    }

    /// Multiplies every decayed sum by `f` (counters are untouched).
    fn scale_decayed(&mut self, f: f64) {
        if let Some(log) = self.log.as_mut() {
            log.all_changed(&mut self.arms);
        }
        for items in self.arms.values_mut() {
            for a in items.values_mut() {
                a.scale(f);
            }
        }
        for p in self.positions.values_mut() {
            p.ips_impressions *= f;
            p.ips_clicks *= f;
        }
    }

    /// Re-expresses the decayed sums, kept under half-life `old_half_life_ms`, for a new
    /// half-life: every sum takes the value it has at `at_ms` under the old half-life and decays
    /// under the new one from then on (as if all that was learned happened at `at_ms`). Exact
    /// for the reading at `at_ms`; the shape of the past is not recoverable from sums.
    pub fn change_half_life(&mut self, old_half_life_ms: i64, new_half_life_ms: i64, at_ms: i64) {
        let Some(old_landmark) = self.landmark_ms else {
            return;
        };
        let new_landmark = decay::landmark_for(new_half_life_ms, at_ms);
        let now_old = decay::weight(old_half_life_ms, old_landmark, at_ms);
        let now_new = decay::weight(new_half_life_ms, new_landmark, at_ms);
        let f = now_new / now_old;
        // An infinite old weight means everything decayed away long ago.
        self.scale_decayed(if f.is_finite() { f } else { 0.0 });
        self.landmark_ms = Some(new_landmark);
    }

    /// Decay weight of an event at `t`, moving the landmark first if `t` is past its grid cell.
    fn weight(&mut self, spec: &ModelSpec, t: i64) -> f64 {
        self.rebase(spec, decay::landmark_for(spec.half_life_ms, t));
        decay::weight(spec.half_life_ms, self.landmark_ms.unwrap_or(0), t)
    }

    /// The arm, created if new (merges only: learning goes through the arm cap).
    fn arm(&mut self, segment: &str, item: &str) -> &mut ArmStats {
        match self.arms.entry_ref(segment).or_default().entry_ref(item) {
            hashbrown::hash_map::EntryRef::Occupied(o) => o.into_mut(),
            hashbrown::hash_map::EntryRef::Vacant(v) => {
                self.arm_total += 1;
                v.insert(ArmStats::default())
            }
        }
    }

    fn examination_weight(spec: &ModelSpec, position: u32) -> f64 {
        match &spec.position {
            PositionModel::Pbm(Examination::Fixed(w)) => {
                let i = (position as usize).saturating_sub(1).min(w.len().saturating_sub(1));
                w.get(i).copied().unwrap_or(1.0)
            }
            PositionModel::Pbm(Examination::Estimated) | PositionModel::Cascade => 1.0,
        }
    }

    /// The feature vector of an impression's context (None for a Beta model).
    fn context_vector(spec: &ModelSpec, imp: ImpressionRef<'_>) -> Option<Vec<f64>> {
        let space = spec.feature_space()?;
        let mut x = Vec::with_capacity(space.dim);
        space.vector(imp.features, &mut x);
        Some(x)
    }

    /// A learned impression: the variant's impression count and one exposure per placed item.
    /// Under cascade every item counts as examined until a click says otherwise. A placement
    /// that would create an arm beyond `max_arms` keeps its position statistics but gets no
    /// arm (so no Beta or linear statistics); returns how many placements were refused so.
    pub fn observe_impression(
        &mut self,
        spec: &ModelSpec,
        imp: ImpressionRef<'_>,
        variant: &Variant,
        slate: &[(&str, u32, f64)],
        max_arms: usize,
    ) -> u64 {
        self.variant_stats(variant).impressions += 1;
        self.newest_impression_ms =
            Some(self.newest_impression_ms.map_or(imp.time_ms, |t| t.max(imp.time_ms)));
        let df = self.weight(spec, imp.time_ms);
        if slate.is_empty() {
            // No arm is touched, so no segment map may appear (it would change equality).
            return 0;
        }
        let mut rejected = 0;
        let estimated = matches!(spec.position, PositionModel::Pbm(Examination::Estimated));
        // The context's vector is the same for every item of the slate.
        let x = Self::context_vector(spec, imp);
        // The segment's map is found once per slate; arms, positions and the linear state are
        // disjoint sums, so updating them in separate passes changes no result.
        let items = self.arms.entry_ref(imp.segment).or_default();
        for &(item, position, propensity) in slate {
            let p = self.positions.entry(position).or_default();
            p.impressions += 1;
            p.ips_impressions += df / propensity;
            let arm = match items.entry_ref(item) {
                hashbrown::hash_map::EntryRef::Occupied(o) => o.into_mut(),
                hashbrown::hash_map::EntryRef::Vacant(_) if self.arm_total >= max_arms => {
                    rejected += 1;
                    continue;
                }
                hashbrown::hash_map::EntryRef::Vacant(v) => {
                    self.arm_total += 1;
                    v.insert(ArmStats::default())
                }
            };
            if let Some(log) = self.log.as_mut() {
                log.touched(arm, imp.segment, item);
            }
            arm.impressions += 1;
            if estimated {
                let bucket = (position as usize).clamp(1, MAX_TRACKED_POSITIONS) - 1;
                if arm.position_exposure.len() <= bucket {
                    arm.position_exposure.resize(bucket + 1, 0.0);
                }
                arm.position_exposure[bucket] += df;
            } else {
                arm.exposure += Self::examination_weight(spec, position) * df;
            }
            if let Some(x) = &x {
                linear::add_exposure(&mut arm.linear, x, Self::examination_weight(spec, position) * df);
                self.linear_updates += 1;
            }
        }
        if items.is_empty() {
            self.arms.remove(imp.segment);
        }
        rejected
    }

    fn variant_stats(&mut self, variant: &Variant) -> &mut VariantStats {
        if !self.variants.contains_key(variant) {
            self.variants.insert(variant.clone(), VariantStats::default());
        }
        self.variants.get_mut(variant).expect("inserted above")
    }

    /// Cascade bookkeeping: adds (`sign` = 1) or retracts (`sign` = -1) the examination of one
    /// placed item. Counters are untouched: the item was shown either way.
    pub fn cascade_examination(&mut self, spec: &ModelSpec, imp: ImpressionRef<'_>, item: &str, sign: f64) {
        let df = self.weight(spec, imp.time_ms);
        let x = Self::context_vector(spec, imp);
        if let Some(arm) = self.arms.get_mut(imp.segment).and_then(|m| m.get_mut(item)) {
            if let Some(log) = self.log.as_mut() {
                log.touched(arm, imp.segment, item);
            }
            arm.exposure += sign * df;
            if let Some(x) = &x {
                linear::add_exposure(&mut arm.linear, x, sign * df);
            }
        }
    }

    /// An attributed (or late and learned) feedback event. `prior_total` is the impression's
    /// reward before this event, so the variant's sum of squares stays exact. Integer sums
    /// saturate at their bounds instead of overflowing; returns whether one did.
    #[allow(clippy::too_many_arguments)]
    pub fn observe_feedback(
        &mut self,
        spec: &ModelSpec,
        imp: ImpressionRef<'_>,
        variant: &Variant,
        item: &str,
        position: u32,
        propensity: f64,
        kind: FeedbackKind,
        reward_micros: i64,
        prior_total: i64,
    ) -> bool {
        let df = self.weight(spec, imp.time_ms);
        let mut saturated = false;
        let v = self.variant_stats(variant);
        v.reward_micros = add_i64(v.reward_micros, reward_micros, &mut saturated);
        // |total| ≤ i64::MAX, so the squares fit in i128; their running sum may not.
        let (before, after) =
            (i128::from(prior_total), i128::from(prior_total.saturating_add(reward_micros)));
        let delta = after * after - before * before;
        v.reward_sq_micros2 = v.reward_sq_micros2.checked_add(delta).unwrap_or_else(|| {
            saturated = true;
            v.reward_sq_micros2.saturating_add(delta)
        });
        if kind == FeedbackKind::Click {
            let p = self.positions.entry(position).or_default();
            p.clicks += 1;
            p.ips_clicks += df / propensity;
        }
        let scaled = reward_micros as f64 / 1e6 / spec.rewards.scale * df;
        let x = if scaled != 0.0 { Self::context_vector(spec, imp) } else { None };
        let estimated = matches!(spec.position, PositionModel::Pbm(Examination::Estimated));
        if let Some(arm) = self.arms.get_mut(imp.segment).and_then(|m| m.get_mut(item)) {
            if let Some(log) = self.log.as_mut() {
                log.touched(arm, imp.segment, item);
            }
            arm.feedback[kind.index()] += 1;
            arm.reward_micros = add_i64(arm.reward_micros, reward_micros, &mut saturated);
            arm.success += scaled;
            if estimated && kind == FeedbackKind::Click {
                let bucket = (position as usize).clamp(1, MAX_TRACKED_POSITIONS) - 1;
                if arm.position_clicks.len() <= bucket {
                    arm.position_clicks.resize(bucket + 1, 0.0);
                }
                arm.position_clicks[bucket] += df;
            }
            if let Some(x) = &x {
                linear::add_reward(&mut arm.linear, x, scaled);
            }
        }
        saturated
    }

    /// Examination weight per position (index 0 = position 1) under estimated examination:
    /// the maximum-likelihood fit of the position-based model P(click) = γ_position · θ_arm to
    /// every arm's decayed exposures and clicks per position
    /// ([`super::examination::fit`]), relative to position 1 and clamped to [0.01, 1].
    /// Positions no arm was shown at get 1. Read time only: the statistics are additive, the
    /// fit is not.
    pub fn estimated_examination(&self) -> Vec<f64> {
        let arms = || self.arms.values().flat_map(|m| m.values());
        if !arms().any(|a| a.position_clicks.iter().any(|c| *c > 0.0)) {
            // No clicks to fit (a new model, or a snapshot of an older build read by a serving
            // node before the processor restarted it): the inverse-propensity estimate.
            return self.ips_examination();
        }
        let arms = arms();
        super::examination::fit(
            arms.map(|a| (&a.position_exposure[..], &a.position_clicks[..])),
            MAX_TRACKED_POSITIONS,
        )
    }

    /// The inverse-propensity-weighted click rate at each position relative to position 1,
    /// shrunk towards 1 with a pseudo-count, clamped to [0.01, 1] (index 0 = position 1): the
    /// estimate of older builds, now EM's starting point. Biased when treatment slates are
    /// deterministic (an item always at the same position gets propensity 1 there).
    pub fn ips_examination(&self) -> Vec<f64> {
        let rate = |p: &PositionStats| (p.ips_clicks + 1.0) / (p.ips_impressions + 1.0);
        let top = self.positions.get(&1).map(rate).unwrap_or(1.0);
        (1..=MAX_TRACKED_POSITIONS as u32)
            .map(|pos| match self.positions.get(&pos) {
                Some(p) if top > 0.0 => (rate(p) / top).clamp(0.01, 1.0),
                _ => 1.0,
            })
            .collect()
    }

    /// Posterior of an arm read at `now_ms` (the prior alone for an unseen arm), under the
    /// prior in force for its segment ([`ModelShard::prior_in_force`]: with an empirical prior
    /// that is a pass over the segment's arms, so callers reading many arms fit it once and
    /// use [`ModelShard::posterior_with`]).
    pub fn posterior(
        &self,
        spec: &ModelSpec,
        segment: &str,
        item: &str,
        now_ms: i64,
        examination: Option<&[f64]>,
    ) -> BetaPosterior {
        let (prior, _) = self.prior_in_force(spec, segment, now_ms, examination);
        self.posterior_with(spec, prior, segment, item, now_ms, examination)
    }

    /// Examination-weighted exposure of an arm (landmark-relative).
    pub(crate) fn exposure_of(arm: &ArmStats, examination: Option<&[f64]>) -> f64 {
        match examination {
            Some(w) => arm.position_exposure.iter().zip(w).map(|(n, e)| n * e).sum(),
            None => arm.exposure,
        }
    }

    /// [`ModelShard::posterior`] under a given prior.
    pub fn posterior_with(
        &self,
        spec: &ModelSpec,
        prior: Prior,
        segment: &str,
        item: &str,
        now_ms: i64,
        examination: Option<&[f64]>,
    ) -> BetaPosterior {
        let Some(arm) = self.arms.get(segment).and_then(|m| m.get(item)) else {
            return BetaPosterior { alpha: prior.alpha, beta: prior.beta };
        };
        let f = self.read_factor(spec, now_ms);
        let exposure = Self::exposure_of(arm, examination);
        // S may be negative (returns outweigh the rest): it then adds nothing to α and counts
        // as failures beyond the exposures, so a net-negative arm ranks below an arm with the
        // same exposure and no reward (ARCHITECTURE.md, "Modelling choices").
        let s = arm.success * f;
        let e = (exposure * f).max(0.0);
        BetaPosterior { alpha: prior.alpha + s.max(0.0), beta: prior.beta + (e - s).max(0.0) }
    }

    /// A linear model's posterior of an arm at decay factor `f` (from
    /// [`ModelShard::read_factor`]) under the segment's prior in force: the prior alone for an
    /// unseen arm; None for a Beta model or non-finite statistics.
    pub fn linear_posterior(
        &self,
        spec: &ModelSpec,
        prior: Prior,
        segment: &str,
        item: &str,
        f: f64,
    ) -> Option<ArmPosterior> {
        let Algorithm::Linear { dim, lambda, .. } = spec.algorithm else {
            return None;
        };
        let stats = self.arms.get(segment).and_then(|m| m.get(item)).map_or(&[][..], |a| &a.linear[..]);
        linear::posterior(stats, dim as usize, LinearPrior::from_beta(prior.alpha, prior.beta, lambda), f)
    }

    /// When to read a finished stream: the newest impression learned, else `fallback_ms`.
    pub fn read_time(&self, fallback_ms: i64) -> i64 {
        self.newest_impression_ms.unwrap_or(fallback_ms)
    }

    /// Factor that turns landmark-relative sums into values at `now_ms`.
    pub fn read_factor(&self, spec: &ModelSpec, now_ms: i64) -> f64 {
        match self.landmark_ms {
            Some(l) => 1.0 / decay::weight(spec.half_life_ms, l, now_ms).max(f64::MIN_POSITIVE),
            None => 1.0,
        }
    }

    /// Adds another shard of the same model (exact for counters; floating-point sums up to
    /// rounding).
    pub fn merge(&mut self, spec: &ModelSpec, other: &ModelShard) {
        self.merge_parts(spec, other, true);
    }

    /// [`ModelShard::merge`] of everything but the arms (positions, variants, counters, the
    /// landmark): with [`merge_arm`], a merge that recomputes only the arms that changed.
    pub fn merge_except_arms(&mut self, spec: &ModelSpec, other: &ModelShard) {
        self.merge_parts(spec, other, false);
    }

    fn merge_parts(&mut self, spec: &ModelSpec, other: &ModelShard, arms: bool) {
        let Some(ol) = other.landmark_ms else {
            // An empty shard may still carry variant counts of opted-in impressions only if it
            // has a landmark; nothing to add otherwise.
            return;
        };
        self.newest_impression_ms = self.newest_impression_ms.max(other.newest_impression_ms);
        let target = self.landmark_ms.map_or(ol, |l| l.max(ol));
        self.rebase(spec, target);
        let f = decay::rebase_factor(spec.half_life_ms, ol, target);
        for (segment, items) in other.arms.iter().filter(|_| arms) {
            for (item, a) in items {
                let mut a = a.clone();
                a.scale(f);
                self.arm(segment, item).add(&a);
            }
        }
        for (pos, p) in &other.positions {
            let s = self.positions.entry(*pos).or_default();
            s.impressions += p.impressions;
            s.clicks += p.clicks;
            s.ips_impressions += p.ips_impressions * f;
            s.ips_clicks += p.ips_clicks * f;
        }
        for (v, o) in &other.variants {
            let s = self.variants.entry(v.clone()).or_default();
            s.impressions += o.impressions;
            s.reward_micros = s.reward_micros.saturating_add(o.reward_micros);
            s.reward_sq_micros2 = s.reward_sq_micros2.saturating_add(o.reward_sq_micros2);
        }
        self.linear_updates += other.linear_updates;
    }
}

/// One arm as [`ModelShard::merge`] of `shards`, in this order, into an empty shard computes it,
/// bit for bit (the same scalings and additions in the same order), or `None` when no shard
/// with a landmark holds it.
pub fn merge_arm<'a>(
    spec: &ModelSpec,
    shards: impl IntoIterator<Item = &'a ModelShard>,
    segment: &str,
    item: &str,
) -> Option<ArmStats> {
    let mut fold = ArmFold::default();
    for s in shards {
        fold.add(spec, s.landmark_ms, s.arms.get(segment).and_then(|m| m.get(item)));
    }
    fold.acc
}

/// [`ModelShard::merge`]'s arithmetic for one arm, shard by shard: what an empty shard holds of
/// the arm after merging shards of these landmarks and values of the arm.
#[derive(Debug, Default)]
pub struct ArmFold {
    /// The merged landmark so far (the latest of the shards' that have one).
    pub landmark: Option<i64>,
    /// The merged arm so far (`None` while no shard with a landmark held it).
    pub acc: Option<ArmStats>,
}

impl ArmFold {
    /// Merges in a shard with landmark `shard_landmark` holding `arm` of the arm (or not).
    pub fn add(&mut self, spec: &ModelSpec, shard_landmark: Option<i64>, arm: Option<&ArmStats>) {
        // `merge` adds nothing of a shard without a landmark.
        let Some(ol) = shard_landmark else { return };
        let target = self.landmark.map_or(ol, |l| l.max(ol));
        // `rebase` of the accumulator: every arm it holds is scaled when the landmark moves.
        if let (Some(l), Some(a)) = (self.landmark, self.acc.as_mut()) {
            if l < target {
                a.scale(decay::rebase_factor(spec.half_life_ms, l, target));
            }
        }
        self.landmark = Some(target);
        if let Some(a) = arm {
            let mut a = a.clone();
            a.scale(decay::rebase_factor(spec.half_life_ms, ol, target));
            self.acc.get_or_insert_with(ArmStats::default).add(&a);
        }
    }
}

/// `a + b`, saturating; sets `saturated` when it had to.
fn add_i64(a: i64, b: i64, saturated: &mut bool) -> i64 {
    a.checked_add(b).unwrap_or_else(|| {
        *saturated = true;
        a.saturating_add(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lift_interval_brackets_difference() {
        let t =
            VariantStats { impressions: 4, reward_micros: 4_000_000, reward_sq_micros2: 6_000_000_000_000 };
        let h =
            VariantStats { impressions: 4, reward_micros: 2_000_000, reward_sq_micros2: 2_000_000_000_000 };
        let l = lift(&t, &h).expect("enough data");
        assert_eq!(l.diff, 0.5);
        assert!(l.diff_low < 0.5 && l.diff_high > 0.5);
        assert_eq!(l.relative, 1.0);
    }
}
