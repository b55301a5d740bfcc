//! banditflow's policies on the demo's ZOZOTOWN-calibrated shop (`demo::shop`: the three
//! campaigns, 80 / 34 / 46 items, appeal drawn from ZOZOTOWN's production priors × 20), slates
//! of 3 with the shop's position bias (examination 1.0, 0.85, 0.72), and on a variant whose
//! appeal depends on context features (`simulate::ContextShop`). Each policy ranks with the
//! core's `policy::rank` and learns through `PartitionState::apply`, as in production. The
//! Python peers (Vowpal Wabbit, MABWiser) run the same simulator from the shop this bench
//! exports (`scripts/learning_bench.py`); the two simulators are checked against each other
//! by the analytic uniform-random and oracle click rates they both report.
//!
//! Variants: `zozotown` (stationary), `shift` (every catalogue's appeal permuted after 100,000
//! impressions, the demo's trend shift), `context` (100 items, three context features, one
//! campaign).
//!
//! Writes `<BENCH_OUT>/shop.json` (the truth, for the peers) and `<BENCH_OUT>/banditflow.json`
//! (per policy and seed: expected clicks and regret at 50 checkpoints).
//!
//! Run: `scripts/learning-bench.sh` (all of it), or `cargo bench --bench learning`
//! (BENCH_IMPRESSIONS, default 1,000,000; BENCH_SEEDS, default 10; BENCH_OUT, default
//! `target/learning`; BENCH_ONLY_EXPORT=1 writes the shop and stops), then
//! `scripts/learning_bench.py`.

use std::path::PathBuf;
use std::time::Instant;

use banditflow::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole,
};
use banditflow::core::policy::{self, PolicySpec, RankRequest, Strategy};
use banditflow::demo::shop::{Priors, Shop, ShopSpec};
use banditflow::simulate::{self, ContextShop};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const EXAMINATION: [f64; 3] = [1.0, 0.85, 0.72];
const CHECKPOINTS: usize = 50;
/// The trend shift of the `shift` variant, in impressions: inside the peers' common prefix, so
/// every policy meets it at the same point.
const SHIFT_AT: usize = 100_000;
/// Impressions per update batch in the batched policy: a one-second snapshot interval at
/// 1,000 impressions/s.
const BATCH: usize = 1_000;

/// One catalogue: items, appeal before and after the shift (or per context), traffic share.
struct Catalogue {
    segment: String,
    items: Vec<String>,
    appeal: Vec<f64>,
    after_shift: Vec<f64>,
}

