//! Ranking policy: deterministic for a seed, exact propensities where closed-form, Monte Carlo
//! estimates for Thompson sampling that agree with the exact answer.

use banditflow::core::event::{Event, FeedbackKind, Variant};
use banditflow::core::policy::{rank, PolicySpec, RankRequest, Strategy};

use crate::support::*;

/// A model where item "good" clicked far more often than "bad" and "new" was never shown.
fn trained(model: &str) -> (banditflow::core::params::CoreSpec, Feeder, usize) {
    let spec = unbounded_spec();
    let mut f = Feeder::new(&spec, 0);
    for k in 0..200 {
        let id = format!("i{k}");
        let items = if k % 2 == 0 { ["good", "bad"] } else { ["bad", "good"] };
        f.feed(
            &spec,
            &Event::Impression(impression(&id, model, T0 + k, Variant::Treatment, "women", &items)),
        );
        if k % 3 != 0 {
            let pos = if k % 2 == 0 { 1 } else { 2 };
            f.feed(&spec, &Event::Feedback(feedback(&id, "good", pos, FeedbackKind::Purchase, T0 + k + 1)));
        }
    }
    let idx = spec.models.iter().position(|m| m.id == model).expect("model exists");
    (spec, f, idx)
}

fn candidates() -> Vec<String> {
    vec!["bad".into(), "good".into(), "new".into()]
}

fn request<'a>(c: &'a [String], seed: u64) -> RankRequest<'a> {
    RankRequest {
        segment: "women",
        features: &[],
        candidates: c,
        slate_size: 2,
        now_ms: T0 + 300,
        seed,
        prior: None,
        linear: None,
        examination: None,
    }
}

#[test]
fn greedy_and_ucb_put_the_best_item_first_with_exact_propensity() {
    for model in ["pbm", "lin", "est"] {
        let (spec, f, i) = trained(model);
        let c = candidates();
        for strategy in [Strategy::Greedy, Strategy::Ucb { c: 0.1 }] {
            let policy = PolicySpec { strategy, epsilon: 0.0, propensity_samples: 100, propensity_rse: 0.0 };
            let slate = rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, 1));
            assert_eq!(slate[0].item_id, "good", "{model} {strategy:?}: {slate:?}");
            assert_eq!(slate[0].propensity, 1.0);
        }
        // With an exploration floor the propensity is (1 - ε)·1 + ε/n, whatever was drawn.
        let policy = PolicySpec {
            strategy: Strategy::Greedy,
            epsilon: 0.3,
            propensity_samples: 100,
            propensity_rse: 0.0,
        };
        for seed in 0..20 {
            let slate = rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, seed));
            for p in &slate {
                let greedy_pick = (p.position == 1 && p.item_id == "good")
                    || p.position == 2 && slate_greedy_second(&spec, &f, i) == p.item_id;
                let want = if greedy_pick { 0.7 + 0.1 } else { 0.1 };
                assert!((p.propensity - want).abs() < 1e-12, "{model} seed {seed}: {p:?}");
            }
        }
    }
}

fn slate_greedy_second(spec: &banditflow::core::params::CoreSpec, f: &Feeder, i: usize) -> String {
    let c = candidates();
    let policy =
        PolicySpec { strategy: Strategy::Greedy, epsilon: 0.0, propensity_samples: 1, propensity_rse: 0.0 };
    rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, 0))[1].item_id.clone()
}

#[test]
fn a_seed_gives_the_same_slate() {
    let (spec, f, i) = trained("pbm");
    let c = candidates();
    let policy = PolicySpec {
        strategy: Strategy::Thompson,
        epsilon: 0.05,
        propensity_samples: 500,
        propensity_rse: 0.0,
    };
    let a = rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, 42));
    let b = rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, 42));
    assert_eq!(a, b);
}

