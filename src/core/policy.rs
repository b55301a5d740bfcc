//! Ranking policy for serving nodes: orders candidate items by Thompson sampling, UCB or the
//! posterior mean, with an exploration floor, and reports the propensity of each placement.
//!
//! Propensities: for UCB and greedy they are exact — the ranking is deterministic, and with
//! probability `epsilon` the slate is a uniformly random permutation, so
//! P(item i at position k) = (1 − ε)·[i ranked k] + ε / n. For Thompson sampling there is no
//! closed form; P is estimated by conditional Monte Carlo from seeded rankings drawn from a
//! separate random stream (not from the served draw, which is conditioned on its outcome:
//! counting it would bias small propensities upwards). Each ranking contributes, for every
//! served placement (i at 0-based position k), not the indicator [i ranked k] but its
//! expectation given the other candidates' draws: F_i(o_k) − F_i(o_{k+1}), the probability
//! that i's own score falls between the others' k-th and (k + 1)-th best (o_0 = +∞; F_i: the
//! Beta CDF, or the normal CDF for linear models). The expectation is the same, so the estimate stays unbiased; the variance is
//! smaller, by about the number of candidates where they are alike (the case that needs the
//! most rankings), so far fewer rankings give the same precision. With `propensity_rse` > 0 a
//! pilot of 8 rankings estimates, from its own values' variance, how many rankings each served
//! placement needs for that relative standard error ([`propensity_draws_needed`]); that many
//! fresh rankings, in blocks of 8 and at most `propensity_samples` − 8, give the estimate (the
//! pilot is discarded, so the adaptive count does not bias it). With `propensity_rse` = 0
//! exactly `propensity_samples` rankings are drawn. The ε mix keeps every placement at or above
//! ε / n. Only with ε = 0 is a served placement whose every value was 0 (its probability below
//! what a double resolves, or every ranking's indicator 0 where the CDF was not usable)
//! reported as 0.5 / N rather than 0, which bounds its inverse-propensity weight by 2N. [`placement_probabilities`] (for off-policy evaluation,
//! offline) still counts hits over every candidate and position.
//! Posterior draws are exact: Beta(α, β) as a ratio of Marsaglia–Tsang Gamma draws, which
//! costs a fraction of a general Beta sampler.
//! The seed comes in as an argument; the policy draws no other randomness.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::linear::PosteriorTable;
use super::model::ModelShard;
use super::params::{Algorithm, Examination, ModelSpec, PositionModel, Prior};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Sample from the posterior (LinTS for linear models).
    Thompson,
    /// Mean + c · standard deviation (LinUCB width for linear models).
    Ucb { c: f64 },
    /// Posterior mean.
    Greedy,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicySpec {
    pub strategy: Strategy,
    /// Probability of a uniformly random slate.
    pub epsilon: f64,
    /// Most Monte Carlo rankings used to estimate Thompson propensities.
    pub propensity_samples: u32,
    /// Stop drawing rankings once every served placement's estimate has at most this relative
    /// standard error (0: always draw `propensity_samples`).
    pub propensity_rse: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub item_id: String,
    /// 1-based.
    pub position: u32,
    pub propensity: f64,
    /// The score the item was ranked by in the served draw.
    pub score: f64,
}

pub struct RankRequest<'a> {
    pub segment: &'a str,
    pub features: &'a [(String, f64)],
    pub candidates: &'a [String],
    pub slate_size: usize,
    pub now_ms: i64,
    pub seed: u64,
    /// The prior in force for `segment` when the caller has it already (a serving node fits
    /// empirical priors once per model version); None: `ModelShard::prior_in_force` at `now_ms`.
    pub prior: Option<Prior>,
    /// A linear model's per-arm posteriors (Cholesky factor and mean) when the caller has them
    /// already (a serving node computes them once per model version, not per request); an arm
    /// missing from the table has no data and is ranked by its prior. None: computed here at
    /// `now_ms`.
    pub linear: Option<&'a PosteriorTable>,
    /// The estimated examination curve (index 0 = position 1) when the caller has it already
    /// (an EM fit over every arm: a serving node fits it once per model version); None:
    /// fitted here when the model estimates examination.
    pub examination: Option<&'a [f64]>,
}

