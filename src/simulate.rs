//! Simulated traffic for learning measurements: a policy ranks, a shopper clicks by the true
//! rates, and the core learns through its own record path (the same `PartitionState::apply` as
//! the processor). Seeded; used by the suite's regret and contextual tests and by the benches
//! (`priors`, `learning`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use crate::core::model::ModelShard;
use crate::core::params::{CoreSpec, ModelSpec};
use crate::core::partition::{InputRecord, PartitionState};
use crate::core::policy::{self, PolicySpec, RankRequest, Strategy};

/// Cumulative expected regret (best rate − chosen rate) after each of `rounds` single-slot
/// impressions of model 0 of `spec`, whose items `item-<k>` click with `rates[k]` when shown;
/// Thompson sampling without exploration floor; events at 1 ms apart from 2026-01-01.
pub fn thompson_regret_curve(spec: &CoreSpec, rates: &[f64], rounds: usize, seed: u64) -> Vec<f64> {
    let model = &spec.models[0];
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x2545_f491_4f6c_dd1d);
    let best = rates.iter().copied().fold(0.0, f64::max);
    let names: Vec<String> = (0..rates.len()).map(|k| format!("item-{k}")).collect();
    let policy =
        PolicySpec { strategy: Strategy::Thompson, epsilon: 0.0, propensity_samples: 1, propensity_rse: 0.0 };
    let mut state = simulation_state(spec);
    let mut offset = 0;
    let mut feed = |state: &mut PartitionState, e: Event| {
        let payload = event::encode(TopicRole::Combined, Encoding::Protobuf, &e);
        apply_record(spec, state, &mut offset, &payload);
    };
    let t0 = 1_767_225_600_000i64;
    let mut total = 0.0;
    let mut curve = Vec::with_capacity(rounds);
    for t in 0..rounds {
        let now = t0 + t as i64;
        let req = RankRequest {
            segment: "s",
            features: &[],
            candidates: &names,
            slate_size: 1,
            now_ms: now,
            seed: seed.wrapping_mul(1_000_003).wrapping_add(t as u64),
            prior: None,
            linear: None,
            examination: None,
        };
        let Some(chosen) = policy::rank(model, &state.models[0], &policy, &req).into_iter().next() else {
            break;
        };
        let k = names.iter().position(|n| *n == chosen.item_id).unwrap_or(0);
        total += best - rates[k];
        curve.push(total);
        let id = format!("i{t}");
        let slate =
            vec![SlateEntry { item_id: chosen.item_id.clone(), position: 1, propensity: 1.0, score: 0.0 }];
        feed(
            &mut state,
            Event::Impression(Impression {
                impression_id: id.clone(),
                time_ms: now,
                model_id: model.id.clone(),
                model_version: 1,
                variant: Variant::Treatment,
                segment: "s".into(),
                features: Vec::new(),
                slate,
                opted_out: false,
            }),
        );
        if rng.random::<f64>() < rates[k] {
            feed(
                &mut state,
                Event::Feedback(Feedback {
                    impression_id: id,
                    item_id: chosen.item_id,
                    position: 1,
                    kind: FeedbackKind::Click,
                    value: 0.0,
                    time_ms: now,
                }),
            );
        }
    }
    curve
}

/// A shop whose items' appeal depends on the shopper's context: item `i` is clicked, once
/// examined, with probability `base[i] + Σ_k weights[i][k] · x_k`, for context features
/// `x_k` uniform on [−0.5, 0.5]. With `base` in [0.08, 0.14] and weights in [−0.05, 0.05] every
/// rate stays in (0, 0.215] (no clipping, so a linear model is the right model), and the best
/// item differs from one context to the next.
#[derive(Debug, Clone)]
pub struct ContextShop {
    pub features: Vec<String>,
    pub items: Vec<String>,
    pub base: Vec<f64>,
    pub weights: Vec<Vec<f64>>,
}

