//! The examination curve of the position-based model, fitted by maximum likelihood at read time.
//!
//! Model: a placement of arm `i` at position `k` is clicked with probability `θ_i γ_k`. Data:
//! each arm's (decayed) exposures `n_ik` and clicks `c_ik` per position — additive sums kept in
//! the arms, so the fit sees exactly what a merged model holds. In log parameters
//! `a_i = ln θ_i`, `b_k = ln γ_k` the log-likelihood
//!
//! ```text
//! L = Σ_ik c_ik (a_i + b_k) + (n_ik − c_ik) ln(1 − e^(a_i + b_k))
//! ```
//!
//! is concave (ln(1 − eˣ) is), so Newton's method with a backtracking line search finds the
//! one maximum. The scale is fixed by `b_1 = 0` (γ relative to position 1). The Hessian has a
//! diagonal block per arm, so each step eliminates the arms and solves a (K − 1) × (K − 1)
//! system: O(arms · K²) per step, and a few dozen steps. EM (Chuklin et al., "Click Models for
//! Web Search", 2015) reaches the same maximum but crawls along the ridge a deterministic
//! treatment order makes (an item always at one position fixes only θ_i γ_k(i)): thousands of
//! iterations to get where Newton gets in ten.
//!
//! A weak prior keeps every maximum interior — ε (ln θ + ln(1 − θ)) per arm and ε (ln γ − γ)
//! per position, ε = 10⁻³ pseudo-observations, concave in the log parameters too — so an arm
//! without clicks or with nothing but clicks does not drive a parameter to a boundary. Its pull
//! on γ is ε against the data's thousands of exposures.

/// Pseudo-observations of the prior that keeps the maximum interior.
const EPSILON: f64 = 1e-3;
const MAX_STEPS: usize = 100;
/// Converged when no log parameter moves more than this in a step.
const TOLERANCE: f64 = 1e-10;

/// The maximum-likelihood examination curve of `k` positions from per-arm (exposures, clicks)
/// per position (index 0 = position 1), relative to position 1 and clamped to [0.01, 1];
/// 1 for a position nothing was shown at (and for all of them when position 1 has no
/// exposures). Clicks above exposures count as exposures.
pub fn fit<'a>(arms: impl Iterator<Item = (&'a [f64], &'a [f64])>, k: usize) -> Vec<f64> {
    // Cells per arm with exposures: (position, n, c).
    let arms: Vec<Vec<(usize, f64, f64)>> = arms
        .map(|(n, c)| {
            n.iter()
                .enumerate()
                .take(k)
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .map(|(p, &v)| {
                    (p, v, c.get(p).copied().filter(|c| c.is_finite()).unwrap_or(0.0).clamp(0.0, v))
                })
                .collect::<Vec<_>>()
        })
        .filter(|cells: &Vec<_>| !cells.is_empty())
        .collect();
    let mut shown = vec![0.0f64; k];
    for cells in &arms {
        for &(p, n, _) in cells {
            shown[p] += n;
        }
    }
    if k == 0 || shown[0] <= 0.0 {
        return vec![1.0; k];
    }
    // Free positions (b_1 = 0 is fixed): those with exposures, position 1 excluded.
    let free: Vec<usize> = (1..k).filter(|&p| shown[p] > 0.0).collect();
    let slot = |p: usize| free.iter().position(|&q| q == p);
    // Start: γ = 1, θ_i = the arm's click rate (kept inside (0, 1)).
    let mut b = vec![0.0f64; k];
    let mut a: Vec<f64> = arms
        .iter()
        .map(|cells| {
            let (n, c) = cells.iter().fold((0.0, 0.0), |(n, c), &(_, cn, cc)| (n + cn, c + cc));
            ((c + EPSILON) / (n + 2.0 * EPSILON)).ln()
        })
        .collect();
    let mut value = log_likelihood(&arms, &a, &b, &free);
    for _ in 0..MAX_STEPS {
        let Some((da, db)) = newton_step(&arms, &a, &b, &free, &slot) else { break };
        // Backtracking: the step must keep every probability below 1 and raise L.
        let mut t = 1.0;
        let mut moved = false;
        for _ in 0..60 {
            let a2: Vec<f64> = a.iter().zip(&da).map(|(x, d)| x + t * d).collect();
            let mut b2 = b.clone();
            for (j, &p) in free.iter().enumerate() {
                b2[p] += t * db[j];
            }
            let v2 = log_likelihood(&arms, &a2, &b2, &free);
            if v2.is_finite() && v2 >= value {
                a = a2;
                b = b2;
                value = v2;
                moved = true;
                break;
            }
            t *= 0.5;
        }
        let size = da.iter().chain(&db).fold(0.0f64, |m, d| m.max((t * d).abs()));
        if !moved || size < TOLERANCE {
            break;
        }
    }
    (0..k).map(|p| if p == 0 || shown[p] <= 0.0 { 1.0 } else { b[p].exp().clamp(0.01, 1.0) }).collect()
}

/// L with the prior; −∞ outside the domain (a probability of 1 or more where there are skips).
fn log_likelihood(arms: &[Vec<(usize, f64, f64)>], a: &[f64], b: &[f64], free: &[usize]) -> f64 {
    let mut l = 0.0;
    for (cells, &ai) in arms.iter().zip(a) {
        if ai >= 0.0 {
            return f64::NEG_INFINITY;
        }
        l += EPSILON * (ai + (-ai.exp()).ln_1p());
        for &(p, n, c) in cells {
            let x = ai + b[p];
            let skips = n - c;
            if skips > 0.0 {
                if x >= 0.0 {
                    return f64::NEG_INFINITY;
                }
                l += skips * (-x.exp()).ln_1p();
            }
            l += c * x;
        }
    }
    for &p in free {
        l += EPSILON * (b[p] - b[p].exp());
    }
    l
}