/// Precomputed per-request scorer so Monte Carlo draws do not redo the algebra.
enum Scorer {
    /// Beta(α, β) per candidate, sampled as X / (X + Y) with X ~ Gamma(α), Y ~ Gamma(β)
    /// (Marsaglia–Tsang, constants prepared once per request): exact Beta draws at a fraction
    /// of the cost of a general Beta sampler, which matters for the Monte Carlo propensities.
    /// `ln_beta[i]` = ln B(α_i, β_i), for the CDF of the conditional propensity estimate.
    Beta { params: Vec<(f64, f64)>, gammas: Vec<Option<(Gamma<f64>, Gamma<f64>)>>, ln_beta: Vec<f64> },
    /// Disjoint linear model: θ_i·x of candidate i is normal under its arm's posterior, with
    /// mean θ̂_i·x and standard deviation √(m(1 − m))·‖L_i⁻¹x‖ (`ArmPosterior::mean_sd`); one
    /// normal draw per candidate is an exact LinTS draw of θ_i·x, since x is the request's.
    Linear { mean_sd: Vec<(f64, f64)> },
}

fn build_scorer(spec: &ModelSpec, model: &ModelShard, req: &RankRequest<'_>) -> Scorer {
    match spec.algorithm {
        Algorithm::BetaBernoulli => {
            let exam = match (&spec.position, req.examination) {
                (PositionModel::Pbm(Examination::Estimated), Some(e)) => Some(std::borrow::Cow::Borrowed(e)),
                (PositionModel::Pbm(Examination::Estimated), None) => {
                    Some(std::borrow::Cow::Owned(model.estimated_examination()))
                }
                _ => None,
            };
            let prior = req
                .prior
                .unwrap_or_else(|| model.prior_in_force(spec, req.segment, req.now_ms, exam.as_deref()).0);
            let params = req
                .candidates
                .iter()
                .map(|c| {
                    let p = model.posterior_with(spec, prior, req.segment, c, req.now_ms, exam.as_deref());
                    (p.alpha.max(1e-9), p.beta.max(1e-9))
                })
                .collect::<Vec<(f64, f64)>>();
            let gammas = params
                .iter()
                .map(|&(a, b)| Some((Gamma::new(a, 1.0).ok()?, Gamma::new(b, 1.0).ok()?)))
                .collect();
            let ln_beta = params
                .iter()
                .map(|&(a, b)| libm::lgamma(a) + libm::lgamma(b) - libm::lgamma(a + b))
                .collect();
            Scorer::Beta { params, gammas, ln_beta }
        }
        Algorithm::Linear { .. } => {
            let prior =
                req.prior.unwrap_or_else(|| model.prior_in_force(spec, req.segment, req.now_ms, None).0);
            let mut x = Vec::new();
            if let Some(space) = spec.feature_space() {
                space.vector(req.features, &mut x);
            }
            let f = model.read_factor(spec, req.now_ms);
            let segment = req.linear.and_then(|t| t.get(req.segment));
            let mean_sd = req
                .candidates
                .iter()
                .map(|c| {
                    let prepared = segment.and_then(|m| m.get(c.as_str()));
                    let computed;
                    let post = match prepared {
                        Some(p) => Some(p),
                        None => {
                            computed = model.linear_posterior(spec, prior, req.segment, c, f);
                            computed.as_ref()
                        }
                    };
                    post.map_or((0.0, 0.0), |p| p.mean_sd(&x))
                })
                .collect();
            Scorer::Linear { mean_sd }
        }
    }
}

/// One Beta(α, β) draw as X / (X + Y) from the prepared Gamma samplers (the mean if they
/// could not be built or both draws underflow).
fn beta_draw<R: Rng>((a, b): (f64, f64), gammas: &Option<(Gamma<f64>, Gamma<f64>)>, rng: &mut R) -> f64 {
    if let Some((ga, gb)) = gammas {
        let x = ga.sample(rng);
        let y = gb.sample(rng);
        if x + y > 0.0 {
            return x / (x + y);
        }
    }
    a / (a + b)
}

impl Scorer {
    fn len(&self) -> usize {
        match self {
            Scorer::Beta { params, .. } => params.len(),
            Scorer::Linear { mean_sd } => mean_sd.len(),
        }
    }

