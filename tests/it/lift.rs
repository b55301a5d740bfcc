//! The lift interval against independent oracles: its width against the closed form computed
//! from the raw rewards (two-pass variance), and its coverage of the true difference over many
//! simulated experiments at a realistic size (a 9 % holdout of 4,400 impressions).
//!
//! Rewards per impression are heavily skewed (most impressions earn 0, a few a purchase), and
//! Welch's normal interval then undercovers somewhat: measured 93.3 % for a nominal 95 % here
//! (92.8 % with a holdout of 100). The bound below tolerates that and still catches a wrong
//! standard error (a factor √2 either way gives about 83 % or 99.5 %).

use banditflow::core::model::{lift, VariantStats};
use rand::{Rng, SeedableRng};

/// Per-impression reward distributions: (reward, probability).
const TREATMENT: [(f64, f64); 4] = [(0.0, 0.85), (1.0, 0.08), (3.0, 0.05), (8.0, 0.02)];
const HOLDOUT: [(f64, f64); 4] = [(0.0, 0.90), (1.0, 0.06), (3.0, 0.03), (8.0, 0.01)];

fn mean(d: &[(f64, f64)]) -> f64 {
    d.iter().map(|(r, p)| r * p).sum()
}

fn draw(rng: &mut impl Rng, d: &[(f64, f64)], n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let mut u: f64 = rng.random();
            for (r, p) in d {
                if u < *p {
                    return *r;
                }
                u -= p;
            }
            d[d.len() - 1].0
        })
        .collect()
}

fn stats(rewards: &[f64]) -> VariantStats {
    let micros: Vec<i64> = rewards.iter().map(|r| (r * 1e6).round() as i64).collect();
    VariantStats {
        impressions: rewards.len() as u64,
        reward_micros: micros.iter().sum(),
        reward_sq_micros2: micros.iter().map(|m| i128::from(*m) * i128::from(*m)).sum(),
    }
}

fn sample_variance(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1.0)
}

#[test]
fn lift_interval_has_the_closed_form_width_and_95_percent_coverage() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31);
    let truth = mean(&TREATMENT) - mean(&HOLDOUT);
    let trials = 2000;
    let mut covered = 0;
    for t in 0..trials {
        let (a, b) = (draw(&mut rng, &TREATMENT, 4000), draw(&mut rng, &HOLDOUT, 400));
        let l = lift(&stats(&a), &stats(&b)).expect("enough data");
        let se = (sample_variance(&a) / 4000.0 + sample_variance(&b) / 400.0).sqrt();
        let width = 2.0 * 1.959_963_984_540_054 * se;
        assert!(
            ((l.diff_high - l.diff_low) - width).abs() <= 1e-9 * width.max(1e-12),
            "trial {t}: width {} vs closed form {width}",
            l.diff_high - l.diff_low
        );
        let diff = a.iter().sum::<f64>() / 4000.0 - b.iter().sum::<f64>() / 400.0;
        assert!((l.diff - diff).abs() < 1e-12);
        covered += usize::from(l.diff_low <= truth && truth <= l.diff_high);
    }
    let coverage = covered as f64 / f64::from(trials);
    // Standard error of the coverage estimate over 2000 trials is 0.0049.
    assert!((coverage - 0.95).abs() < 0.03, "coverage {coverage}");
}
