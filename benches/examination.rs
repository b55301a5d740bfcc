//! The estimated examination curve against the simulator's truth: a Beta model with
//! `examination = "estimated"` learns a log of slates of 10 over 50 items
//! (`simulate::position_log`), and its curve (maximum likelihood, read time) is compared with the true one, with
//! the inverse-propensity estimate of older builds (`ModelShard::ips_examination`) and with an
//! oracle that knows every item's true attractiveness (`simulate::oracle_examination`), on the
//! same data. Error: mean |γ̂_k − γ_k| over positions 2–10 (γ relative to position 1); bias:
//! the mean signed error. Logging designs: a deterministic treatment order with a 10 % or 30 %
//! uniformly random holdout, and uniformly random slates.
//!
//! Run: `cargo bench --bench examination` (BENCH_SEEDS, default 10; BENCH_SIZES, default
//! "50000,200000,1000000").

use banditflow::simulate::{self, Logging};
use rand::{Rng, SeedableRng};

fn main() {
    let seeds: u64 = std::env::var("BENCH_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "50000,200000,1000000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let config = simulate::experiment_config("examination = \"estimated\"").expect("config");
    let truth: Vec<f64> = (1..=10).map(simulate::context_examination).collect();
    println!("| logging | impressions | MLE error | oracle error | MLE / oracle | MLE bias (95 % CI over seeds) | IPS error (older builds) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, logging) in [
        ("deterministic + 10 % holdout", Logging::Deterministic { holdout: 0.1 }),
        ("deterministic + 30 % holdout", Logging::Deterministic { holdout: 0.3 }),
        ("randomised", Logging::Random),
    ] {
        for &n in &sizes {
            let (mut em, mut oracle, mut ips) = (0.0, 0.0, 0.0);
            let mut biases = Vec::new();
            for seed in 0..seeds {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let theta: Vec<f64> = (0..50).map(|_| rng.random_range(0.02..0.3)).collect();
                let (log, counts) = simulate::position_log(&theta, &truth, logging, n, seed);
                let state = simulate::learn_records(&config.core, &log);
                let shard = &state.models[0];
                let err = |g: &[f64]| (1..10).map(|k| (g[k] - truth[k]).abs()).sum::<f64>() / 9.0;
                let fitted = shard.estimated_examination();
                em += err(&fitted);
                biases.push((1..10).map(|k| fitted[k] - truth[k]).sum::<f64>() / 9.0);
                oracle += err(&simulate::oracle_examination(&theta, &counts));
                ips += err(&shard.ips_examination());
            }
            let s = seeds as f64;
            let bias = biases.iter().sum::<f64>() / s;
            let sd =
                (biases.iter().map(|b| (b - bias) * (b - bias)).sum::<f64>() / (s - 1.0).max(1.0)).sqrt();
            println!(
                "| {name} | {n} | {:.4} | {:.4} | {:.2} | {:+.4} ± {:.4} | {:.4} |",
                em / s,
                oracle / s,
                em / oracle,
                bias,
                1.96 * sd / s.sqrt(),
                ips / s
            );
        }
    }
}