struct Policy {
    name: &'static str,
    model: String,
    batched: bool,
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Expected clicks of the best slate and of a uniformly random one for `rates`.
fn benchmarks(rates: &[f64]) -> (f64, f64) {
    let mut sorted = rates.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let oracle = sorted.iter().zip(EXAMINATION).map(|(a, e)| a * e).sum();
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    (oracle, EXAMINATION.iter().sum::<f64>() * mean)
}

/// Runs one policy for `n` impressions; returns checkpoints (impressions, cumulative expected
/// clicks, cumulative oracle clicks, cumulative random clicks).
#[allow(clippy::too_many_arguments)]
fn run(
    catalogues: &[Catalogue],
    traffic: &[f64],
    context: Option<&ContextShop>,
    shift: bool,
    policy: &Policy,
    n: usize,
    seed: u64,
) -> Vec<[f64; 4]> {
    // Clicks are the only feedback here: a click is worth 1 success (the default scale, the sum
    // of every kind's reward, would count it as 1/8 and widen every posterior).
    let config = simulate::experiment_config(&format!("{}\n[rewards]\nscale = 1.0", policy.model))
        .expect("policy config");
    let spec = &config.core;
    let rank_policy =
        PolicySpec { strategy: Strategy::Thompson, epsilon: 0.0, propensity_samples: 1, propensity_rse: 0.0 };
    let mut state = simulate::simulation_state(spec);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1f83_d9ab_fb41_bd6b);
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut offset = 0i64;
    let (mut got, mut best, mut random) = (0.0, 0.0, 0.0);
    let mut out = Vec::with_capacity(CHECKPOINTS);
    let every = (n / CHECKPOINTS).max(1);
    let t0 = 1_767_225_600_000i64;
    let mut rates = Vec::new();
    for t in 0..n {
        let now = t0 + 10 * t as i64;
        let u: f64 = rng.random();
        let mut c = traffic.len() - 1;
        let mut acc = 0.0;
        for (i, s) in traffic.iter().enumerate() {
            acc += s;
            if u < acc {
                c = i;
                break;
            }
        }
        let cat = &catalogues[c];
        let features = context.map(|shop| shop.context(&mut rng)).unwrap_or_default();
        rates.clear();
        match context {
            Some(shop) => rates.extend((0..cat.items.len()).map(|i| shop.rate(i, &features))),
            None if shift && t >= SHIFT_AT => rates.extend_from_slice(&cat.after_shift),
            None => rates.extend_from_slice(&cat.appeal),
        }
        let req = RankRequest {
            segment: &cat.segment,
            features: &features,
            candidates: &cat.items,
            slate_size: EXAMINATION.len(),
            now_ms: now,
            seed: seed.wrapping_mul(0x9e37_79b9).wrapping_add(t as u64),
            prior: None,
            linear: None,
            examination: None,
        };
        let slate = policy::rank(&spec.models[0], &state.models[0], &rank_policy, &req);
        let id = format!("i{t}");
        let mut entries = Vec::with_capacity(slate.len());
        let mut clicks = Vec::new();
        for p in &slate {
            let i = cat.items.iter().position(|s| *s == p.item_id).unwrap_or(0);
            let q = EXAMINATION[p.position as usize - 1] * rates[i];
            got += q;
            if rng.random::<f64>() < q {
                clicks.push((p.item_id.clone(), p.position));
            }
            entries.push(SlateEntry {
                item_id: p.item_id.clone(),
                position: p.position,
                propensity: 1.0,
                score: p.score,
            });
        }
        let (o, r) = benchmarks(&rates);
        best += o;
        random += r;
        let encode = |e: &Event| event::encode(TopicRole::Combined, Encoding::Protobuf, e);
        pending.push(encode(&Event::Impression(Impression {
            impression_id: id.clone(),
            time_ms: now,
            model_id: "m".into(),
            model_version: 1,
            variant: event::Variant::Treatment,
            segment: cat.segment.clone(),
            features,
            slate: entries,
            opted_out: false,
        })));
        for (item, position) in clicks {
            pending.push(encode(&Event::Feedback(Feedback {
                impression_id: id.clone(),
                item_id: item,
                position,
                kind: FeedbackKind::Click,
                value: 0.0,
                time_ms: now,
            })));
        }
        if !policy.batched || (t + 1) % BATCH == 0 {
            for payload in pending.drain(..) {
                simulate::apply_record(spec, &mut state, &mut offset, &payload);
            }
        }
        if (t + 1) % every == 0 {
            out.push([(t + 1) as f64, got, best, random]);
        }
    }
    out
}

