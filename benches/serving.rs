//! Serving speed, in process: one rank call of 100 candidates → a slate of 10 with propensities,
//! on a model learned from a generated shop of 100 items (every candidate has statistics).
//!
//! Prints latency percentiles over many calls (the goal is about p99, which criterion does not
//! report) and the CPU time per call from `/proc/self/stat`, beside same-run baselines:
//! - `thompson_before`: the previous Thompson propensity estimate (a general Beta sampler and a
//!   full sort of all candidates per Monte Carlo ranking), copied here to be measured;
//! - `greedy_floor`: the posterior-mean ranking with exact propensities (no Monte Carlo).
//!
//! Then the precision study: for one served slate each of alike candidates (20 and 100 unseen
//! ones, where every propensity is exactly 1/n) and of the learned model, the relative error
//! and CPU of the conditional Monte Carlo estimate at several counts, beside the hit-count
//! estimate it replaced (pilot of 64, at most 256 rankings), copied here as the baseline.
//!
//! Run: `cargo bench --bench serving` (BENCH_CALLS sets the calls per case, default 3000;
//! BENCH_CASES=precision runs only the propensity estimators' precision study).

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
    if std::env::var("BENCH_CASES").is_ok_and(|v| v == "precision") {
        precision(&config, m, calls.min(1000));
        return;
    }
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
    if std::env::var("BENCH_CASES").is_ok_and(|v| v == "thompson") {
        return;
    }
    measure("baseline_thompson_before_1000", calls.min(1000), |seed| {
        thompson_before(&m.spec, &m.shard, &candidates, 10, 1000, seed)
    });
    measure("greedy_floor", calls, rank(Strategy::Greedy, 1, 0.0));
    measure("ucb", calls, rank(Strategy::Ucb { c: 2.0 }, 1, 0.0));
    precision(&config, m, calls.min(1000));
    linear(calls);
}

/// The Thompson propensity estimate before conditional Monte Carlo, copied here to be measured
/// in the same run: exact Beta draws (a ratio of two Gamma draws), a pilot of 64 rankings whose
/// hit counts set how many fresh rankings (blocks of 64, at most `cap` − 64) each placement
/// needs for relative standard error `rse`, and hits / N of the fresh ones.
fn hit_count_estimate(
    params: &[(f64, f64)],
    order: &[usize],
    cap: u32,
    rse: f64,
    eps: f64,
    seed: u64,
) -> Vec<f64> {
    use rand_distr::Gamma;
    const BLOCK: u32 = 64;
    let gammas: Vec<(Gamma<f64>, Gamma<f64>)> = params
        .iter()
        .map(|&(a, b)| (Gamma::new(a, 1.0).expect("shape"), Gamma::new(b, 1.0).expect("shape")))
        .collect();
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let (n, k) = (params.len(), order.len());
    let mut s = vec![0.0; n];
    let mut idx: Vec<usize> = Vec::with_capacity(n);
    let mut draw = |count: u32| -> Vec<u32> {
        let mut hits = vec![0u32; k];
        for _ in 0..count {
            for (v, (ga, gb)) in s.iter_mut().zip(&gammas) {
                let (x, y) = (ga.sample(&mut rng), gb.sample(&mut rng));
                *v = x / (x + y);
            }
            idx.clear();
            idx.extend(0..n);
            let better = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(a.cmp(b));
            if k < n {
                idx.select_nth_unstable_by(k, better);
                idx.truncate(k);
            }
            idx.sort_unstable_by(better);
            for (h, (a, b)) in hits.iter_mut().zip(idx.iter().zip(order)) {
                *h += u32::from(a == b);
            }
        }
        hits
    };
    let fresh = if rse > 0.0 && cap > 2 * BLOCK {
        let pilot = draw(BLOCK);
        let needed = pilot
            .iter()
            .map(|&h| {
                let p = f64::from(h) / f64::from(BLOCK);
                if p > 0.0 {
                    (1.0 - p) / (p * rse * rse)
                } else {
                    f64::INFINITY
                }
            })
            .fold(0.0f64, f64::max);
        let room = cap - BLOCK;
        let blocks = (needed / f64::from(BLOCK)).ceil().clamp(1.0, f64::from(room / BLOCK).max(1.0));
        (blocks as u32 * BLOCK).min(room)
    } else {
        cap
    };
    let hits = draw(fresh);
    let total = f64::from(fresh);
    hits.iter().map(|&h| (1.0 - eps) * f64::from(h) / total + eps / n as f64).collect()
}