    /// (P(S_i ≤ t), P(S_i > t)) for candidate `i`'s Thompson score S_i, the tail on `t`'s side
    /// of the mean computed directly and the other as its complement (so a difference of two
    /// upper tails keeps its precision). None where the CDF would not describe the sampler's
    /// draws: a point mass (a linear arm without variance, or with a spread too small to move
    /// a draw off its mean in floating point; a Beta whose sampler could not be built), shapes
    /// so small that both Gamma draws can underflow (the sampler then returns the mean), a
    /// continued fraction that has not converged (shapes in the hundreds of thousands near the
    /// mean), or a threshold or mean that is not a number.
    fn tails(&self, i: usize, t: f64) -> Option<(f64, f64)> {
        match self {
            Scorer::Beta { params, gammas, ln_beta } => {
                let (a, b) = params[i];
                if gammas[i].is_none() || a.min(b) < MIN_SHAPE_FOR_CDF {
                    return None;
                }
                beta_tails(a, b, ln_beta[i], t)
            }
            Scorer::Linear { mean_sd } => {
                let (m, sd) = mean_sd[i];
                if t.is_nan() || !m.is_finite() || !(sd.is_finite() && sd > m.abs() * 1e-12) {
                    return None;
                }
                let z = (t - m) / sd * std::f64::consts::FRAC_1_SQRT_2;
                Some((0.5 * libm::erfc(-z), 0.5 * libm::erfc(z)))
            }
        }
    }

    /// Thompson scores of `subset` only (for the Monte Carlo rankings).
    fn sample_subset<R: Rng>(&self, subset: &[usize], rng: &mut R, out: &mut Vec<f64>) {
        out.clear();
        match self {
            Scorer::Beta { params, gammas, .. } => {
                for &i in subset {
                    out.push(beta_draw(params[i], &gammas[i], rng));
                }
            }
            Scorer::Linear { mean_sd } => {
                for &i in subset {
                    let (m, sd) = mean_sd[i];
                    let z: f64 = StandardNormal.sample(rng);
                    out.push(m + sd * z);
                }
            }
        }
    }

    fn scores(&self, strategy: Strategy, rng: &mut ChaCha8Rng, out: &mut Vec<f64>) {
        out.clear();
        match self {
            Scorer::Beta { params, gammas, .. } => {
                for (&(a, b), g) in params.iter().zip(gammas) {
                    let mean = a / (a + b);
                    let s = match strategy {
                        Strategy::Greedy => mean,
                        Strategy::Ucb { c } => {
                            mean + c * (a * b / ((a + b) * (a + b) * (a + b + 1.0))).sqrt()
                        }
                        Strategy::Thompson => beta_draw((a, b), g, rng),
                    };
                    out.push(s);
                }
            }
            Scorer::Linear { mean_sd } => {
                for &(m, sd) in mean_sd {
                    out.push(match strategy {
                        Strategy::Greedy => m,
                        Strategy::Ucb { c } => m + c * sd,
                        Strategy::Thompson => {
                            let z: f64 = StandardNormal.sample(rng);
                            m + sd * z
                        }
                    });
                }
            }
        }
    }
}

/// Monte Carlo rankings are drawn in blocks of this many; the pilot is one block.
const PROPENSITY_BLOCK: u32 = 8;
/// Beta shapes below this are not given to the CDF: both Gamma draws of the sampler can
/// underflow there, and it then returns the mean, so its draws are not exactly Beta.
const MIN_SHAPE_FOR_CDF: f64 = 0.05;
/// Most steps (two terms each) of the incomplete beta function's continued fraction. Near the
/// mean it takes about 11 for α + β = 1,000, 23 for 10,000 and 40 for 100,000 (measured); past
/// this the placement's value falls back to the ranking's indicator, which is unbiased too.
const BETA_CF_STEPS: u32 = 300;

/// Rankings needed for the mean of per-ranking values with mean `mean` and variance `variance`
/// to have relative standard error `rse`: σ / (μ √N) ≤ r ⇔ N ≥ σ² / (μ² r²). For a hit count
/// (σ² = p(1 − p)) that is 100 rankings for p = 0.5 and 900 for p = 0.1; the conditional values
/// this module averages have a smaller σ², often by a factor of about the number of
/// candidates. `rse` ≤ 0, or a mean of 0, never stops early.
pub fn propensity_draws_needed(mean: f64, variance: f64, rse: f64) -> f64 {
    if rse <= 0.0 || mean <= 0.0 {
        return f64::INFINITY;
    }
    variance / (mean * mean * rse * rse)
}