fn main() {
    let n: usize = std::env::var("BENCH_IMPRESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seeds: u64 = std::env::var("BENCH_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let out = PathBuf::from(std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/learning".into()));
    std::fs::create_dir_all(&out).expect("output directory");
    let priors = Priors::load(&banditflow::demo::fetch_priors().expect("priors")).expect("priors file");
    let shop = Shop::new(&priors, ShopSpec::default()).expect("shop");
    let traffic: Vec<f64> = {
        let t: Vec<f64> = shop.spec.traffic.iter().map(|(_, s)| *s).collect();
        let sum: f64 = t.iter().sum();
        t.iter().map(|s| s / sum).collect()
    };
    let zozotown: Vec<Catalogue> = shop
        .campaigns
        .iter()
        .map(|c| Catalogue {
            segment: c.segment.clone(),
            items: c.items.clone(),
            appeal: c.appeal.clone(),
            after_shift: c.appeal_after_shift.clone(),
        })
        .collect();
    let context_shop = ContextShop::new(100, 3, 5);
    let context_cat = vec![Catalogue {
        segment: "all".into(),
        items: context_shop.items.clone(),
        appeal: Vec::new(),
        after_shift: Vec::new(),
    }];
    let exported = json!({
        "examination": EXAMINATION,
        "impressions": n,
        "checkpoints": CHECKPOINTS,
        "batch": BATCH,
        "shift_at": SHIFT_AT,
        "zozotown": {
            "traffic": traffic,
            "campaigns": zozotown.iter().map(|c| json!({
                "segment": c.segment, "items": c.items, "appeal": c.appeal, "after_shift": c.after_shift,
            })).collect::<Vec<_>>(),
        },
        "context": {
            "items": context_shop.items, "features": context_shop.features,
            "base": context_shop.base, "weights": context_shop.weights,
        },
    });
    std::fs::write(out.join("shop.json"), serde_json::to_vec_pretty(&exported).expect("json"))
        .expect("write shop");
    if std::env::var_os("BENCH_ONLY_EXPORT").is_some() {
        return;
    }
    let exam = format!("examination = [{}]", EXAMINATION.map(|e| e.to_string()).join(", "));
    let beta = |extra: &str| format!("algorithm = \"beta\"\n{exam}\n{extra}");
    let only: Option<Vec<String>> =
        std::env::var("BENCH_VARIANTS").ok().map(|v| v.split(',').map(str::to_string).collect());
    let variants: Vec<(&str, Vec<Policy>)> = vec![
        (
            "zozotown",
            vec![
                Policy { name: "banditflow TS", model: beta(""), batched: false },
                Policy {
                    name: "banditflow TS, no position debiasing",
                    model: "algorithm = \"beta\"\nexamination = [1.0]".into(),
                    batched: false,
                },
                Policy { name: "banditflow TS, 1,000-impression batches", model: beta(""), batched: true },
            ],
        ),
        (
            "shift",
            vec![
                Policy { name: "banditflow TS", model: beta(""), batched: false },
                Policy {
                    name: "banditflow TS, half-life 20 min",
                    model: beta("half_life = \"20m\""),
                    batched: false,
                },
                Policy {
                    name: "banditflow TS, half-life 20 min, 1,000-impression batches",
                    model: beta("half_life = \"20m\""),
                    batched: true,
                },
            ],
        ),
        (
            "context",
            vec![
                Policy { name: "banditflow TS (Beta, context-free)", model: beta(""), batched: false },
                Policy {
                    name: "banditflow LinTS (per-arm linear)",
                    model: format!(
                        "algorithm = \"linear\"\n{exam}\nlinear = {{ features = [\"f0\", \"f1\", \"f2\"] }}"
                    ),
                    batched: false,
                },
                Policy {
                    name: "banditflow LinTS, 1,000-impression batches",
                    model: format!(
                        "algorithm = \"linear\"\n{exam}\nlinear = {{ features = [\"f0\", \"f1\", \"f2\"] }}"
                    ),
                    batched: true,
                },
            ],
        ),
    ];
    let mut results = Vec::new();
    for (variant, policies) in &variants {
        if only.as_ref().is_some_and(|o| !o.iter().any(|v| v == variant)) {
            continue;
        }
        let (cats, ctx, shift) = match *variant {
            "context" => (&context_cat, Some(&context_shop), false),
            "shift" => (&zozotown, None, true),
            _ => (&zozotown, None, false),
        };
        let traffic_v: Vec<f64> = if ctx.is_some() { vec![1.0] } else { traffic.clone() };
        for p in policies {
            let (wall, cpu) = (Instant::now(), cpu_seconds());
            // Seeds run on BENCH_THREADS threads (default 2); each seed is one deterministic run.
            let threads: u64 =
                std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2).max(1);
            let mut runs: Vec<(u64, Vec<[f64; 4]>)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|w| {
                        let traffic_v = &traffic_v;
                        scope.spawn(move || {
                            (0..seeds)
                                .filter(|s| s % threads == w)
                                .map(|seed| (seed, run(cats, traffic_v, ctx, shift, p, n, seed)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles.into_iter().flat_map(|h| h.join().expect("a seed's run")).collect()
            });
            runs.sort_by_key(|(seed, _)| *seed);
            let runs: Vec<Vec<[f64; 4]>> = runs.into_iter().map(|(_, r)| r).collect();
            let (wall, cpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
            let ratio: Vec<f64> = runs.iter().map(|r| r[r.len() - 1][1] / r[r.len() - 1][3]).collect();
            let mean = ratio.iter().sum::<f64>() / ratio.len() as f64;
            let last = &runs[0][runs[0].len() - 1];
            eprintln!(
                "{variant:9} {:58} CTR/random {mean:.3} (oracle {:.3})  {:.1} s wall ({threads} threads), {:.1} µs CPU per impression",
                p.name,
                last[2] / last[3],
                wall,
                cpu / (n as f64 * seeds as f64) * 1e6
            );
            results.push(json!({
                "variant": variant, "policy": p.name, "seeds": seeds, "impressions": n,
                "wall_s": wall, "cpu_s": cpu, "runs": runs,
            }));
        }
    }
    std::fs::write(out.join("banditflow.json"), serde_json::to_vec(&results).expect("json"))
        .expect("write results");
    eprintln!("wrote {}", out.join("banditflow.json").display());
}