/// The Newton direction (Δa, Δb over the free positions), or None when the reduced system is
/// not positive definite (numerically flat).
fn newton_step(
    arms: &[Vec<(usize, f64, f64)>],
    a: &[f64],
    b: &[f64],
    free: &[usize],
    slot: &dyn Fn(usize) -> Option<usize>,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let m = free.len();
    // −H = [[D_a, W], [Wᵀ, D_b]], g = ∇L; solve (−H) Δ = g by eliminating the arms.
    let mut gb = vec![0.0f64; m];
    let mut db_diag = vec![0.0f64; m];
    let mut schur = vec![0.0f64; m * m];
    let mut rhs = vec![0.0f64; m];
    // Per arm: its gradient, its diagonal of −H, and its row of W over the free positions.
    type ArmTerms = (f64, f64, Vec<(usize, f64)>);
    let mut per_arm: Vec<ArmTerms> = Vec::with_capacity(arms.len());
    for (cells, &ai) in arms.iter().zip(a) {
        let theta = ai.exp();
        // Prior: ε (a + ln(1 − eᵃ)).
        let mut ga = EPSILON * (1.0 - theta / (1.0 - theta));
        let mut da = EPSILON * theta / ((1.0 - theta) * (1.0 - theta));
        let mut w_row: Vec<(usize, f64)> = Vec::with_capacity(cells.len());
        for &(p, n, c) in cells {
            let q = (ai + b[p]).exp();
            let skips = n - c;
            let r = if skips > 0.0 { skips * q / (1.0 - q) } else { 0.0 };
            let w = if skips > 0.0 { skips * q / ((1.0 - q) * (1.0 - q)) } else { 0.0 };
            ga += c - r;
            da += w;
            if let Some(j) = slot(p) {
                gb[j] += c - r;
                db_diag[j] += w;
                w_row.push((j, w));
            }
        }
        per_arm.push((ga, da, w_row));
    }
    for (j, &p) in free.iter().enumerate() {
        let g = b[p].exp();
        gb[j] += EPSILON * (1.0 - g);
        db_diag[j] += EPSILON * g;
        schur[j * m + j] += db_diag[j];
        rhs[j] += gb[j];
    }
    for (ga, da, w_row) in &per_arm {
        if *da <= 0.0 {
            return None;
        }
        for &(j, wj) in w_row {
            rhs[j] -= wj * ga / da;
            for &(l, wl) in w_row {
                schur[j * m + l] -= wj * wl / da;
            }
        }
    }
    let db = solve_spd(&mut schur, &rhs, m)?;
    let da = per_arm
        .iter()
        .map(|(ga, da, w_row)| (ga - w_row.iter().map(|&(j, w)| w * db[j]).sum::<f64>()) / da)
        .collect();
    Some((da, db))
}

/// Solves S x = r for symmetric positive definite S (m × m, row-major; overwritten by its
/// Cholesky factor).
fn solve_spd(s: &mut [f64], r: &[f64], m: usize) -> Option<Vec<f64>> {
    for i in 0..m {
        for j in 0..=i {
            let mut v = s[i * m + j];
            for k in 0..j {
                v -= s[i * m + k] * s[j * m + k];
            }
            if i == j {
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                s[i * m + i] = v.sqrt();
            } else {
                s[i * m + j] = v / s[j * m + j];
            }
        }
    }
    let mut y = vec![0.0; m];
    for i in 0..m {
        let mut v = r[i];
        for k in 0..i {
            v -= s[i * m + k] * y[k];
        }
        y[i] = v / s[i * m + i];
    }
    let mut x = vec![0.0; m];
    for i in (0..m).rev() {
        let mut v = y[i];
        for k in i + 1..m {
            v -= s[k * m + i] * x[k];
        }
        x[i] = v / s[i * m + i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noiseless_counts_give_back_the_curve() {
        // Expected counts of a known model (every arm at every position, large n): the
        // maximum-likelihood curve is the true one (closed form: the data are its own fit).
        let gamma = [1.0, 0.7, 0.5, 0.2];
        let theta = [0.05, 0.1, 0.3, 0.6];
        let n: Vec<Vec<f64>> = theta.iter().map(|_| vec![1e6; 4]).collect();
        let c: Vec<Vec<f64>> = theta.iter().map(|t| gamma.iter().map(|g| 1e6 * g * t).collect()).collect();
        let fitted = fit(n.iter().zip(&c).map(|(n, c)| (&n[..], &c[..])), 4);
        for (f, g) in fitted.iter().zip(gamma) {
            assert!((f - g).abs() < 1e-6, "{fitted:?}");
        }
        // A deterministic order (arm i only at position i) plus a small uniform share.
        let n: Vec<Vec<f64>> =
            (0..4).map(|i| (0..4).map(|p| if p == i { 9e5 } else { 1e5 / 4.0 }).collect()).collect();
        let c: Vec<Vec<f64>> =
            (0..4).map(|i| (0..4).map(|p| n[i][p] * gamma[p] * theta[i]).collect()).collect();
        let fitted = fit(n.iter().zip(&c).map(|(n, c)| (&n[..], &c[..])), 4);
        for (f, g) in fitted.iter().zip(gamma) {
            assert!((f - g).abs() < 1e-6, "{fitted:?}");
        }
        // Nothing shown: 1 everywhere.
        assert_eq!(fit(std::iter::empty(), 3), vec![1.0; 3]);
    }
}