/// The continued fraction of the incomplete beta function, 1 / (1 + d₁ / (1 + d₂ / (1 + …)))
/// with the partial numerators of Numerical Recipes § 6.4, or None when it has not converged
/// within [`BETA_CF_STEPS`]. Its convergents A/B come from the forward recurrence, each
/// d = num / den applied as (A, A′) ← (den·A + num·A′, den·A): scaling a pair of convergents
/// alike leaves their ratio, so no term divides, which makes it about 3× faster than the
/// modified Lentz method (one division per two terms, to test convergence; rescaled before
/// the magnitudes can overflow).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> Option<f64> {
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    // (A_j, B_j, A_{j−1}, B_{j−1}), starting from A_1 = B_1 = 1, A_0 = 0, B_0 = 1.
    let mut c = [1.0f64, 1.0, 0.0, 1.0];
    let term = |c: &mut [f64; 4], num: f64, den: f64| {
        *c = [den * c[0] + num * c[2], den * c[1] + num * c[3], den * c[0], den * c[1]];
    };
    term(&mut c, -qab * x, qap);
    let mut f = c[0] / c[1];
    for m in 1..=BETA_CF_STEPS {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        term(&mut c, m * (b - m) * x, (qam + m2) * (a + m2));
        term(&mut c, -(a + m) * (qab + m) * x, (a + m2) * (qap + m2));
        if c[0].abs().max(c[1].abs()) > 1e150 {
            c = c.map(|v| v * 1e-150);
        }
        let next = c[0] / c[1];
        if (next - f).abs() <= 4.0 * f64::EPSILON * next.abs() {
            return Some(next);
        }
        f = next;
    }
    None
}

/// (P(X ≤ x), P(X > x)) for X ~ Beta(a, b), `ln_beta` = ln B(a, b): the regularized incomplete
/// beta function I_x(a, b) by its continued fraction on the side where it converges fast, the
/// tail on that side computed directly and the other as its complement.
fn beta_tails(a: f64, b: f64, ln_beta: f64, x: f64) -> Option<(f64, f64)> {
    if x.is_nan() {
        return None;
    }
    if x <= 0.0 {
        return Some((0.0, 1.0));
    }
    if x >= 1.0 {
        return Some((1.0, 0.0));
    }
    // Closed forms for a unit shape (the configured prior Beta(1, 9) of every unseen item, for
    // one): I_x(1, b) = 1 − (1 − x)^b and I_x(a, 1) = x^a.
    // One transcendental each: the small tail directly (expm1 only where it is the small one).
    let split = |ln_tail: f64| -> (f64, f64) {
        if ln_tail < -std::f64::consts::LN_2 {
            let tail = ln_tail.exp();
            (tail, 1.0 - tail)
        } else {
            let rest = -ln_tail.exp_m1();
            (1.0 - rest, rest)
        }
    };
    if a == 1.0 {
        let (upper, lower) = split(b * (-x).ln_1p());
        return Some((lower, upper));
    }
    if b == 1.0 {
        return Some(split(a * x.ln()));
    }
    let front = (a * x.ln() + b * (-x).ln_1p() - ln_beta).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        let lower = (front * beta_continued_fraction(a, b, x)? / a).clamp(0.0, 1.0);
        Some((lower, 1.0 - lower))
    } else {
        let upper = (front * beta_continued_fraction(b, a, 1.0 - x)? / b).clamp(0.0, 1.0);
        Some((1.0 - upper, upper))
    }
}

/// P(candidate `i` ranks at the 0-based position `pos` | every other candidate's score), from
/// one Monte Carlo ranking: `s` holds every candidate's draw and `idx` the best `k + 1` of them
/// (all, if fewer), best first. Candidate `i` lands at `pos` exactly when `pos` others beat it,
/// so the value is P(o_{pos+1} < S_i < o_pos) = F_i(o_pos) − F_i(o_{pos+1}) for the others'
/// order statistics o (o_0 = +∞, o_m = −∞ past the last other). Its expectation over the others'
/// draws is the propensity (the law of total probability), and its variance is at most that of
/// the indicator [`idx[pos] == i`] it replaces (the law of total variance). Where S_i has no
/// usable CDF ([`Scorer::tails`]), the indicator itself: which of the two is used depends on
/// the others' draws only, so the expectation is the same.
/// `own`: i's place in `idx`, if it is there.
fn conditional_placement(
    scorer: &Scorer,
    s: &[f64],
    idx: &[usize],
    own: Option<usize>,
    i: usize,
    pos: usize,
) -> f64 {
    // The m-th best other (1-based) is idx[m − 1] while that is above i, idx[m] past it.
    let other = |m: usize| -> f64 {
        if m == 0 {
            return f64::INFINITY;
        }
        let at = if own.is_some_and(|r| m > r) { m } else { m - 1 };
        idx.get(at).map_or(f64::NEG_INFINITY, |&j| s[j])
    };
    match (scorer.tails(i, other(pos)), scorer.tails(i, other(pos + 1))) {
        (Some((below_hi, above_hi)), Some((below_lo, above_lo))) => {
            // The difference of the smaller tails: both above the median, the upper ones.
            let v = if below_lo > 0.5 { above_lo - above_hi } else { below_hi - below_lo };
            v.clamp(0.0, 1.0)
        }
        _ => f64::from(u8::from(idx.get(pos) == Some(&i))),
    }
}

