//! Disjoint linear model per arm (LinTS / LinUCB, Li et al. 2010): every (segment, item) arm
//! keeps its own sufficient statistics `Σ w x xᵀ` and `Σ r x` over the context's feature vector
//! `x`, so the best item may differ from one context to the next, and the statistics stay
//! additive (exactly mergeable, decayed by scaling) like the Beta arms'.
//!
//! `x` is an intercept (`x₀ = 1`) followed by the context features: at their configured index
//! when `linear.features` names them, else hashed with xxh3 under a configured seed (never a
//! per-process seed) into the remaining `dim − 1` slots with a random sign. Feature values
//! enter clipped to ±[`FEATURE_CLIP`].
//!
//! The prior ties the model to the Beta model's: the intercept's prior is the Beta prior in
//! force for the segment (mean μ₀ = α₀/(α₀+β₀), precision n₀ = α₀+β₀ pseudo-exposures), the
//! other coefficients' prior is N(0, 1/λ). Without context features an arm's posterior mean is
//! therefore exactly its Beta posterior mean, and its Thompson spread the Beta spread's normal
//! approximation.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bound on a feature value as the linear model sees it. Context features are meant to be
/// scaled to about [−1, 1]; a value in the thousands is a unit error whose square would swamp
/// every other direction of an arm's `Σ x xᵀ`.
pub const FEATURE_CLIP: f64 = 100.0;

/// Largest `linear.dim`: an arm keeps d(d+3)/2 numbers (560 at 32: 4.4 KB).
pub const MAX_DIM: u32 = 32;

/// Length of one arm's statistics: the packed upper triangle of `Σ w x xᵀ`, then `Σ r x`.
pub fn stats_len(d: usize) -> usize {
    d * (d + 1) / 2 + d
}

/// How context features map onto `x`.
#[derive(Debug, Clone, Copy)]
pub struct FeatureSpace<'a> {
    pub dim: usize,
    pub hash_seed: u64,
    /// Configured feature names: feature `names[i]` goes to `x[i + 1]`, others are ignored.
    /// Empty: hashed.
    pub names: &'a [String],
}

impl FeatureSpace<'_> {
    /// The feature vector of a context.
    pub fn vector(&self, context: &[(String, f64)], out: &mut Vec<f64>) {
        out.clear();
        out.resize(self.dim, 0.0);
        if self.dim == 0 {
            return;
        }
        out[0] = 1.0;
        if self.dim == 1 {
            return;
        }
        for (name, v) in context {
            let v = v.clamp(-FEATURE_CLIP, FEATURE_CLIP);
            if !self.names.is_empty() {
                if let Some(i) = self.names.iter().position(|n| n == name) {
                    if i + 1 < self.dim {
                        out[i + 1] += v;
                    }
                }
                continue;
            }
            let h = xxh3_64_with_seed(name.as_bytes(), self.hash_seed ^ 0x9e37_79b9_7f4a_7c15);
            let idx = 1 + (h % (self.dim as u64 - 1)) as usize;
            let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
            out[idx] += sign * v;
        }
    }
}

/// Adds `w · x xᵀ` to an arm's statistics (an exposure; `w` negative retracts one). Empty
/// statistics (an arm that never had a linear update) are allocated here.
pub fn add_exposure(stats: &mut Vec<f64>, x: &[f64], w: f64) {
    let d = x.len();
    if stats.len() != stats_len(d) {
        stats.clear();
        stats.resize(stats_len(d), 0.0);
    }
    let mut k = 0;
    for i in 0..d {
        let wi = w * x[i];
        if wi == 0.0 {
            k += d - i;
            continue;
        }
        for xj in &x[i..d] {
            stats[k] += wi * xj;
            k += 1;
        }
    }
}

/// Adds `r · x` (a reward).
pub fn add_reward(stats: &mut Vec<f64>, x: &[f64], r: f64) {
    let d = x.len();
    if stats.len() != stats_len(d) {
        stats.clear();
        stats.resize(stats_len(d), 0.0);
    }
    let tri = d * (d + 1) / 2;
    for (b, xi) in stats[tri..].iter_mut().zip(x) {
        *b += r * xi;
    }
}

