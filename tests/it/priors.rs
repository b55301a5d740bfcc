//! Empirical-Bayes priors: the fit against a generator's Beta, the configuration, the sources
//! of the prior in force, and the effect on early regret against the flat Beta(1, 1) a model
//! without a configured prior used to get (the table over horizons: `cargo bench --bench
//! priors`).

use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution};

use banditflow::core::event::{Event, FeedbackKind, Variant};
use banditflow::core::params::{CoreSpec, Examination, PositionModel, Prior};
use banditflow::core::prior::{beta_moments, fit_beta_prior, PriorSource, EMPIRICAL_TEMPER};

use crate::support::*;

#[test]
fn the_fit_recovers_the_beta_the_arms_were_drawn_from() {
    // 300 arms with true rates from Beta(2, 98) (mean 0.02, strength 100), 400 exposures each.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let truth = Beta::new(2.0, 98.0).expect("beta");
    let arms: Vec<(f64, f64)> = (0..300)
        .map(|_| {
            let p: f64 = truth.sample(&mut rng);
            let s = (0..400).filter(|_| rng.random::<f64>() < p).count() as f64;
            (s, 400.0)
        })
        .collect();
    let m = beta_moments(&arms).expect("enough arms");
    assert!((m.mean - 0.02).abs() < 0.002, "mean {}", m.mean);
    assert!((60.0..170.0).contains(&m.strength), "strength {} (true 100)", m.strength);
    // The prior in force keeps the mean and a quarter of the strength.
    let fit = fit_beta_prior(&arms).expect("enough arms");
    assert!((fit.alpha / (fit.alpha + fit.beta) - m.mean).abs() < 1e-12, "{fit:?}");
    assert!((fit.alpha + fit.beta - m.strength * EMPIRICAL_TEMPER).abs() < 1e-9, "{fit:?}");
    // Too few arms: no fit. Identical arms: as strong as their evidence allows (1,000
    // exposures each, the cap).
    assert_eq!(fit_beta_prior(&arms[..4]), None);
    let same = beta_moments(&[(10.0, 1000.0); 8]).expect("fit");
    assert!((same.strength - 1000.0).abs() < 1e-9, "{same:?}");
    // Little evidence per arm: no stronger than it.
    let thin = beta_moments(&[(0.0, 3.0), (1.0, 3.0), (0.0, 3.0), (0.0, 3.0), (0.0, 3.0)]).expect("fit");
    assert!(thin.strength <= 3.0 + 1e-12, "{thin:?}");
}

#[test]
fn a_model_without_a_prior_gets_an_empirical_one_and_bad_values_name_the_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let load = |models: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, models).expect("write");
        banditflow::config::Config::load(Some(&path), std::iter::empty())
    };
    let none = load("[[models]]\nid = \"m\"\n").expect("loads");
    assert!(none.core.models[0].empirical_prior, "no prior configured: empirical Bayes");
    let named = load("[[models]]\nid = \"m\"\nprior = \"empirical\"\n").expect("loads");
    assert!(named.core.models[0].empirical_prior);
    let fixed = load("[[models]]\nid = \"m\"\nprior = { alpha = 2.0, beta = 50.0 }\n").expect("loads");
    assert!(!fixed.core.models[0].empirical_prior);
    assert_eq!(fixed.core.models[0].prior, Prior { alpha: 2.0, beta: 50.0 });
    for (text, want) in [
        ("prior = \"flat\"", "models[0].prior"),
        ("prior = { alpha = -1.0, beta = 2.0 }", "models[0].prior.alpha"),
        ("prior = { alpha = 1.0 }", "models[0].prior"),
    ] {
        let e = load(&format!("[[models]]\nid = \"m\"\n{text}\n")).expect_err(text).to_string();
        assert!(e.contains(&format!("`{want}`")), "{text}: {e}");
    }
    let env = banditflow::config::Config::load(
        None,
        [("BANDITFLOW__MODELS__0__PRIOR".to_string(), "empirical".to_string())],
    )
    .expect("loads");
    assert!(env.core.models[0].empirical_prior, "from the environment too");
}