/// The Thompson part of each served placement's propensity, before the ε mix: P(a Thompson
/// ranking puts `order[pos]` at `pos`) for the `k` served positions. Rankings come from a
/// separate, fast stream (xoshiro256++), not the served draw (a ranking conditioned on its
/// outcome). Each ranking gives every placement its conditional probability
/// ([`conditional_placement`]); the estimate is their mean over `N` fresh rankings. With an
/// adaptive count a pilot block says how many rankings each placement needs for its relative
/// standard error to reach `propensity_rse` (from the pilot's own variance), within the cap;
/// the pilot is then discarded, so the stopping rule cannot bias the estimate.
fn thompson_propensities(
    scorer: &Scorer,
    policy: &PolicySpec,
    order: &[usize],
    k: usize,
    eps: f64,
    seed: u64,
) -> Vec<f64> {
    let n = scorer.len();
    let mut mc = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d);
    let cap = policy.propensity_samples.max(1);
    let all: Vec<usize> = (0..n).collect();
    let top = (k + 1).min(n);
    let (mut s, mut idx) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // Each candidate's place in the ranking's top list (usize::MAX: not in it), so a placement
    // finds its item's own place in O(1), not O(k).
    let mut place = vec![usize::MAX; n];
    // Per placement: the sum of its values and of their squares.
    let mut draw = |count: u32, sums: &mut Vec<(f64, f64)>| {
        sums.clear();
        sums.resize(k, (0.0, 0.0));
        for _ in 0..count {
            scorer.sample_subset(&all, &mut mc, &mut s);
            top_k_into(&s, top, &mut idx);
            for (r, &j) in idx.iter().enumerate() {
                place[j] = r;
            }
            for (pos, (&i, sum)) in order.iter().zip(sums.iter_mut()).enumerate() {
                let own = Some(place[i]).filter(|&r| r != usize::MAX);
                let v = conditional_placement(scorer, &s, &idx, own, i, pos);
                sum.0 += v;
                sum.1 += v * v;
            }
            for &j in &idx {
                place[j] = usize::MAX;
            }
        }
    };
    let mut sums = Vec::with_capacity(k);
    let fresh = if policy.propensity_rse > 0.0 && cap > 2 * PROPENSITY_BLOCK {
        draw(PROPENSITY_BLOCK, &mut sums);
        let pilot = f64::from(PROPENSITY_BLOCK);
        let needed = sums
            .iter()
            .map(|&(sum, squares)| {
                let mean = sum / pilot;
                let variance = ((squares - sum * mean) / (pilot - 1.0)).max(0.0);
                propensity_draws_needed(mean, variance, policy.propensity_rse)
            })
            .fold(0.0f64, f64::max);
        let room = cap - PROPENSITY_BLOCK;
        // Whole blocks, at least one, at most what the cap leaves after the pilot.
        let blocks = (needed / pilot).ceil().clamp(1.0, f64::from(room / PROPENSITY_BLOCK).max(1.0));
        (blocks as u32 * PROPENSITY_BLOCK).min(room)
    } else {
        cap
    };
    draw(fresh, &mut sums);
    let total = f64::from(fresh);
    // The mean is unbiased, zeros included; with ε > 0 the ε / n term keeps every placement
    // above zero. Only without it does a served placement whose every value was 0 (its
    // probability below what a double resolves, or only indicators, all 0) need a floor: half
    // a ranking's worth, which bounds its inverse-propensity weight by 2N.
    let floor = if eps > 0.0 { 0.0 } else { 0.5 / total };
    sums.iter().map(|&(sum, _)| if sum > 0.0 { (sum / total).min(1.0) } else { floor }).collect()
}