impl ContextShop {
    pub fn new(items: usize, features: usize, seed: u64) -> ContextShop {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x51_7cc1_b727_220a);
        ContextShop {
            features: (0..features).map(|k| format!("f{k}")).collect(),
            items: (0..items).map(|i| format!("item-{i:03}")).collect(),
            base: (0..items).map(|_| rng.random_range(0.08..0.14)).collect(),
            weights: (0..items)
                .map(|_| (0..features).map(|_| rng.random_range(-0.05..0.05)).collect())
                .collect(),
        }
    }

    /// A shopper's context.
    pub fn context<R: Rng>(&self, rng: &mut R) -> Vec<(String, f64)> {
        self.features.iter().map(|f| (f.clone(), rng.random_range(-0.5..0.5))).collect()
    }

    /// Click probability of item `i`, once examined, in `context` (features in `features`'
    /// order).
    pub fn rate(&self, i: usize, context: &[(String, f64)]) -> f64 {
        self.base[i] + self.weights[i].iter().zip(context).map(|(w, (_, x))| w * x).sum::<f64>()
    }
}

/// Kendall's τ-a between two scorings of the same items: (concordant − discordant) pairs over
/// all pairs.
pub fn kendall_tau(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (mut c, mut d) = (0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let s = (a[i] - a[j]) * (b[i] - b[j]);
            if s > 0.0 {
                c += 1;
            } else if s < 0.0 {
                d += 1;
            }
        }
    }
    let pairs = (n * n.saturating_sub(1) / 2).max(1) as f64;
    (c - d) as f64 / pairs
}

/// The log of `impressions` uniformly random slates of `slate` items out of `shop`'s items
/// (each placement's propensity 1/n) for model `model_id`, in segment "all": position `p` is
/// examined with probability `examination(p)`, an examined item clicked with its rate in the
/// impression's context. Events 10 ms apart from 2026-01-01, encoded as combined-topic
/// protobuf records (an impression, then its clicks).
pub fn uniform_log(
    shop: &ContextShop,
    model_id: &str,
    impressions: usize,
    slate: usize,
    examination: impl Fn(u32) -> f64,
    seed: u64,
) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c909);
    let n = shop.items.len();
    let k = slate.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let t0 = 1_767_225_600_000i64;
    let mut out = Vec::with_capacity(impressions * 2);
    let encode = |e: &Event| event::encode(TopicRole::Combined, Encoding::Protobuf, e);
    for t in 0..impressions {
        let now = t0 + 10 * t as i64;
        let context = shop.context(&mut rng);
        for j in 0..k {
            let r = rng.random_range(j..n);
            order.swap(j, r);
        }
        let id = format!("u{t}");
        let entries = order[..k]
            .iter()
            .enumerate()
            .map(|(p, &i)| SlateEntry {
                item_id: shop.items[i].clone(),
                position: p as u32 + 1,
                propensity: 1.0 / n as f64,
                score: 0.0,
            })
            .collect();
        let clicks: Vec<(usize, u32)> = order[..k]
            .iter()
            .enumerate()
            .filter_map(|(p, &i)| {
                let pos = p as u32 + 1;
                (rng.random::<f64>() < examination(pos) * shop.rate(i, &context)).then_some((i, pos))
            })
            .collect();
        out.push(encode(&Event::Impression(Impression {
            impression_id: id.clone(),
            time_ms: now,
            model_id: model_id.to_string(),
            model_version: 1,
            variant: Variant::Treatment,
            segment: "all".into(),
            features: context,
            slate: entries,
            opted_out: false,
        })));
        for (i, pos) in clicks {
            out.push(encode(&Event::Feedback(Feedback {
                impression_id: id.clone(),
                item_id: shop.items[i].clone(),
                position: pos,
                kind: FeedbackKind::Click,
                value: 0.0,
                time_ms: now,
            })));
        }
    }
    out
}

/// A partition state of `spec` that learned `records` (combined-topic protobuf payloads, in
/// order) through `PartitionState::apply`.
pub fn learn_records(spec: &CoreSpec, records: &[Vec<u8>]) -> PartitionState {
    let mut state = simulation_state(spec);
    let mut offset = 0;
    for payload in records {
        apply_record(spec, &mut state, &mut offset, payload);
    }
    state
}