/// How precise each estimator is for a fixed served slate, and what it costs: the reported
/// propensities of `calls` estimates (each from its own Monte Carlo seed) against an
/// independent reference — exactly 1/n for candidates whose posteriors are alike (by symmetry),
/// and for the learned model the hit-count estimate from 400,000 rankings (standard error
/// ≤ 0.0008 per placement). Prints the relative root-mean-square error (the mean over the
/// slate's placements) and the mean relative bias with its standard error.
fn precision(config: &Config, m: &banditflow::core::snapshot::DecodedSnapshot, calls: usize) {
    let d = &config.policy;
    let eps = 0.05;
    let now = m.shard.read_time(0);
    let cases: [(&str, Vec<String>); 3] = [
        ("unseen 20 → 10", (0..20).map(|i| format!("unseen-{i}")).collect()),
        ("unseen 100 → 10", (0..100).map(|i| format!("unseen-{i}")).collect()),
        ("learned 100 → 10", (0..100).map(generate::item_id).collect()),
    ];
    for (name, candidates) in &cases {
        let n = candidates.len();
        let req = |seed: u64| slate_of_ten(candidates, now, seed, None);
        let policy = |samples: u32, rse: f64| PolicySpec {
            strategy: Strategy::Thompson,
            epsilon: eps,
            propensity_samples: samples,
            propensity_rse: rse,
        };
        let slate = policy::rank(&m.spec, &m.shard, &policy(d.propensity_samples, d.propensity_rse), &req(7));
        let order: Vec<usize> = slate
            .iter()
            .map(|p| candidates.iter().position(|c| *c == p.item_id).expect("served candidate"))
            .collect();
        let prior = m.shard.prior_in_force(&m.spec, "women", now, None).0;
        let params: Vec<(f64, f64)> = candidates
            .iter()
            .map(|c| {
                let p = m.shard.posterior_with(&m.spec, prior, "women", c, now, None);
                (p.alpha.max(1e-9), p.beta.max(1e-9))
            })
            .collect();
        let reference: Vec<f64> = if name.starts_with("unseen") {
            vec![1.0 / n as f64; order.len()]
        } else {
            hit_count_estimate(&params, &order, 400_000, 0.0, eps, 99)
        };
        println!(
            "{name}: served slate's reference propensities {}",
            reference.iter().map(|p| format!("{p:.4}")).collect::<Vec<_>>().join(" ")
        );
        let study = |label: String, estimate: &dyn Fn(u64) -> Vec<f64>| {
            let (cpu0, t0) = (cpu_seconds(), Instant::now());
            let estimates: Vec<Vec<f64>> = (0..calls as u64).map(|s| estimate(1_000 + s)).collect();
            let wall = t0.elapsed().as_secs_f64() / calls as f64 * 1e6;
            let cpu = (cpu_seconds() - cpu0) / calls as f64 * 1e6;
            let (mut rmse, mut bias, mut bias_se) = (0.0, 0.0, 0.0);
            for (pos, want) in reference.iter().enumerate() {
                let rel: Vec<f64> = estimates.iter().map(|e| e[pos] / want - 1.0).collect();
                let mean = rel.iter().sum::<f64>() / calls as f64;
                let var = rel.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (calls as f64 - 1.0);
                rmse += (rel.iter().map(|r| r * r).sum::<f64>() / calls as f64).sqrt();
                bias += mean;
                bias_se += var / calls as f64;
            }
            let k = reference.len() as f64;
            println!(
                "  {label:<44} {wall:>7.1} µs/call (CPU {cpu:>7.1})  relative RMSE {:>5.1} %  mean bias {:+.2} % (se {:.2} %)",
                100.0 * rmse / k,
                100.0 * bias / k,
                100.0 * bias_se.sqrt() / k
            );
        };
        for (samples, rse) in
            [(d.propensity_samples, d.propensity_rse), (256, 0.1), (64, 0.1), (32, 0.1), (16, 0.0)]
        {
            study(format!("conditional, cap {samples}, rse {rse}"), &|seed| {
                policy::slate_propensities(&m.spec, &m.shard, &policy(samples, rse), &req(seed), &order)
            });
        }
        study("baseline: hit counts, cap 256, rse 0.1".into(), &|seed| {
            hit_count_estimate(&params, &order, 256, 0.1, eps, seed)
        });
    }
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
        let samples = config.policy.propensity_samples;
        measure(
            &format!("linear{dim}_thompson_{samples}_prepared"),
            calls,
            rank(Strategy::Thompson, samples, true),
        );
        measure(&format!("linear{dim}_thompson_256_prepared"), calls, rank(Strategy::Thompson, 256, true));
        measure(
            &format!("baseline_linear{dim}_ucb_per_call"),
            calls,
            rank(Strategy::Ucb { c: 2.0 }, 1, false),
        );
    }
}