/// Indices of the top `k` scores, best first; ties go to the earlier candidate.
fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(scores.len());
    top_k_into(scores, k, &mut idx);
    idx
}

/// [`top_k`] into a reused buffer: selects the `k` best in linear time, then sorts only them.
fn top_k_into(scores: &[f64], k: usize, idx: &mut Vec<usize>) {
    idx.clear();
    idx.extend(0..scores.len());
    let better = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, better);
        idx.truncate(k);
    }
    idx.sort_unstable_by(better);
}

/// The probability that the policy puts each candidate at each of the first `positions`
/// positions, the ε mix included: `out[i][p]` for candidate `i` at position `p + 1` (0 beyond
/// the number of candidates). Exact for UCB and greedy; for Thompson sampling estimated from
/// `samples` seeded Monte Carlo rankings (unbiased, standard error at most 0.5 / √samples
/// before the mix). For off-policy evaluation, which needs the whole distribution at a
/// position, not only the served placement. Candidates must be unique.
pub fn placement_probabilities(
    spec: &ModelSpec,
    model: &ModelShard,
    policy: &PolicySpec,
    req: &RankRequest<'_>,
    positions: usize,
    samples: u32,
) -> Vec<Vec<f64>> {
    let n = req.candidates.len();
    let k = positions.min(n);
    let mut out = vec![vec![0.0; positions]; n];
    if k == 0 {
        return out;
    }
    let scorer = build_scorer(spec, model, req);
    let eps = policy.epsilon.clamp(0.0, 1.0);
    match policy.strategy {
        Strategy::Thompson => {
            let mut mc = Xoshiro256PlusPlus::seed_from_u64(req.seed ^ 0x5851_f42d_4c95_7f2d);
            let all: Vec<usize> = (0..n).collect();
            let (mut s, mut idx) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let samples = samples.max(1);
            for _ in 0..samples {
                scorer.sample_subset(&all, &mut mc, &mut s);
                top_k_into(&s, k, &mut idx);
                for (p, &i) in idx.iter().enumerate() {
                    out[i][p] += 1.0;
                }
            }
            let total = f64::from(samples);
            for row in &mut out {
                for v in row.iter_mut() {
                    *v /= total;
                }
            }
        }
        strategy @ (Strategy::Ucb { .. } | Strategy::Greedy) => {
            let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
            let mut scores = Vec::with_capacity(n);
            scorer.scores(strategy, &mut rng, &mut scores);
            for (p, i) in top_k(&scores, k).into_iter().enumerate() {
                out[i][p] = 1.0;
            }
        }
    }
    for row in &mut out {
        for v in row.iter_mut().take(k) {
            *v = (1.0 - eps) * *v + eps / n as f64;
        }
    }
    out
}

/// The model's expected reward, in reward units, of each candidate at each of the first
/// `positions` positions: `out[i][p]` = posterior mean × examination at position `p + 1` ×
/// `rewards.scale` (the direct-method model of off-policy evaluation). Examination is the
/// configured curve (its last weight repeating), the estimated one, or 1 under the cascade
/// model (whose examination depends on the other items); for linear models the mean is θ̂·x.
pub fn expected_rewards(
    spec: &ModelSpec,
    model: &ModelShard,
    req: &RankRequest<'_>,
    positions: usize,
) -> Vec<Vec<f64>> {
    let scorer = build_scorer(spec, model, req);
    let mut means = Vec::with_capacity(req.candidates.len());
    // The greedy scores are the posterior means; no randomness is drawn.
    scorer.scores(Strategy::Greedy, &mut ChaCha8Rng::seed_from_u64(0), &mut means);
    let estimated = match (&spec.position, req.examination) {
        (PositionModel::Pbm(Examination::Estimated), Some(e)) => e.to_vec(),
        (PositionModel::Pbm(Examination::Estimated), None) => model.estimated_examination(),
        _ => Vec::new(),
    };
    let exam = |p: usize| -> f64 {
        let curve: &[f64] = match &spec.position {
            PositionModel::Pbm(Examination::Fixed(w)) => w,
            PositionModel::Pbm(Examination::Estimated) => &estimated,
            PositionModel::Cascade => &[],
        };
        curve.get(p).or(curve.last()).copied().unwrap_or(1.0)
    };
    means.iter().map(|m| (0..positions).map(|p| m * exam(p) * spec.rewards.scale).collect()).collect()
}