/// An empty partition state for simulations: nothing tracked for a changelog.
pub fn simulation_state(spec: &CoreSpec) -> PartitionState {
    let mut state = PartitionState::new(spec, 0);
    state.join.changes.untracked = true;
    state.join.buffer.untracked = true;
    state
}

/// Applies one combined-topic protobuf record at `offset` of topic "events", partition 0,
/// and moves `offset` on.
pub fn apply_record(spec: &CoreSpec, state: &mut PartitionState, offset: &mut i64, payload: &[u8]) {
    state.apply(
        spec,
        InputRecord {
            topic: "events",
            partition: 0,
            offset: *offset,
            role: TopicRole::Combined,
            encoding: Encoding::Protobuf,
            payload,
            timestamp_ms: None,
        },
    );
    *offset += 1;
}

/// The examination curve of [`ContextShop`] experiments: position `p` is examined with
/// probability 1 / (1 + 0.3 (p − 1)).
pub fn context_examination(position: u32) -> f64 {
    1.0 / (1.0 + 0.3 * f64::from(position.saturating_sub(1)))
}

/// A configuration with one model `m` for simulated experiments: the embedded defaults, a
/// one-year half-life unless `model` sets one, and `model` (TOML lines such as
/// `algorithm = "linear"`).
pub fn experiment_config(model: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
    let half_life = if model.contains("half_life") { "" } else { "half_life = \"365d\"\n" };
    let text = format!("[[models]]\nid = \"m\"\n{half_life}{model}\n");
    crate::config::Config::from_layers(Some(("simulated experiment", &text)), Vec::new())
}

/// [`experiment_config`] for [`ContextShop`] experiments: the true examination curve of 5
/// positions as configured weights, then `model`.
pub fn context_config(model: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
    let weights: Vec<String> = (1..=5).map(|p| format!("{:.6}", context_examination(p))).collect();
    experiment_config(&format!("examination = [{}]\n{model}", weights.join(", ")))
}

/// Mean Kendall τ over 50 fresh contexts (seeded) between `shop`'s true rates and the scores of
/// model `spec` in segment "all": θ̂·x for a linear model, the Beta posterior mean otherwise
/// (which cannot depend on the context). Read at the newest learned impression.
pub fn context_tau(spec: &ModelSpec, shard: &ModelShard, shop: &ContextShop) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let now = shard.read_time(0);
    let (prior, _) = shard.prior_in_force(spec, "all", now, None);
    let f = shard.read_factor(spec, now);
    let mut x = Vec::new();
    let mut total = 0.0;
    for _ in 0..50 {
        let context = shop.context(&mut rng);
        let truth: Vec<f64> = (0..shop.items.len()).map(|i| shop.rate(i, &context)).collect();
        let scores: Vec<f64> = shop
            .items
            .iter()
            .map(|item| match spec.feature_space() {
                Some(space) => {
                    space.vector(&context, &mut x);
                    shard.linear_posterior(spec, prior, "all", item, f).map_or(0.0, |p| p.score(&x))
                }
                None => shard.posterior_with(spec, prior, "all", item, now, None).mean(),
            })
            .collect();
        total += kendall_tau(&truth, &scores);
    }
    total / 50.0
}

/// How the slates of a [`position_log`] are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Logging {
    /// Treatment shows the items in one fixed order (the true best first; propensity 1), a
    /// random `holdout` share of impressions a uniformly random order (propensity 1/n).
    Deterministic { holdout: f64 },
    /// Every slate a uniformly random order (propensity 1/n).
    Random,
}

/// Exact exposures and clicks per item and position of a [`position_log`] (`[item][position −
/// 1]`): what an oracle estimator sees.
#[derive(Debug, Clone)]
pub struct PositionCounts {
    pub exposures: Vec<Vec<f64>>,
    pub clicks: Vec<Vec<f64>>,
}

