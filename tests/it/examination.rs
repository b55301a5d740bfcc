//! The estimated examination curve (maximum likelihood over per-arm, per-position exposures
//! and clicks) against a simulator's true curve and against an oracle that knows every item's
//! attractiveness, on the same data (the table over sizes and seeds: `cargo bench --bench
//! examination`).

use rand::{Rng, SeedableRng};

use banditflow::simulate::{self, Logging};

/// (error of the model's curve, error of the oracle's) over positions 2–10 for one log.
fn errors(logging: Logging, impressions: usize, seed: u64) -> (f64, f64) {
    let config = simulate::experiment_config("examination = \"estimated\"").expect("config");
    let truth: Vec<f64> = (1..=10).map(simulate::context_examination).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let theta: Vec<f64> = (0..50).map(|_| rng.random_range(0.02..0.3)).collect();
    let (log, counts) = simulate::position_log(&theta, &truth, logging, impressions, seed);
    let state = simulate::learn_records(&config.core, &log);
    let err = |g: &[f64]| (1..10).map(|k| (g[k] - truth[k]).abs()).sum::<f64>() / 9.0;
    (err(&state.models[0].estimated_examination()), err(&simulate::oracle_examination(&theta, &counts)))
}

#[test]
fn randomised_logging_gives_the_oracles_accuracy() {
    // Measured: the fit equals the oracle's error to 1.00× (0.0032 at 200 k, 10 seeds).
    for seed in 0..2 {
        let (model, oracle) = errors(Logging::Random, 200_000, seed);
        println!("randomised, seed {seed}: error {model:.4}, oracle {oracle:.4}");
        assert!(model < 0.006, "error {model:.4}");
        assert!(model <= 1.2 * oracle + 1e-4, "error {model:.4} against the oracle's {oracle:.4}");
    }
}

#[test]
fn a_deterministic_treatment_order_does_not_bias_the_estimate() {
    // The treatment always shows the best item first, the second second, …: clicks per
    // position then mix examination with attractiveness. A 10 % random holdout separates them;
    // the fit must find the true curve (the raw click rate per position is off by 0.1 or more,
    // a curve of 1s by 0.4).
    let (model, oracle) = errors(Logging::Deterministic { holdout: 0.1 }, 1_000_000, 3);
    println!("deterministic + 10 % holdout: error {model:.4}, oracle {oracle:.4}");
    assert!(model < 0.008, "error {model:.4}");
}
