//! Linear model over hashed features: the sufficient statistics `Σ w x xᵀ` and `Σ r x`, and
//! the small dense algebra (Cholesky, triangular solves) that LinTS and LinUCB need.
//!
//! Features are hashed with xxh3 under a configured seed (never a per-process random seed), so
//! the same event maps to the same vector on every machine and in every run.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Hashed feature vector of showing `item` in a context: an item indicator, a segment × item
/// cross, and each named context feature crossed with the item; signed hashing halves the bias
/// of collisions; the vector is scaled to unit length.
pub fn features(
    dim: usize,
    seed: u64,
    segment: &str,
    context: &[(String, f64)],
    item: &str,
    out: &mut Vec<f64>,
) {
    out.clear();
    out.resize(dim, 0.0);
    if dim == 0 {
        return;
    }
    let mut put = |parts: &[&str], v: f64| {
        let mut h = seed;
        for p in parts {
            h = xxh3_64_with_seed(p.as_bytes(), h ^ 0x9e37_79b9_7f4a_7c15);
        }
        let idx = (h % dim as u64) as usize;
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        out[idx] += sign * v;
    };
    put(&["i", item], 1.0);
    put(&["s", segment, item], 1.0);
    for (name, v) in context {
        put(&["f", name, item], *v);
    }
    let mut norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !norm.is_finite() {
        // Squares of huge values overflow: scale by the largest first (only then, so ordinary
        // vectors keep their exact bits).
        let max = out.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if max.is_finite() && max > 0.0 {
            out.iter_mut().for_each(|v| *v /= max);
        } else {
            out.iter_mut().for_each(|v| *v = 0.0);
        }
        norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
    }
    if norm > 0.0 {
        for v in out.iter_mut() {
            *v /= norm;
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinearState {
    pub dim: usize,
    /// Upper triangle of Σ w x xᵀ, row-major packed: (i, j≥i) at i*dim - i*(i-1)/2 + (j - i).
    pub xx: Vec<f64>,
    /// Σ r x.
    pub xr: Vec<f64>,
    /// Item exposures learned from impressions (cascade corrections are not counted, so the
    /// count does not depend on the order feedback arrives in).
    pub updates: u64,
}

impl LinearState {
    pub fn new(dim: usize) -> LinearState {
        LinearState { dim, xx: vec![0.0; dim * (dim + 1) / 2], xr: vec![0.0; dim], updates: 0 }
    }

    /// Adds `w · x xᵀ` (an exposure; `w` negative retracts one).
    pub fn add_exposure(&mut self, x: &[f64], w: f64) {
        let d = self.dim;
        let mut k = 0;
        for i in 0..d {
            let wi = w * x[i];
            if wi == 0.0 {
                k += d - i;
                continue;
            }
            for xj in &x[i..d] {
                self.xx[k] += wi * xj;
                k += 1;
            }
        }
    }

    /// Adds `r · x` (a reward).
    pub fn add_reward(&mut self, x: &[f64], r: f64) {
        for (b, xi) in self.xr.iter_mut().zip(x) {
            *b += r * xi;
        }
    }

    pub fn scale(&mut self, f: f64) {
        self.xx.iter_mut().for_each(|v| *v *= f);
        self.xr.iter_mut().for_each(|v| *v *= f);
    }

    pub fn add(&mut self, other: &LinearState) {
        self.xx.iter_mut().zip(&other.xx).for_each(|(a, b)| *a += b);
        self.xr.iter_mut().zip(&other.xr).for_each(|(a, b)| *a += b);
        self.updates += other.updates;
    }

    /// Posterior pieces at decay factor `f`: the Cholesky factor of A = λI + f Σ xxᵀ and the
    /// mean θ̂ = A⁻¹ f Σ r x. `None` if A is not positive definite (only with λ ≤ 0 and no data).
    pub fn posterior(&self, lambda: f64, f: f64) -> Option<Posterior> {
        let d = self.dim;
        let mut a = vec![0.0; d * d];
        let mut k = 0;
        for i in 0..d {
            for j in i..d {
                let v = f * self.xx[k] + if i == j { lambda } else { 0.0 };
                a[i * d + j] = v;
                a[j * d + i] = v;
                k += 1;
            }
        }
        let l = cholesky(&a, d)?;
        let b: Vec<f64> = self.xr.iter().map(|v| v * f).collect();
        let y = forward(&l, d, &b);
        let mean = backward(&l, d, &y);
        Some(Posterior { dim: d, l, mean })
    }
}

/// `A = L Lᵀ` and `θ̂`.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub dim: usize,
    /// Lower-triangular Cholesky factor, row-major d×d.
    pub l: Vec<f64>,
    pub mean: Vec<f64>,
}

impl Posterior {
    /// `sqrt(xᵀ A⁻¹ x)` = ‖L⁻¹ x‖, the LinUCB width.
    pub fn width(&self, x: &[f64]) -> f64 {
        forward(&self.l, self.dim, x).iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// A draw θ = θ̂ + v L⁻ᵀ z with z standard normal, so Cov θ = v² A⁻¹.
    pub fn sample(&self, v: f64, z: &[f64]) -> Vec<f64> {
        let u = backward(&self.l, self.dim, z);
        self.mean.iter().zip(u).map(|(m, u)| m + v * u).collect()
    }
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Solves L y = b.
fn forward(l: &[f64], d: usize, b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; d];
    for i in 0..d {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * d + k] * y[k];
        }
        y[i] = s / l[i * d + i];
    }
    y
}

/// Solves Lᵀ x = y.
fn backward(l: &[f64], d: usize, y: &[f64]) -> Vec<f64> {
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let mut s = y[i];
        for k in i + 1..d {
            s -= l[k * d + i] * x[k];
        }
        x[i] = s / l[i * d + i];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posterior_mean_solves_ridge_regression() {
        // One feature direction observed with reward 1 each time: θ̂·x → n/(n+λ).
        let mut s = LinearState::new(3);
        let x = [1.0, 0.0, 0.0];
        for _ in 0..9 {
            s.add_exposure(&x, 1.0);
            s.add_reward(&x, 1.0);
        }
        let p = s.posterior(1.0, 1.0).expect("positive definite");
        assert!((p.mean[0] - 0.9).abs() < 1e-12);
        assert!((p.width(&x) - (0.1f64).sqrt()).abs() < 1e-12);
        assert_eq!(p.mean[1], 0.0);
    }

    #[test]
    fn features_are_unit_length_and_stable() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        features(16, 7, "women", &[("mobile".into(), 1.0)], "sku-1", &mut a);
        features(16, 7, "women", &[("mobile".into(), 1.0)], "sku-1", &mut b);
        assert_eq!(a, b);
        assert!((dot(&a, &a) - 1.0).abs() < 1e-12);
    }
}
