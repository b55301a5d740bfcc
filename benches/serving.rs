//! Serving speed, in process: one rank call of 100 candidates → a slate of 10 with propensities,
//! on a model learned from a generated shop of 100 items (every candidate has statistics).
//!
//! Prints latency percentiles over many calls (the goal is about p99, which criterion does not
//! report) and the CPU time per call from `/proc/self/stat`, beside same-run baselines:
//! - `thompson_before`: the previous Thompson propensity estimate (a general Beta sampler and a
//!   full sort of all candidates per Monte Carlo ranking), copied here to be measured;
//! - `greedy_floor`: the posterior-mean ranking with exact propensities (no Monte Carlo).
//!
//! Run: `cargo bench --bench serving` (BENCH_CALLS sets the calls per case, default 3000).

use std::time::Instant;

use banditflow::config::Config;
use banditflow::core::model::ModelShard;
use banditflow::core::params::ModelSpec;
use banditflow::core::policy::{self, PolicySpec, RankRequest, Strategy};
use banditflow::generate::{self, ShopSpec};
use banditflow::replay;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn measure(name: &str, calls: usize, mut f: impl FnMut(u64) -> usize) {
    for s in 0..calls.min(200) {
        std::hint::black_box(f(s as u64));
    }
    let mut lat = Vec::with_capacity(calls);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for s in 0..calls {
        let t = Instant::now();
        std::hint::black_box(f(1_000_000 + s as u64));
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    lat.sort_by(f64::total_cmp);
    println!(
        "{name:<28} calls {calls:>6}  p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs  max {:>8.1} µs  {:>8.0} calls/s  CPU {:>6.1} µs/call",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
        calls as f64 / wall,
        cpu / calls as f64 * 1e6,
    );
}

/// The Thompson propensity estimate as it was before this benchmark was written.
fn thompson_before(
    spec: &ModelSpec,
    model: &ModelShard,
    candidates: &[String],
    k: usize,
    samples: u32,
    seed: u64,
) -> usize {
    let params: Vec<(f64, f64)> = candidates
        .iter()
        .map(|c| {
            let p = model.posterior(spec, "women", c, model.read_time(0), None);
            (p.alpha.max(1e-9), p.beta.max(1e-9))
        })
        .collect();
    let n = params.len();
    let mut counts = vec![vec![0u32; k]; n];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = Vec::with_capacity(n);
    for _ in 0..=samples {
        s.clear();
        for &(a, b) in &params {
            s.push(Beta::new(a, b).map_or(a / (a + b), |d| d.sample(&mut rng)));
        }
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
        for (pos, &i) in idx.iter().take(k).enumerate() {
            counts[i][pos] += 1;
        }
    }
    counts.iter().map(|r| r.iter().sum::<u32>() as usize).sum()
}

/// The benchmarked call: 100 candidates of segment "women" into a slate of 10.
fn slate_of_ten<'a>(
    candidates: &'a [String],
    now_ms: i64,
    seed: u64,
    linear: Option<&'a banditflow::core::linear::PosteriorTable>,
) -> RankRequest<'a> {
    RankRequest {
        segment: "women",
        features: &[],
        candidates,
        slate_size: 10,
        now_ms,
        seed,
        prior: None,
        linear,
        examination: None,
    }
}

/// The first model of `config` learned from a generated shop of `impressions` impressions (100
/// items, slates of 10, one partition).
fn learned(config: &Config, impressions: usize) -> banditflow::core::snapshot::DecodedSnapshot {
    let shop = generate::generate(&ShopSpec {
        impressions,
        items: 100,
        slate_size: 10,
        partitions: 1,
        malformed_share: 0.0,
        ..ShopSpec::default()
    });
    let mut run = replay::ReplayRun::default();
    for r in shop.records {
        replay::apply_record(config, &mut run, r);
    }
    replay::merged_models(config, &run).expect("merge").swap_remove(0)
}

