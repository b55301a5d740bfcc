//! The contextual model's learning speed and accuracy: a log of uniformly random slates from a
//! shop whose item appeal depends on three context features (`simulate::ContextShop`, 100 items,
//! slates of 5, position-biased clicks) is generated and encoded first; then the core learns it
//! through `PartitionState::apply` (decode → attribute → update) under each model, timed wall
//! and CPU. The Beta model on the same records is the same-run baseline. Kendall τ per context
//! is the mean over 50 fresh contexts between the true rates and the model's θ̂·x.
//!
//! Run: `cargo bench --bench contextual` (BENCH_IMPRESSIONS, default 1,000,000).

use std::time::Instant;

use banditflow::simulate::{self, context_config, context_examination, context_tau, ContextShop};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let impressions: usize =
        std::env::var("BENCH_IMPRESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let shop = ContextShop::new(100, 3, 5);
    let t = Instant::now();
    let log = simulate::uniform_log(&shop, "m", impressions, 5, context_examination, 1);
    println!(
        "{} impressions → {} records generated in {:.1} s (not timed below)\n",
        impressions,
        log.len(),
        t.elapsed().as_secs_f64()
    );
    println!("| model | dim | events/s | CPU µs/event | Kendall τ per context |");
    println!("|---|---:|---:|---:|---:|");
    for (name, model) in [
        ("beta (baseline)", "algorithm = \"beta\""),
        (
            "linear, named features",
            "algorithm = \"linear\"\nlinear = { features = [\"f0\", \"f1\", \"f2\"] }",
        ),
        ("linear, hashed (default)", "algorithm = \"linear\""),
        ("linear, hashed", "algorithm = \"linear\"\nlinear = { dim = 32 }"),
    ] {
        let c = context_config(model).expect("config");
        let spec = &c.core.models[0];
        let dim = spec.feature_space().map_or("-".to_string(), |s| s.dim.to_string());
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        let state = simulate::learn_records(&c.core, &log);
        let (wall, cpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        let tau = context_tau(spec, &state.models[0], &shop);
        println!(
            "| {name} | {dim} | {:.0} | {:.2} | {tau:.3} |",
            log.len() as f64 / wall,
            cpu / log.len() as f64 * 1e6
        );
    }
}
