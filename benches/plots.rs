//! The benchmark plots in BENCHMARKS.md, rendered to PNG with plotters into `docs/learning/`:
//!
//! - learning curves per variant from the learning benchmark's results (`learning.json`, written
//!   by `scripts/learning_bench.py` after `cargo bench --bench learning`): CTR relative to
//!   uniform random and cumulative regret over impressions, mean over seeds, every policy;
//! - examination curves: the true curve, the maximum-likelihood fit, the inverse-propensity
//!   estimate of older builds and the oracle, for a deterministic treatment order with a 10 %
//!   random holdout and for randomised logging (200,000 impressions, seed 0; the setting of
//!   `cargo bench --bench examination`).
//!
//! Run: `cargo bench --bench plots` (BENCH_OUT: where learning.json is, default
//! `target/learning`; PLOTS_DIR, default `docs/learning`).

use std::path::{Path, PathBuf};

use banditflow::demo::report::line_chart;
use banditflow::simulate::{self, Logging};
use rand::{Rng, SeedableRng};

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Mean over seeds of `f(checkpoint)` at every checkpoint, up to `n` impressions.
fn mean_curve(runs: &[serde_json::Value], n: f64, f: impl Fn(&[f64]) -> f64) -> Vec<(f64, f64)> {
    let rows: Vec<Vec<Vec<f64>>> = runs
        .iter()
        .map(|r| {
            r.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_array().map(|v| v.iter().filter_map(|x| x.as_f64()).collect()))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let len = rows.iter().map(Vec::len).min().unwrap_or(0);
    (0..len)
        .filter(|&i| rows[0][i][0] <= n)
        .map(|i| (rows[0][i][0], rows.iter().map(|r| f(&r[i])).sum::<f64>() / rows.len() as f64))
        .collect()
}

fn learning(dir: &Path, plots: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("learning.json")) else {
        eprintln!(
            "no {} (run the learning benchmark first): learning curves skipped",
            dir.join("learning.json").display()
        );
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("learning.json");
    let prefix = v["prefix"].as_f64().unwrap_or(f64::INFINITY);
    let mut all: Vec<&serde_json::Value> = v["banditflow"].as_array().into_iter().flatten().collect();
    all.extend(
        v["peers"].as_array().into_iter().flatten().filter(|p| p["impressions"].as_f64() >= Some(prefix)),
    );
    for variant in ["zozotown", "shift", "context"] {
        let mut ctr: Series = Vec::new();
        let mut regret: Series = Vec::new();
        for r in all.iter().filter(|r| r["variant"] == variant) {
            let name = r["policy"].as_str().unwrap_or("?").to_string();
            let runs = r["runs"].as_array().cloned().unwrap_or_default();
            // Peers ran the common prefix; banditflow's curves are shown over it too.
            ctr.push((name.clone(), mean_curve(&runs, prefix, |c| c[1] / c[3])));
            regret.push((name, mean_curve(&runs, prefix, |c| c[2] - c[1])));
        }
        for (file, title, y, series) in [
            (
                format!("{variant}-ctr.png"),
                format!("{variant}: clicks relative to uniform random"),
                "cumulative CTR / random",
                ctr,
            ),
            (
                format!("{variant}-regret.png"),
                format!("{variant}: cumulative regret"),
                "expected clicks lost to the oracle",
                regret,
            ),
        ] {
            let path = plots.join(&file);
            match line_chart(&path, &title, "impressions", y, &series) {
                Ok(true) => println!("wrote {}", path.display()),
                Ok(false) => eprintln!("no font or no data: {} skipped", path.display()),
                Err(e) => eprintln!("{}: {e:#}", path.display()),
            }
        }
    }
}

fn examination(plots: &Path) {
    let config = simulate::experiment_config("examination = \"estimated\"").expect("config");
    let truth: Vec<f64> = (1..=10).map(simulate::context_examination).collect();
    for (file, title, logging) in [
        (
            "examination-deterministic.png",
            "Examination: deterministic treatment + 10 % random holdout, 200 k impressions",
            Logging::Deterministic { holdout: 0.1 },
        ),
        ("examination-randomised.png", "Examination: randomised logging, 200 k impressions", Logging::Random),
    ] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let theta: Vec<f64> = (0..50).map(|_| rng.random_range(0.02..0.3)).collect();
        let (log, counts) = simulate::position_log(&theta, &truth, logging, 200_000, 0);
        let state = simulate::learn_records(&config.core, &log);
        let curve = |g: &[f64]| -> Vec<(f64, f64)> {
            g.iter().take(10).enumerate().map(|(p, v)| (p as f64 + 1.0, *v)).collect()
        };
        let series: Series = vec![
            ("truth".into(), curve(&truth)),
            ("maximum likelihood (this build)".into(), curve(&state.models[0].estimated_examination())),
            ("inverse propensity (older builds)".into(), curve(&state.models[0].ips_examination())),
            ("oracle (knows attractiveness)".into(), curve(&simulate::oracle_examination(&theta, &counts))),
        ];
        let path = plots.join(file);
        match line_chart(&path, title, "position", "examination relative to position 1", &series) {
            Ok(true) => println!("wrote {}", path.display()),
            Ok(false) => eprintln!("no font: {} skipped", path.display()),
            Err(e) => eprintln!("{}: {e:#}", path.display()),
        }
    }
}

fn main() {
    let dir = PathBuf::from(std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/learning".into()));
    let plots = PathBuf::from(std::env::var("PLOTS_DIR").unwrap_or_else(|_| "docs/learning".into()));
    std::fs::create_dir_all(&plots).expect("plots directory");
    learning(&dir, &plots);
    examination(&plots);
}