/// The propensity the policy gives each placement of the slate `order` (indices into
/// `req.candidates`, which must be unique; `order[pos]` at position `pos + 1`), the ε mix
/// included: what [`rank`] logs when it serves that slate for `req`. For studying the estimator
/// on a fixed slate (benchmarks, audits of logged propensities); Thompson estimates use the
/// Monte Carlo stream of `req.seed`.
pub fn slate_propensities(
    spec: &ModelSpec,
    model: &ModelShard,
    policy: &PolicySpec,
    req: &RankRequest<'_>,
    order: &[usize],
) -> Vec<f64> {
    let n = req.candidates.len();
    let k = order.len().min(n);
    if k == 0 {
        return Vec::new();
    }
    let scorer = build_scorer(spec, model, req);
    let eps = policy.epsilon.clamp(0.0, 1.0);
    // UCB and greedy are exact: the policy's own ranking (their scores draw no randomness).
    let ranked = match policy.strategy {
        Strategy::Thompson => Vec::new(),
        strategy @ (Strategy::Ucb { .. } | Strategy::Greedy) => {
            let mut scores = Vec::with_capacity(n);
            scorer.scores(strategy, &mut ChaCha8Rng::seed_from_u64(req.seed), &mut scores);
            top_k(&scores, k)
        }
    };
    mixed_propensities(&scorer, policy, &order[..k], &ranked, n, eps, req.seed)
}

/// Each placement's propensity, the ε mix included: P(the policy puts `order[pos]` at `pos`)
/// by conditional Monte Carlo for Thompson sampling, exactly for UCB and greedy (`ranked`:
/// their own top k), then (1 − ε)·that + ε / n.
fn mixed_propensities(
    scorer: &Scorer,
    policy: &PolicySpec,
    order: &[usize],
    ranked: &[usize],
    n: usize,
    eps: f64,
    seed: u64,
) -> Vec<f64> {
    let k = order.len();
    let base: Vec<f64> = match policy.strategy {
        Strategy::Thompson => thompson_propensities(scorer, policy, order, k, eps, seed),
        Strategy::Ucb { .. } | Strategy::Greedy => {
            (0..k).map(|pos| if ranked.get(pos) == Some(&order[pos]) { 1.0 } else { 0.0 }).collect()
        }
    };
    // A convex mix of probabilities: within [ε / n, 1] up to rounding, which the bounds make
    // exact.
    base.iter().map(|b| ((1.0 - eps) * b + eps / n as f64).clamp(eps / n as f64, 1.0)).collect()
}

/// Ranks candidates. Duplicate candidates are ranked once (first occurrence).
pub fn rank(
    spec: &ModelSpec,
    model: &ModelShard,
    policy: &PolicySpec,
    req: &RankRequest<'_>,
) -> Vec<Placement> {
    // Candidates are usually unique already (serving nodes refuse repeats): copy them only if not.
    let mut seen = rustc_hash::FxHashSet::default();
    let unique = req.candidates.iter().all(|c| seen.insert(c.as_str()));
    let owned: Vec<String>;
    let candidates: &[String] = if unique {
        req.candidates
    } else {
        seen.clear();
        owned = req.candidates.iter().filter(|c| seen.insert(c.as_str())).cloned().collect();
        &owned
    };
    let req = RankRequest { candidates, ..*req };
    let n = candidates.len();
    let k = req.slate_size.min(n);
    if k == 0 {
        return Vec::new();
    }
    let scorer = build_scorer(spec, model, &req);
    let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
    let eps = policy.epsilon.clamp(0.0, 1.0);
    let mut scores = Vec::with_capacity(n);
    scorer.scores(policy.strategy, &mut rng, &mut scores);
    let explore = eps > 0.0 && rng.random::<f64>() < eps;
    let ranked = top_k(&scores, k);
    let order: Vec<usize> = if explore {
        let mut idx: Vec<usize> = (0..n).collect();
        // Fisher–Yates with the seeded stream.
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    } else {
        ranked.clone()
    };

    // Only the served placements' propensities are computed.
    let propensities = mixed_propensities(&scorer, policy, &order, &ranked, n, eps, req.seed);
    order
        .iter()
        .zip(propensities)
        .enumerate()
        .map(|(pos, (&i, propensity))| Placement {
            item_id: candidates[i].clone(),
            position: pos as u32 + 1,
            propensity,
            score: scores[i],
        })
        .collect()
}