#[test]
fn uniform_exploration_has_propensity_one_over_n() {
    let (spec, f, i) = trained("pbm");
    let c = candidates();
    let policy = PolicySpec {
        strategy: Strategy::Thompson,
        epsilon: 1.0,
        propensity_samples: 50,
        propensity_rse: 0.0,
    };
    for p in rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, 9)) {
        assert!((p.propensity - 1.0 / 3.0).abs() < 1e-12, "{p:?}");
    }
}

#[test]
fn thompson_propensity_estimate_matches_the_exact_two_arm_probability() {
    // Two unseen arms with the same prior: by symmetry each is first with probability 1/2.
    let spec = unbounded_spec();
    let f = Feeder::new(&spec, 0);
    let c: Vec<String> = vec!["x".into(), "y".into()];
    let policy = PolicySpec {
        strategy: Strategy::Thompson,
        epsilon: 0.0,
        propensity_samples: 20_000,
        propensity_rse: 0.0,
    };
    let slate =
        rank(&spec.models[0], &f.state.models[0], &policy, &RankRequest { slate_size: 1, ..request(&c, 5) });
    // Standard error of the estimate is 0.0035; 5 of them is a safe, still meaningful bound.
    assert!((slate[0].propensity - 0.5).abs() < 0.018, "{slate:?}");
}

#[test]
fn thompson_explores_unseen_items_and_favours_the_best() {
    let (spec, f, i) = trained("pbm");
    let c = candidates();
    let policy = PolicySpec {
        strategy: Strategy::Thompson,
        epsilon: 0.0,
        propensity_samples: 10,
        propensity_rse: 0.0,
    };
    let (mut good_first, mut new_shown) = (0, 0);
    for seed in 0..400 {
        let slate = rank(&spec.models[i], &f.state.models[i], &policy, &request(&c, seed));
        good_first += usize::from(slate[0].item_id == "good");
        new_shown += usize::from(slate.iter().any(|p| p.item_id == "new"));
    }
    assert!(good_first > 300, "best item first only {good_first} of 400 times");
    // The never-shown item starts from its prior and so gets shown, ahead of a known loser.
    assert!(new_shown > 200, "cold item shown only {new_shown} of 400 times");
}

/// CDF of Beta(a, b) for integer a, b ≥ 1: P(X ≤ x) = P(Binomial(a + b − 1, x) ≥ a).
fn beta_cdf_int(a: u32, b: u32, x: f64) -> f64 {
    let n = a + b - 1;
    let mut choose = 1.0f64; // C(n, j), built up from j = 0
    let mut sum = 0.0;
    for j in 0..=n {
        if j > 0 {
            choose = choose * f64::from(n - j + 1) / f64::from(j);
        }
        if j >= a {
            sum += choose * x.powi(j as i32) * (1.0 - x).powi((n - j) as i32);
        }
    }
    sum
}

fn beta_pdf_int(a: u32, b: u32, x: f64) -> f64 {
    // 1 / B(a, b) = (a + b − 1)! / ((a − 1)! (b − 1)!)
    let fact = |k: u32| (1..=k).map(f64::from).product::<f64>();
    fact(a + b - 1) / (fact(a - 1) * fact(b - 1)) * x.powi(a as i32 - 1) * (1.0 - x).powi(b as i32 - 1)
}

/// Exact P(item i is ranked at position p) for independent Beta draws, slates of two:
/// position 1 = i beats all; position 2 = exactly one other beats i. Simpson's rule.
fn exact_slate_probabilities(params: &[(u32, u32)]) -> Vec<[f64; 2]> {
    let steps = 20_000;
    let h = 1.0 / steps as f64;
    params
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| {
            let mut first = 0.0;
            let mut second = 0.0;
            for s in 0..=steps {
                let x = s as f64 * h;
                let w = if s == 0 || s == steps {
                    1.0
                } else if s % 2 == 1 {
                    4.0
                } else {
                    2.0
                };
                let f = beta_pdf_int(a, b, x);
                let below: Vec<f64> = params
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, &(aj, bj))| beta_cdf_int(aj, bj, x))
                    .collect();
                let all_below: f64 = below.iter().product();
                // Exactly one of the others above x.
                let one_above: f64 = (0..below.len())
                    .map(|k| {
                        (1.0 - below[k])
                            * below
                                .iter()
                                .enumerate()
                                .filter(|(m, _)| *m != k)
                                .map(|(_, v)| v)
                                .product::<f64>()
                    })
                    .sum();
                first += w * f * all_below;
                second += w * f * one_above;
            }
            [first * h / 3.0, second * h / 3.0]
        })
        .collect()
}

