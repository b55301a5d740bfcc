//! Ranking policy for serving nodes: orders candidate items by Thompson sampling, UCB or the
//! posterior mean, with an exploration floor, and reports the propensity of each placement.
//!
//! Propensities: for UCB and greedy they are exact — the ranking is deterministic, and with
//! probability `epsilon` the slate is a uniformly random permutation, so
//! P(item i at position k) = (1 − ε)·[i ranked k] + ε / n. For Thompson sampling there is no
//! closed form; P is estimated from seeded Monte Carlo rankings drawn from a separate random
//! stream (not from the served draw, which is conditioned on its outcome: counting it would
//! bias small propensities upwards by (1 − p) / (N + 1)). With `propensity_rse` > 0 a pilot of
//! 64 rankings estimates how many rankings each served placement needs for that relative
//! standard error ([`propensity_draws_needed`]); that many fresh rankings, in blocks of 64 and
//! at most `propensity_samples` − 64, give the estimate (the pilot is discarded, so the
//! adaptive count does not bias it). With `propensity_rse` = 0 exactly `propensity_samples`
//! rankings are drawn. Any estimate from N rankings has a standard error of at most
//! 0.5 / √N. The estimate hits / N is unbiased, and so is its mix with ε / n as above, which
//! keeps every placement at or above ε / n. Only with ε = 0 is a served placement that no fresh
//! ranking produced (it has a probability, too small to resolve) reported as 0.5 / N rather
//! than 0: a bias of at most 0.5 / N, which bounds its inverse-propensity weight by 2N.
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
    Beta { params: Vec<(f64, f64)>, gammas: Vec<Option<(Gamma<f64>, Gamma<f64>)>> },
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
            Scorer::Beta { params, gammas }
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
    /// Thompson scores of `subset` only (for the Monte Carlo rankings).
    fn sample_subset<R: Rng>(&self, subset: &[usize], rng: &mut R, out: &mut Vec<f64>) {
        out.clear();
        match self {
            Scorer::Beta { params, gammas } => {
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
            Scorer::Beta { params, gammas } => {
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

/// Monte Carlo rankings are drawn in blocks of this many.
const PROPENSITY_BLOCK: u32 = 64;
/// Rankings needed for an estimate of a propensity near `p` to have relative standard error
/// `rse`: √((1 − p) / (p N)) ≤ r ⇔ N ≥ (1 − p) / (p r²). With r = 0.1 that is 100 rankings for
/// p = 0.5 and 900 for p = 0.1; a placement served with a small propensity needs more, up to
/// the configured cap. `rse` ≤ 0 never stops early.
pub fn propensity_draws_needed(p: f64, rse: f64) -> f64 {
    if rse <= 0.0 {
        return f64::INFINITY;
    }
    (1.0 - p) / (p * rse * rse)
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

    // base[pos] = P(the policy's ranking puts order[pos] at pos), before the ε mix. Only the
    // served placements are estimated.
    let base: Vec<f64> = match policy.strategy {
        Strategy::Thompson => {
            // Rankings from a separate, fast stream (xoshiro256++). With an adaptive count a
            // pilot block of rankings decides how many fresh ones to draw (enough for each
            // served placement's relative standard error to reach `propensity_rse`, within the
            // cap); the estimate uses the fresh rankings only, so the stopping rule cannot bias
            // it. The served draw is not counted: it is a ranking conditioned on its outcome.
            let mut mc = Xoshiro256PlusPlus::seed_from_u64(req.seed ^ 0x5851_f42d_4c95_7f2d);
            let cap = policy.propensity_samples.max(1);
            let all: Vec<usize> = (0..n).collect();
            let mut s = Vec::with_capacity(n);
            let mut idx = Vec::with_capacity(n);
            let mut draw = |count: u32, hits: &mut Vec<u32>| {
                hits.clear();
                hits.resize(k, 0);
                for _ in 0..count {
                    scorer.sample_subset(&all, &mut mc, &mut s);
                    top_k_into(&s, k, &mut idx);
                    for (h, (a, b)) in hits.iter_mut().zip(idx.iter().zip(&order)) {
                        *h += u32::from(a == b);
                    }
                }
            };
            let mut hits = Vec::with_capacity(k);
            let fresh = if policy.propensity_rse > 0.0 && cap > 2 * PROPENSITY_BLOCK {
                draw(PROPENSITY_BLOCK, &mut hits);
                let pilot = f64::from(PROPENSITY_BLOCK);
                let needed = hits
                    .iter()
                    .map(|&h| propensity_draws_needed(f64::from(h) / pilot, policy.propensity_rse))
                    .fold(0.0f64, f64::max);
                let room = cap - PROPENSITY_BLOCK;
                // Whole blocks, at least one, at most what the cap leaves after the pilot.
                let blocks = (needed / pilot).ceil().clamp(1.0, f64::from(room / PROPENSITY_BLOCK).max(1.0));
                (blocks as u32 * PROPENSITY_BLOCK).min(room)
            } else {
                cap
            };
            draw(fresh, &mut hits);
            let total = f64::from(fresh);
            // hits / N is unbiased, zeros included; with ε > 0 the ε / n term keeps every
            // placement above zero. Only without it does a served placement that no fresh
            // ranking produced (so its probability is not zero) need a floor: half a ranking's
            // worth, a bias of at most 0.5 / N.
            let floor = if eps > 0.0 { 0.0 } else { 0.5 / total };
            hits.iter().map(|&h| if h == 0 { floor } else { f64::from(h) / total }).collect()
        }
        Strategy::Ucb { .. } | Strategy::Greedy => {
            (0..k).map(|pos| if ranked[pos] == order[pos] { 1.0 } else { 0.0 }).collect()
        }
    };
    order
        .iter()
        .enumerate()
        .map(|(pos, &i)| Placement {
            item_id: candidates[i].clone(),
            position: pos as u32 + 1,
            // A convex mix of probabilities: within [ε / n, 1] up to rounding, which the
            // bounds make exact.
            propensity: ((1.0 - eps) * base[pos] + eps / n as f64).clamp(eps / n as f64, 1.0),
            score: scores[i],
        })
        .collect()
}
