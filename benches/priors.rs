//! Empirical-Bayes against the flat Beta(1, 1) prior: cumulative regret of Thompson sampling
//! over the first impressions, on items whose true click rates are drawn from a Beta, with the
//! same rates and seeds for both priors (`banditflow::simulate`, learning through the core's
//! record path after every impression). Prints a Markdown table for BENCHMARKS.md.
//!
//! Run: `cargo bench --bench priors` (BENCH_SEEDS sets the seeds per cell, default 16).

use std::time::Instant;

use banditflow::config::Config;
use banditflow::core::params::{CoreSpec, Examination, PositionModel, Prior};
use banditflow::simulate::thompson_regret_curve;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

/// The default config's first model, made plain: every position examined, no decay, a click
/// worth 1 at scale 1, and the flat prior or the empirical one.
fn spec(empirical: bool) -> CoreSpec {
    let mut core = Config::from_layers(None, Vec::new()).expect("default config").core;
    core.models.truncate(1);
    let m = &mut core.models[0];
    m.position = PositionModel::Pbm(Examination::Fixed(vec![1.0]));
    m.half_life_ms = 0;
    m.prior = Prior { alpha: 1.0, beta: 1.0 };
    m.segment_priors.clear();
    m.empirical_prior = empirical;
    m.rewards.scale = 1.0;
    core.rewards.scale = 1.0;
    core
}

fn main() {
    let seeds: u64 = std::env::var("BENCH_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let horizons = [300, 1_000, 3_000, 10_000];
    let rounds = horizons[horizons.len() - 1];
    let (flat, empirical) = (spec(false), spec(true));
    let started = Instant::now();
    println!(
        "| true rates | items | empirical / flat regret after 300 | 1,000 | 3,000 | 10,000 impressions |"
    );
    println!("|---|---|---|---|---|---|");
    for (a, b) in [(2.0, 98.0), (2.0, 18.0), (1.0, 9.0)] {
        for items in [20, 100] {
            let (mut f, mut e) = (vec![0.0; horizons.len()], vec![0.0; horizons.len()]);
            for seed in 0..seeds {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let truth = Beta::new(a, b).expect("beta");
                let rates: Vec<f64> = (0..items).map(|_| truth.sample(&mut rng)).collect();
                let cf = thompson_regret_curve(&flat, &rates, rounds, seed);
                let ce = thompson_regret_curve(&empirical, &rates, rounds, seed);
                for (i, h) in horizons.iter().enumerate() {
                    f[i] += cf[h - 1];
                    e[i] += ce[h - 1];
                }
            }
            let r: Vec<String> = f.iter().zip(&e).map(|(x, y)| format!("{:.2}", y / x)).collect();
            println!("| Beta({a}, {b}) | {items} | {} |", r.join(" | "));
        }
    }
    println!("({seeds} seeds per cell, {:.1} s)", started.elapsed().as_secs_f64());
}