/// The Gaussian prior of one arm's coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearPrior {
    /// Prior mean of the intercept (the segment's prior click rate).
    pub mean0: f64,
    /// Prior precision of the intercept, in pseudo-exposures.
    pub n0: f64,
    /// Prior precision of every other coefficient.
    pub lambda: f64,
}

impl LinearPrior {
    pub fn from_beta(alpha: f64, beta: f64, lambda: f64) -> LinearPrior {
        let n0 = (alpha + beta).max(1e-9);
        LinearPrior { mean0: alpha.max(0.0) / n0, n0, lambda }
    }
}

/// Posterior of an arm at decay factor `f`: A = P + f Σ w x xᵀ (P = diag(n₀, λ, …, λ)) and
/// θ̂ = A⁻¹ (P m₀ + f Σ r x). Empty statistics give the prior. `None` if A is not positive
/// definite (non-finite statistics).
pub fn posterior(stats: &[f64], d: usize, prior: LinearPrior, f: f64) -> Option<ArmPosterior> {
    let tri = d * (d + 1) / 2;
    let has = stats.len() == stats_len(d);
    // A in packed lower-triangular row-major order, (i, j ≤ i) at i(i+1)/2 + j, from the
    // stored upper triangle, (i, j ≥ i) at i*d − i(i−1)/2 + (j − i).
    let mut a = vec![0.0; tri];
    for i in 0..d {
        for j in 0..=i {
            let data = if has { f * stats[upper_index(d, j, i)] } else { 0.0 };
            let diag = if i == j {
                if i == 0 {
                    prior.n0
                } else {
                    prior.lambda
                }
            } else {
                0.0
            };
            a[i * (i + 1) / 2 + j] = data + diag;
        }
    }
    let l = cholesky_packed(&a, d)?;
    let mut b = vec![0.0; d];
    if d > 0 {
        b[0] = prior.n0 * prior.mean0;
    }
    if has {
        for (bi, s) in b.iter_mut().zip(&stats[tri..]) {
            *bi += f * s;
        }
    }
    let y = forward(&l, d, &b);
    let mean = backward(&l, d, &y);
    if mean.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(ArmPosterior { l, mean })
}

/// Index of (i, j ≥ i) in the packed upper triangle.
fn upper_index(d: usize, i: usize, j: usize) -> usize {
    // Rows before i hold d, d − 1, …, d − i + 1 entries.
    i * d - i * i.saturating_sub(1) / 2 + (j - i)
}

/// Prepared posteriors of a model's arms: segment → item → posterior.
pub type PosteriorTable = super::model::HashMap<String, super::model::HashMap<String, ArmPosterior>>;

/// One arm's posterior: `A = L Lᵀ` (L packed lower-triangular) and `θ̂`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmPosterior {
    pub l: Vec<f64>,
    pub mean: Vec<f64>,
}

impl ArmPosterior {
    /// `θ̂·x`.
    pub fn score(&self, x: &[f64]) -> f64 {
        dot(&self.mean, x)
    }

