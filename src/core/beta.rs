//! The central 95 % credible interval of a Beta posterior (the replay report's intervals):
//! bisection on the regularized incomplete beta function.

use super::model::BetaPosterior;

impl BetaPosterior {
    /// Central 95 % credible interval, by bisection on the regularized incomplete beta function.
    pub fn interval95(&self) -> (f64, f64) {
        (beta_quantile(self.alpha, self.beta, 0.025), beta_quantile(self.alpha, self.beta, 0.975))
    }
}

fn beta_quantile(a: f64, b: f64, q: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if reg_inc_beta(a, b, mid) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Regularized incomplete beta I_x(a, b) by Lentz's continued fraction.
fn reg_inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - reg_inc_beta(b, a, 1.0 - x);
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp() / a;
    let tiny = 1e-300;
    let (mut f, mut c, mut d) = (1.0f64, 1.0f64, 0.0f64);
    for i in 0..400 {
        let m = f64::from(i / 2);
        let num = if i == 0 {
            1.0
        } else if i % 2 == 0 {
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m))
        } else {
            -((a + m) * (a + b + m) * x) / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))
        };
        d = 1.0 + num * d;
        d = if d.abs() < tiny { tiny } else { d };
        d = 1.0 / d;
        c = 1.0 + num / c;
        c = if c.abs() < tiny { tiny } else { c };
        let cd = c * d;
        f *= cd;
        if (1.0 - cd).abs() < 1e-14 {
            break;
        }
    }
    front * (f - 1.0)
}

/// Lanczos approximation (g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_interval_matches_known_quantiles() {
        // Beta(1,1) is uniform; Beta(2,8) quantiles from tables: 0.0281, 0.4822.
        let (lo, hi) = BetaPosterior { alpha: 1.0, beta: 1.0 }.interval95();
        assert!((lo - 0.025).abs() < 1e-9 && (hi - 0.975).abs() < 1e-9);
        let (lo, hi) = BetaPosterior { alpha: 2.0, beta: 8.0 }.interval95();
        assert!((lo - 0.0281).abs() < 5e-4, "{lo}");
        assert!((hi - 0.4822).abs() < 5e-4, "{hi}");
    }
}
