//! Off-policy estimators: the value an evaluation policy would have had on logged rounds, from
//! the logging policy's propensities (Dudík, Langford and Li 2011; Swaminathan and Joachims
//! 2015; the definitions of the Open Bandit Pipeline, which `scripts/ope_crosscheck.py`
//! compares against to 1e-9).
//!
//! A round is one logged placement: the reward it collected, the logging propensity of the
//! item at its position, and what the evaluation policy and the direct-method model say about
//! that position. Intervals are 95 % normal intervals over rounds (the delta method for the
//! self-normalised estimator): valid when rounds are independent and the weights have a finite
//! variance, which the effective sample size lets a reader judge.

/// One logged placement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    /// Reward the placement collected (reward units of the config).
    pub reward: f64,
    /// π_b: the logging policy's probability of this item at this position.
    pub pscore: f64,
    /// π_e: the evaluation policy's probability of this item at this position.
    pub pi: f64,
    /// Σ_a π_e(a) q̂(a) / Σ_a π_e(a) over the candidates at this position (0 if π_e puts no
    /// item there): the direct method's value of the round.
    pub dm: f64,
    /// q̂ of the logged item at this position.
    pub q: f64,
}

/// An estimate with its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub std_error: f64,
    pub low: f64,
    pub high: f64,
}

impl Estimate {
    fn from_terms(value: f64, terms: impl Iterator<Item = f64>, n: f64) -> Estimate {
        let mut sum_sq = 0.0;
        for t in terms {
            sum_sq += (t - value) * (t - value);
        }
        let std_error = if n > 1.0 { (sum_sq / (n - 1.0)).sqrt() / n.sqrt() } else { f64::INFINITY };
        Estimate { value, std_error, low: value - Z95 * std_error, high: value + Z95 * std_error }
    }
}

/// The 97.5 % quantile of the standard normal distribution.
const Z95: f64 = 1.959_963_984_540_054;

/// Every estimate of one evaluation policy on one set of rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub rounds: usize,
    /// The logging policy's own value: the mean reward.
    pub logged: Estimate,
    /// Inverse propensity weighting: mean of w·r, w = π_e / π_b.
    pub ipw: Estimate,
    /// Self-normalised IPW: Σ w·r / Σ w (None when every weight is 0).
    pub snipw: Option<Estimate>,
    /// Direct method: mean of the model's value of each round.
    pub dm: Estimate,
    /// Doubly robust: mean of dm + w·(r − q̂).
    pub dr: Estimate,
    /// Effective sample size of the weights, (Σ w)² / Σ w².
    pub effective_sample_size: f64,
    pub max_weight: f64,
}

fn mean(xs: impl Iterator<Item = f64>, n: f64) -> f64 {
    xs.sum::<f64>() / n
}

/// All estimates over `rounds` (None without rounds).
pub fn estimate(rounds: &[Round]) -> Option<Report> {
    if rounds.is_empty() {
        return None;
    }
    let n = rounds.len() as f64;
    let w = |r: &Round| r.pi / r.pscore;
    let logged_v = mean(rounds.iter().map(|r| r.reward), n);
    let ipw_v = mean(rounds.iter().map(|r| w(r) * r.reward), n);
    let dm_v = mean(rounds.iter().map(|r| r.dm), n);
    let dr_term = |r: &Round| r.dm + w(r) * (r.reward - r.q);
    let dr_v = mean(rounds.iter().map(dr_term), n);
    let mean_w = mean(rounds.iter().map(w), n);
    let snipw = (mean_w > 0.0).then(|| {
        let v = mean(rounds.iter().map(|r| w(r) * r.reward / mean_w), n);
        // Delta method: the influence of a round on the ratio is w (r − V) / mean(w).
        let terms = rounds.iter().map(move |r| w(r) * (r.reward - v) / mean_w);
        let mut e = Estimate::from_terms(0.0, terms, n);
        e.value = v;
        e.low += v;
        e.high += v;
        e
    });
    let sum_w: f64 = rounds.iter().map(w).sum();
    let sum_w2: f64 = rounds.iter().map(|r| w(r) * w(r)).sum();
    Some(Report {
        rounds: rounds.len(),
        logged: Estimate::from_terms(logged_v, rounds.iter().map(|r| r.reward), n),
        ipw: Estimate::from_terms(ipw_v, rounds.iter().map(|r| w(r) * r.reward), n),
        snipw,
        dm: Estimate::from_terms(dm_v, rounds.iter().map(|r| r.dm), n),
        dr: Estimate::from_terms(dr_v, rounds.iter().map(dr_term), n),
        effective_sample_size: if sum_w2 > 0.0 { sum_w * sum_w / sum_w2 } else { 0.0 },
        max_weight: rounds.iter().map(w).fold(0.0, f64::max),
    })
}