/// A slate of two from `c` in segment `s`, read at time 0.
fn slate_of_two(c: &[String], seed: u64) -> RankRequest<'_> {
    RankRequest {
        segment: "s",
        features: &[],
        candidates: c,
        slate_size: 2,
        now_ms: 0,
        seed,
        prior: None,
        linear: None,
        examination: None,
    }
}

/// A shard of the estimated-examination model (prior Beta(1, 1), no decay) whose arm `item<k>`
/// of segment `s` has posterior Beta(params[k]); with the spec and the candidates.
fn shard_with_posteriors(
    params: &[(u32, u32)],
) -> (banditflow::core::params::CoreSpec, banditflow::core::model::ModelShard, Vec<String>) {
    let mut spec = unbounded_spec();
    spec.models[2].prior = banditflow::core::params::Prior { alpha: 1.0, beta: 1.0 };
    let m = &spec.models[2];
    let mut shard = banditflow::core::model::ModelShard::new(m);
    shard.landmark_ms = Some(0);
    let mut items = banditflow::core::model::HashMap::default();
    for (k, &(a, b)) in params.iter().enumerate() {
        // The estimated-examination model reads exposure from per-position counts (weight 1).
        let arm = banditflow::core::model::ArmStats {
            success: f64::from(a - 1),
            position_exposure: vec![f64::from(a + b - 2)],
            ..Default::default()
        };
        items.insert(format!("item{k}"), arm);
    }
    shard.arms.insert("s".to_string(), items);
    shard.arm_total = params.len();
    let c: Vec<String> = (0..params.len()).map(|k| format!("item{k}")).collect();
    for (k, &(a, b)) in params.iter().enumerate() {
        let p = shard.posterior(m, "s", &c[k], 0, Some(&shard.estimated_examination()));
        assert_eq!((p.alpha, p.beta), (f64::from(a), f64::from(b)), "posterior set up as intended");
    }
    (spec, shard, c)
}

#[test]
fn thompson_propensities_of_an_asymmetric_slate_match_the_exact_integral() {
    // Four arms with different posteriors (prior Beta(1, 1), no decay), a slate of two: the
    // continued fraction of the Beta CDF, then the closed forms of unit shapes (Beta(1, b),
    // Beta(a, 1)) beside it.
    check_against_the_exact_integral(&[(3, 9), (5, 5), (2, 2), (8, 4)]);
    check_against_the_exact_integral(&[(1, 4), (6, 1), (2, 3), (1, 1)]);
}