/// One model: Beta, every position examined, no decay, click reward 1 at scale 1.
fn one_model(empirical: bool) -> CoreSpec {
    let mut spec = unbounded_spec();
    spec.models.truncate(1);
    let m = &mut spec.models[0];
    m.position = PositionModel::Pbm(Examination::Fixed(vec![1.0]));
    m.half_life_ms = 0;
    m.prior = Prior { alpha: 1.0, beta: 1.0 };
    m.empirical_prior = empirical;
    m.rewards.scale = 1.0;
    spec.rewards.scale = 1.0;
    spec
}

/// Cumulative expected regret of Thompson sampling after `rounds` single-slot impressions of
/// `items` arms whose click rates are drawn from Beta(2, 98) (the same for both priors).
fn regret(empirical: bool, seed: u64, items: usize, rounds: usize) -> f64 {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let truth = Beta::new(2.0, 98.0).expect("beta");
    let rates: Vec<f64> = (0..items).map(|_| truth.sample(&mut rng)).collect();
    let curve = banditflow::simulate::thompson_regret_curve(&one_model(empirical), &rates, rounds, seed);
    curve[rounds - 1]
}

#[test]
fn an_empirical_prior_cuts_early_regret_against_a_flat_one() {
    // 100 items whose click rates are drawn from Beta(2, 98) (a shop's 2 %); Thompson sampling
    // for 3,000 impressions, 16 seeds. With Beta(1, 1) every unseen item looks like a coin flip and is
    // explored until its mean falls from 0.5 to 0.02; the empirical prior, fitted from the arms
    // seen so far, starts new items near the shop's rate.
    let seeds = 16;
    let (mut flat, mut eb) = (Vec::new(), Vec::new());
    for seed in 0..seeds {
        flat.push(regret(false, seed, 100, 3000));
        eb.push(regret(true, seed, 100, 3000));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (f, e) = (mean(&flat), mean(&eb));
    eprintln!("early regret over 3,000 impressions, mean of {seeds} seeds: flat Beta(1, 1) {f:.2}, empirical {e:.2} ({:+.0} %)", 100.0 * (e / f - 1.0));
    eprintln!("empirical better in {} of {seeds} seeds", flat.iter().zip(&eb).filter(|(a, b)| b < a).count());
    assert!(e < 0.95 * f, "empirical {e:.2} vs flat {f:.2} ({eb:?} vs {flat:?})");
    let wins = flat.iter().zip(&eb).filter(|(a, b)| b < a).count();
    assert!(wins as u64 >= seeds * 3 / 4, "empirical better in only {wins} of {seeds} seeds");
}

#[test]
fn a_segment_with_enough_arms_gets_its_own_fit_and_the_others_the_models() {
    let spec = one_model(true);
    let mut f = Feeder::new(&spec, 0);
    // Six arms with data in segment "a", two in "b": "a" gets its own fit, "b" the model's.
    let mut t = 0;
    for (seg, item, n, clicks) in [
        ("a", "x1", 200, 4),
        ("a", "x2", 200, 6),
        ("a", "x3", 200, 2),
        ("a", "x4", 200, 8),
        ("a", "x5", 200, 3),
        ("a", "x6", 200, 5),
        ("b", "y1", 50, 1),
        ("b", "y2", 50, 2),
    ] {
        for k in 0..n {
            t += 1;
            let id = format!("{seg}{item}{k}");
            f.feed(
                &spec,
                &Event::Impression(impression(
                    &id,
                    &spec.models[0].id,
                    T0 + t,
                    Variant::Treatment,
                    seg,
                    &[item],
                )),
            );
            if k < clicks {
                f.feed(&spec, &Event::Feedback(feedback(&id, item, 1, FeedbackKind::Click, T0 + t)));
            }
        }
    }
    let shard = &f.state.models[0];
    let p = shard.fit_priors(&spec.models[0], T0 + t);
    assert_eq!(p.by_segment["a"].1, PriorSource::Segment);
    assert_eq!(p.by_segment["b"].1, PriorSource::Model);
    assert_eq!(p.other.1, PriorSource::Model);
    // "a": 28 clicks in 1,200 exposures; the fitted mean is the smoothed pooled rate.
    let a = p.by_segment["a"].0;
    assert!((a.alpha / (a.alpha + a.beta) - 28.5 / 1201.0).abs() < 1e-12, "{a:?}");
    // A configured model says so.
    let configured = one_model(false);
    assert_eq!(shard.fit_priors(&configured.models[0], T0 + t).by_segment["a"].1, PriorSource::Configured);
}