fn main() {
    let calls: usize = std::env::var("BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let config = Config::from_layers(None, Vec::new()).expect("default config");
    let m = &learned(&config, 200_000);
    let candidates: Vec<String> = (0..100).map(generate::item_id).collect();
    println!(
        "model: {} arms, {} impressions learned; 100 candidates → slate of 10",
        m.shard.arm_count(),
        m.shard.variants.values().map(|v| v.impressions).sum::<u64>()
    );
    let now = m.shard.read_time(0);
    let rank = |strategy: Strategy, samples: u32, rse: f64| {
        let policy = PolicySpec { strategy, epsilon: 0.05, propensity_samples: samples, propensity_rse: rse };
        let (spec, shard, candidates) = (&m.spec, &m.shard, &candidates);
        move |seed: u64| policy::rank(spec, shard, &policy, &slate_of_ten(candidates, now, seed, None)).len()
    };
    let d = &config.policy;
    measure(
        &format!("thompson_default_{}_rse{}", d.propensity_samples, d.propensity_rse),
        calls,
        rank(Strategy::Thompson, d.propensity_samples, d.propensity_rse),
    );
    measure("thompson_1000_fixed", calls, rank(Strategy::Thompson, 1000, 0.0));
    measure("baseline_thompson_before_1000", calls.min(1000), |seed| {
        thompson_before(&m.spec, &m.shard, &candidates, 10, 1000, seed)
    });
    measure("greedy_floor", calls, rank(Strategy::Greedy, 1, 0.0));
    measure("ucb", calls, rank(Strategy::Ucb { c: 2.0 }, 1, 0.0));
    linear(calls);
}

/// A linear model (a disjoint posterior per arm) at the default d = 8 and the largest d = 32:
/// ranking with the per-arm posteriors a serving node prepares once per model version
/// (`ServingModel::linear_posterior`) against the baseline that factorises each candidate's
/// A on every call.
fn linear(calls: usize) {
    for dim in ["8", "32"] {
        let env =
            [("BANDITFLOW__MODELS__0__ALGORITHM", "linear"), ("BANDITFLOW__MODELS__0__LINEAR__DIM", dim)]
                .map(|(k, v)| (k.to_string(), v.to_string()));
        let config = Config::from_layers(None, env.to_vec()).expect("linear config");
        let m = &learned(&config, 20_000);
        let candidates: Vec<String> = (0..100).map(generate::item_id).collect();
        let now = m.shard.read_time(0);
        let features: Vec<(String, f64)> = (0..7).map(|i| (format!("f{i}"), f64::from(i) / 7.0)).collect();
        let priors = m.shard.fit_priors(&m.spec, now);
        let f = m.shard.read_factor(&m.spec, now);
        let t = Instant::now();
        let mut prepared = banditflow::core::linear::PosteriorTable::default();
        for (segment, items) in &m.shard.arms {
            let prior = priors.for_segment(segment);
            let row = items
                .keys()
                .filter_map(|i| Some((i.clone(), m.shard.linear_posterior(&m.spec, prior, segment, i, f)?)))
                .collect();
            prepared.insert(segment.clone(), row);
        }
        println!(
            "linear d={dim}: the posteriors of {} arms (Cholesky + mean) take {:.1} ms to prepare, once per model version",
            m.shard.arm_count(),
            t.elapsed().as_secs_f64() * 1e3
        );
        let prior = priors.for_segment("women");
        let rank = |strategy: Strategy, samples: u32, cached: bool| {
            let policy =
                PolicySpec { strategy, epsilon: 0.05, propensity_samples: samples, propensity_rse: 0.1 };
            let (spec, shard, candidates, prepared, features) =
                (&m.spec, &m.shard, &candidates, &prepared, &features);
            move |seed: u64| {
                let mut req = slate_of_ten(candidates, now, seed, cached.then_some(prepared));
                req.features = features;
                req.prior = Some(prior);
                policy::rank(spec, shard, &policy, &req).len()
            }
        };
        measure(&format!("linear{dim}_ucb_prepared"), calls, rank(Strategy::Ucb { c: 2.0 }, 1, true));
        measure(&format!("linear{dim}_greedy_prepared"), calls, rank(Strategy::Greedy, 1, true));
        measure(&format!("linear{dim}_thompson_prepared"), calls, rank(Strategy::Thompson, 256, true));
        measure(
            &format!("baseline_linear{dim}_ucb_per_call"),
            calls,
            rank(Strategy::Ucb { c: 2.0 }, 1, false),
        );
    }
}