    /// `sqrt(xᵀ A⁻¹ x)` = ‖L⁻¹ x‖: the LinUCB width, and the spread of θ·x per unit of noise.
    pub fn width(&self, x: &[f64]) -> f64 {
        forward(&self.l, self.mean.len(), x).iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// Mean and standard deviation of θ·x under the posterior, with the Bernoulli noise scale
    /// √(m(1 − m)) at the mean m (clamped to [0.001, 0.999]): the normal approximation of the
    /// Beta posterior when `x` is the intercept alone.
    pub fn mean_sd(&self, x: &[f64]) -> (f64, f64) {
        let m = self.score(x);
        let p = m.clamp(0.001, 0.999);
        (m, (p * (1.0 - p)).sqrt() * self.width(x))
    }
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cholesky_packed(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; a.len()];
    for i in 0..d {
        let ri = i * (i + 1) / 2;
        for j in 0..=i {
            let rj = j * (j + 1) / 2;
            let mut s = a[ri + j];
            for k in 0..j {
                s -= l[ri + k] * l[rj + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[ri + i] = s.sqrt();
            } else {
                l[ri + j] = s / l[rj + j];
            }
        }
    }
    Some(l)
}

/// Solves L y = b (L packed lower).
fn forward(l: &[f64], d: usize, b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; d];
    for i in 0..d {
        let ri = i * (i + 1) / 2;
        let mut s = b[i];
        for k in 0..i {
            s -= l[ri + k] * y[k];
        }
        y[i] = s / l[ri + i];
    }
    y
}

/// Solves Lᵀ x = y.
fn backward(l: &[f64], d: usize, y: &[f64]) -> Vec<f64> {
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let mut s = y[i];
        for k in i + 1..d {
            s -= l[k * (k + 1) / 2 + i] * x[k];
        }
        x[i] = s / l[i * (i + 1) / 2 + i];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercept_alone_gives_the_beta_posterior_mean() {
        // Closed form: Beta(α₀ + S, β₀ + E − S) has mean (α₀ + S)/(α₀ + β₀ + E).
        let space = FeatureSpace { dim: 1, hash_seed: 0, names: &[] };
        let mut x = Vec::new();
        space.vector(&[("ignored".into(), 3.0)], &mut x);
        assert_eq!(x, vec![1.0]);
        let mut s = Vec::new();
        for k in 0..40 {
            add_exposure(&mut s, &x, 1.0);
            if k % 4 == 0 {
                add_reward(&mut s, &x, 1.0);
            }
        }
        let p = posterior(&s, 1, LinearPrior::from_beta(2.0, 18.0, 1.0), 1.0).expect("pd");
        assert!((p.score(&x) - 12.0 / 60.0).abs() < 1e-12);
        assert!((p.width(&x) - (1.0f64 / 60.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn posterior_mean_solves_ridge_regression() {
        // Two named features, rewards r = 0.1 + 0.3 a − 0.05 b exactly: with many exposures the
        // ridge solution approaches the true coefficients (closed form of least squares).
        let names = vec!["a".to_string(), "b".to_string()];
        let space = FeatureSpace { dim: 3, hash_seed: 0, names: &names };
        let mut s = Vec::new();
        let mut x = Vec::new();
        for k in 0..2_000 {
            let a = f64::from(k % 7) / 7.0;
            let b = f64::from(k % 5) / 5.0;
            space.vector(&[("b".into(), b), ("a".into(), a), ("other".into(), 9.0)], &mut x);
            assert_eq!(x, vec![1.0, a, b]);
            add_exposure(&mut s, &x, 1.0);
            add_reward(&mut s, &x, 0.1 + 0.3 * a - 0.05 * b);
        }
        let p = posterior(&s, 3, LinearPrior { mean0: 0.1, n0: 1.0, lambda: 1.0 }, 1.0).expect("pd");
        assert!((p.mean[0] - 0.1).abs() < 2e-3, "{:?}", p.mean);
        assert!((p.mean[1] - 0.3).abs() < 5e-3, "{:?}", p.mean);
        assert!((p.mean[2] + 0.05).abs() < 5e-3, "{:?}", p.mean);
    }

    #[test]
    fn hashed_features_are_stable_and_clipped() {
        let space = FeatureSpace { dim: 8, hash_seed: 7, names: &[] };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        space.vector(&[("mobile".into(), 1.0)], &mut a);
        space.vector(&[("mobile".into(), 1.0)], &mut b);
        assert_eq!(a, b);
        assert_eq!(a[0], 1.0);
        assert_eq!(a.iter().map(|v| v.abs()).sum::<f64>(), 2.0);
        space.vector(&[("mobile".into(), 1e12)], &mut a);
        assert_eq!(a.iter().map(|v| v.abs()).fold(0.0, f64::max), FEATURE_CLIP);
    }
}