fn check_against_the_exact_integral(params: &[(u32, u32)]) {
    let (spec, shard, c) = shard_with_posteriors(params);
    let m = &spec.models[2];
    let exact = exact_slate_probabilities(params);
    for (i, e) in exact.iter().enumerate() {
        assert!(e.iter().all(|v| (0.0..=1.0).contains(v)), "item {i}: {e:?}");
    }
    let samples = 20_000;
    let policy = PolicySpec {
        strategy: Strategy::Thompson,
        epsilon: 0.0,
        propensity_samples: samples,
        propensity_rse: 0.0,
    };
    let mut checked = 0;
    // The adaptive count (default relative standard error 10 %, here with a cap high enough
    // never to bind): every estimate within 4.5 relative standard errors of the exact value.
    let adaptive = PolicySpec { propensity_rse: 0.1, ..policy };
    for seed in 0..200 {
        let req = slate_of_two(&c, seed);
        for p in rank(m, &shard, &adaptive, &req) {
            let i: usize = p.item_id[4..].parse().expect("index");
            let want = exact[i][p.position as usize - 1];
            assert!(
                (p.propensity - want).abs() < 4.5 * 0.1 * want,
                "adaptive, seed {seed}: {} at {}: estimate {} vs exact {want}",
                p.item_id,
                p.position,
                p.propensity
            );
        }
    }
    for seed in 0..40 {
        let req = slate_of_two(&c, seed);
        for p in rank(m, &shard, &policy, &req) {
            let i: usize = p.item_id[4..].parse().expect("index");
            let want = exact[i][p.position as usize - 1];
            // Binomial standard error of the estimate; 4.5 of them (plus the served draw).
            let se = (want * (1.0 - want) / f64::from(samples)).sqrt();
            assert!(
                (p.propensity - want).abs() < 4.5 * se + 1.0 / f64::from(samples),
                "seed {seed}: {} at {}: estimate {} vs exact {want}",
                p.item_id,
                p.position,
                p.propensity
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 80);
}

#[test]
fn no_propensity_is_below_the_epsilon_floor_and_a_served_placement_is_never_zero() {
    let (spec, f, i) = trained("pbm");
    let c: Vec<String> = (0..50).map(|k| format!("cold{k}")).chain(candidates()).collect();
    for eps in [0.0, 0.01, 0.2] {
        // One Monte Carlo sample only: the served placement must still get a positive estimate.
        let policy = PolicySpec {
            strategy: Strategy::Thompson,
            epsilon: eps,
            propensity_samples: 1,
            propensity_rse: 0.0,
        };
        for seed in 0..200 {
            let req = RankRequest { slate_size: 5, ..request(&c, seed) };
            for p in rank(&spec.models[i], &f.state.models[i], &policy, &req) {
                let floor = eps / c.len() as f64;
                assert!(p.propensity >= floor, "eps {eps} seed {seed}: {p:?}");
                if eps == 0.0 {
                    // One ranking per placement: never zero (its conditional value, or the
                    // 0.5 / N floor where that is 0).
                    assert!(p.propensity > 0.0, "seed {seed}: {p:?}");
                }
            }
        }
    }
}

#[test]
fn thompson_propensities_near_the_epsilon_floor_are_unbiased() {
    // Regression: a served placement that no fresh ranking produced was reported as
    // (1 − ε)·0.5/N + ε/n although ε/n already keeps it above zero: +44 to +49 % for
    // placements whose exact propensity is near ε/n, the very ones off-policy evaluation
    // weighs most. Ten arms, two clear leaders, a slate of two, ε = 0.05, the default adaptive
    // count; over 10,000 requests the mean reported propensity of the rare placements must equal
    // the exact one (numerical integral of the Beta densities) within its sampling error.
    let params: [(u32, u32); 10] =
        [(40, 60), (36, 64), (30, 70), (26, 74), (22, 78), (20, 80), (16, 84), (12, 88), (8, 92), (4, 96)];
    let (spec, shard, c) = shard_with_posteriors(&params);
    let m = &spec.models[2];
    let exact = exact_slate_probabilities(&params);
    let eps = 0.05;
    let n = params.len() as f64;
    let mixed = |i: usize, pos: usize| (1.0 - eps) * exact[i][pos] + eps / n;
    let policy = PolicySpec {
        strategy: Strategy::Thompson,
        epsilon: eps,
        propensity_samples: 256,
        propensity_rse: 0.1,
    };
    // (reported − exact) of every served placement whose exact propensity is below 2ε/n.
    let mut diffs = Vec::new();
    let mut exact_sum = 0.0;
    for seed in 0..10_000 {
        let req = slate_of_two(&c, seed);
        for p in rank(m, &shard, &policy, &req) {
            let i: usize = p.item_id[4..].parse().expect("index");
            let want = mixed(i, p.position as usize - 1);
            assert!(p.propensity >= eps / n, "below the floor: {p:?}");
            if want < 2.0 * eps / n {
                diffs.push(p.propensity - want);
                exact_sum += want;
            }
        }
    }
    let count = diffs.len() as f64;
    assert!(count >= 300.0, "only {count} rare placements served; the example needs more");
    let mean = diffs.iter().sum::<f64>() / count;
    let sd = (diffs.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / (count - 1.0)).sqrt();
    let se = sd / count.sqrt();
    let relative = mean / (exact_sum / count);
    assert!(
        mean.abs() < 4.5 * se && relative.abs() < 0.1,
        "rare placements: mean bias {mean:.6} ({:+.1} %), standard error {se:.6}, {count} placements",
        100.0 * relative
    );
    eprintln!(
        "rare placements: {count} served, mean bias {:+.2} % (se {:.2} %)",
        100.0 * relative,
        100.0 * se / (exact_sum / count)
    );
}

#[test]
fn thompson_propensities_of_alike_candidates_are_one_over_n_and_precise_at_the_default_count() {
    // Twenty candidates with the same posterior: by symmetry every one of them is at every
    // position with probability exactly 1/20, whatever ε (the oracle). At the default 16
    // rankings the estimate must be unbiased and have a relative error well under what hit
    // counts over 16 rankings give (√(0.95 / (0.05 · 16)) ≈ 109 %): conditional Monte Carlo
    // gives each placement the probability of its own score falling between the others'.
    // Unseen candidates of the Beta model (the prior Beta(1, 9): a closed-form CDF) and of the
    // linear one (normal scores), and learned ones all at Beta(7, 30) (the continued fraction).
    let config = banditflow::config::Config::from_layers(None, Vec::new()).expect("default config");
    let defaults = config.policy;
    assert_eq!(defaults.propensity_samples, 16, "the default this test is about");
    let policy = PolicySpec { strategy: Strategy::Thompson, epsilon: 0.05, ..defaults };
    let unseen: Vec<String> = (0..20).map(|k| format!("unseen{k}")).collect();
    let alike = shard_with_posteriors(&[(7, 30); 20]);
    for model in ["pbm", "lin", "learned"] {
        let trained = (model != "learned").then(|| trained(model));
        let (spec, shard, c, segment) = match &trained {
            Some((spec, f, i)) => (&spec.models[*i], &f.state.models[*i], &unseen, "women"),
            None => (&alike.0.models[2], &alike.1, &alike.2, "s"),
        };
        let n = c.len() as f64;
        // Relative errors of every placement, and their mean per request (a request's
        // placements share its rankings, so the standard error is taken over requests).
        let (mut rel, mut per_request) = (Vec::new(), Vec::new());
        for seed in 0..400 {
            let req = RankRequest { slate_size: 10, segment, ..request(c, seed) };
            let slate = rank(spec, shard, &policy, &req);
            assert_eq!(slate.len(), 10);
            let errors: Vec<f64> = slate.iter().map(|p| p.propensity * n - 1.0).collect();
            per_request.push(errors.iter().sum::<f64>() / errors.len() as f64);
            rel.extend(errors);
        }
        let count = rel.len() as f64;
        let rmse = (rel.iter().map(|r| r * r).sum::<f64>() / count).sqrt();
        let requests = per_request.len() as f64;
        let mean = per_request.iter().sum::<f64>() / requests;
        let sd = (per_request.iter().map(|m| (m - mean) * (m - mean)).sum::<f64>() / (requests - 1.0)).sqrt();
        let se = sd / requests.sqrt();
        eprintln!("{model}: {count} placements, mean relative error {mean:+.4} (se {se:.4}), RMSE {rmse:.3}");
        assert!(mean.abs() < 4.5 * se, "{model}: biased: mean relative error {mean:+.4}, se {se:.4}");
        assert!(rmse < 0.3, "{model}: relative RMSE {rmse:.3} at the default count");
    }
}