/// A log of `impressions` slates of `examination.len()` positions over items with true
/// attractiveness `attractiveness` for model `m` in segment "all": position `p` is examined
/// with probability `examination[p − 1]`, an examined item clicked with its attractiveness.
/// Encoded as combined-topic protobuf records (an impression, then its clicks), with the exact
/// counts.
pub fn position_log(
    attractiveness: &[f64],
    examination: &[f64],
    logging: Logging,
    impressions: usize,
    seed: u64,
) -> (Vec<Vec<u8>>, PositionCounts) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbb67_ae85_84ca_a73b);
    let n = attractiveness.len();
    let k = examination.len().min(n);
    let items: Vec<String> = (0..n).map(|i| format!("item-{i:03}")).collect();
    let mut best: Vec<usize> = (0..n).collect();
    best.sort_by(|&a, &b| attractiveness[b].total_cmp(&attractiveness[a]).then(a.cmp(&b)));
    let mut order: Vec<usize> = (0..n).collect();
    let mut counts = PositionCounts { exposures: vec![vec![0.0; k]; n], clicks: vec![vec![0.0; k]; n] };
    let mut out = Vec::with_capacity(impressions * 2);
    let encode = |e: &Event| event::encode(TopicRole::Combined, Encoding::Protobuf, e);
    let t0 = 1_767_225_600_000i64;
    for t in 0..impressions {
        let now = t0 + 10 * t as i64;
        let random = match logging {
            Logging::Random => true,
            Logging::Deterministic { holdout } => rng.random::<f64>() < holdout,
        };
        let (shown, propensity, variant) = if random {
            for j in 0..k {
                let r = rng.random_range(j..n);
                order.swap(j, r);
            }
            (&order[..k], 1.0 / n as f64, Variant::Holdout)
        } else {
            (&best[..k], 1.0, Variant::Treatment)
        };
        let id = format!("p{t}");
        let mut clicks = Vec::new();
        let slate = shown
            .iter()
            .enumerate()
            .map(|(p, &i)| {
                counts.exposures[i][p] += 1.0;
                if rng.random::<f64>() < examination[p] * attractiveness[i] {
                    counts.clicks[i][p] += 1.0;
                    clicks.push((i, p as u32 + 1));
                }
                SlateEntry { item_id: items[i].clone(), position: p as u32 + 1, propensity, score: 0.0 }
            })
            .collect();
        out.push(encode(&Event::Impression(Impression {
            impression_id: id.clone(),
            time_ms: now,
            model_id: "m".into(),
            model_version: 1,
            variant: if matches!(logging, Logging::Random) { Variant::Treatment } else { variant },
            segment: "all".into(),
            features: Vec::new(),
            slate,
            opted_out: false,
        })));
        for (i, pos) in clicks {
            out.push(encode(&Event::Feedback(Feedback {
                impression_id: id.clone(),
                item_id: items[i].clone(),
                position: pos,
                kind: FeedbackKind::Click,
                value: 0.0,
                time_ms: now,
            })));
        }
    }
    (out, counts)
}

/// The oracle examination estimate: knowing every item's true attractiveness θ, the
/// maximum-likelihood γ of each position from the exact counts (Σ c/γ = Σ (n − c) θ/(1 − γθ),
/// solved by bisection), relative to position 1.
pub fn oracle_examination(attractiveness: &[f64], counts: &PositionCounts) -> Vec<f64> {
    let k = counts.exposures.first().map_or(0, Vec::len);
    let max_theta = attractiveness.iter().copied().fold(0.0, f64::max);
    let gamma: Vec<f64> = (0..k)
        .map(|p| {
            let slope = |g: f64| -> f64 {
                let mut s = 0.0;
                for (i, th) in attractiveness.iter().enumerate() {
                    let (n, c) = (counts.exposures[i][p], counts.clicks[i][p]);
                    s += c / g - (n - c) * th / (1.0 - g * th);
                }
                s
            };
            let (mut lo, mut hi) = (1e-9, (1.0 / max_theta).min(1e6) * (1.0 - 1e-12));
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if slope(mid) > 0.0 {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            0.5 * (lo + hi)
        })
        .collect();
    gamma.iter().map(|g| g / gamma[0]).collect()
}
