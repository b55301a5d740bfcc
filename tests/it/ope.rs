//! Off-policy evaluation (`banditflow evaluate`): the estimators against their closed forms,
//! identities that must hold exactly, refusals, and obp's own estimators on the Open Bandit
//! Dataset sample (`scripts/ope_crosscheck.py`).

use std::path::PathBuf;

use rand::{Rng, SeedableRng};

use banditflow::config::Config;
use banditflow::core::event::{self, Event, FeedbackKind, TopicRole, Variant};
use banditflow::core::ope::{estimate, Round};
use banditflow::evaluate::{evaluate, EvalError, Options};
use banditflow::recording::Record;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_estimators_equal_their_closed_forms() {
    // Three rounds worked by hand. w = π/π_b = 2, 0.5, 0.
    let rounds = [
        Round { reward: 1.0, pscore: 0.25, pi: 0.5, dm: 0.4, q: 0.3 },
        Round { reward: 0.0, pscore: 0.5, pi: 0.25, dm: 0.2, q: 0.1 },
        Round { reward: 2.0, pscore: 0.5, pi: 0.0, dm: 0.6, q: 0.5 },
    ];
    let r = estimate(&rounds).expect("rounds");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
    assert!(close(r.logged.value, 1.0));
    // IPW: (2·1 + 0.5·0 + 0·2) / 3.
    assert!(close(r.ipw.value, 2.0 / 3.0), "{r:?}");
    // SNIPW: (2·1 + 0 + 0) / (2 + 0.5 + 0).
    assert!(close(r.snipw.expect("weights").value, 0.8), "{r:?}");
    // DM: (0.4 + 0.2 + 0.6) / 3.
    assert!(close(r.dm.value, 0.4), "{r:?}");
    // DR: (0.4 + 2·(1 − 0.3)) + (0.2 + 0.5·(0 − 0.1)) + (0.6 + 0) = 1.8 + 0.15 + 0.6, / 3.
    assert!(close(r.dr.value, 2.55 / 3.0), "{r:?}");
    // ESS: (2.5)² / (4 + 0.25).
    assert!(close(r.effective_sample_size, 6.25 / 4.25), "{r:?}");
    assert_eq!(r.max_weight, 2.0);
    // IPW's interval: ± 1.96 · sd(2, 0, 0) / √3, sd with n − 1.
    let sd = ((2.0f64 - 2.0 / 3.0).powi(2) + 2.0 * (2.0f64 / 3.0).powi(2)).sqrt() / 2f64.sqrt();
    assert!((r.ipw.high - r.ipw.value - 1.959_963_984_540_054 * sd / 3f64.sqrt()).abs() < 1e-12, "{r:?}");
    assert!(estimate(&[]).is_none());
}

/// A config with JSON topics, one Beta model `m` and the given `[policy]` lines.
fn config(policy: &str) -> Config {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            r#"{policy}
[input]
topics = [
  {{ name = "impressions", role = "impressions", encoding = "json" }},
  {{ name = "feedback", role = "feedback", encoding = "json" }},
]
[rewards]
click = {{ reward = 1.0, window = "1h" }}
scale = 1.0
[[models]]
id = "m"
algorithm = "beta"
position_model = "pbm"
examination = [1.0]
half_life = "30d"
prior = {{ alpha = 1.0, beta = 9.0 }}
"#
        ),
    )
    .expect("config");
    Config::load(Some(&path), std::iter::empty()).expect("config loads")
}

/// A log of `n` single-slot impressions, each showing one of `items` uniformly at random with
/// the propensity `pscore(k)` for the k-th impression, clicked with the item's own rate.
fn uniform_log(config: &Config, n: usize, items: usize, pscore: impl Fn(usize) -> f64) -> (Vec<Record>, f64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let t0 = 1_767_225_600_000i64;
    let mut records = Vec::new();
    let mut clicks = 0.0;
    let (mut imp_off, mut fb_off) = (0, 0);
    for k in 0..n {
        let item = rng.random_range(0..items);
        let t = t0 + k as i64 * 1000;
        let id = format!("imp-{k}");
        let mut imp =
            crate::support::impression(&id, "m", t, Variant::Treatment, "s", &[&format!("item-{item}")]);
        imp.slate[0].propensity = pscore(k);
        let topic = |role| config.topics.iter().find(|t| t.role == role).expect("topic");
        let it = topic(TopicRole::Impressions);
        records.push(Record {
            topic: it.name.clone(),
            partition: (k % 2) as i32,
            offset: imp_off,
            timestamp_ms: Some(t),
            key: Some(id.clone().into_bytes()),
            headers: Vec::new(),
            payload: event::encode(it.role, it.encoding, &Event::Impression(imp)),
        });
        imp_off += 1;
        if rng.random::<f64>() < 0.05 + 0.1 * item as f64 / items as f64 {
            clicks += 1.0;
            let ft = topic(TopicRole::Feedback);
            let fb = crate::support::feedback(&id, &format!("item-{item}"), 1, FeedbackKind::Click, t + 10);
            records.push(Record {
                topic: ft.name.clone(),
                partition: (k % 2) as i32,
                offset: fb_off,
                timestamp_ms: Some(t + 10),
                key: Some(id.into_bytes()),
                headers: Vec::new(),
                payload: event::encode(ft.role, ft.encoding, &Event::Feedback(fb)),
            });
            fb_off += 1;
        }
    }
    (records, clicks / n as f64)
}

#[test]
fn a_uniform_policy_on_a_uniform_log_is_worth_exactly_the_logged_reward() {
    // Logged uniformly over 8 items (π_b = 1/8) and evaluated with ε = 1 (π_e = 1/8 too): every
    // weight is 1, so IPW and SNIPW must equal the mean logged reward, which the test counts.
    let c = config("[policy]\nstrategy = \"greedy\"\nepsilon = 1.0\n");
    let (records, truth) = uniform_log(&c, 12_000, 8, |_| 1.0 / 8.0);
    let options = Options { samples: 100, details: false, max_refused_share: 0.0 };
    let e = evaluate(&c, &records, options).expect("evaluates");
    let r = e.models[0].report.as_ref().expect("rounds");
    assert_eq!(r.rounds, 12_000);
    assert_eq!(e.models[0].catalog.len(), 8);
    assert!((r.logged.value - truth).abs() < 1e-12, "{} vs {truth}", r.logged.value);
    assert!((r.ipw.value - truth).abs() < 1e-12, "{r:?}");
    assert!((r.snipw.expect("weights").value - truth).abs() < 1e-12, "{r:?}");
    assert!((r.effective_sample_size - 12_000.0).abs() < 1e-6, "{r:?}");
    // An ε-greedy policy (ε = 0.1) learning the click rates is worth more than the uniform log
    // and less than the same policy knowing them from the start, by the generator's rates:
    // 0.9 · 0.1375 (best item) + 0.1 · 0.09375 (mean) = 0.1331.
    let greedy = config("[policy]\nstrategy = \"greedy\"\nepsilon = 0.1\n");
    let g = evaluate(&greedy, &records, options).expect("evaluates");
    let gr = g.models[0].report.as_ref().expect("rounds");
    let oracle = 0.9 * (0.05 + 0.1 * 7.0 / 8.0) + 0.1 * (0.05 + 0.1 * 3.5 / 8.0);
    for (name, e) in [("ipw", gr.ipw), ("dr", gr.dr)] {
        assert!(
            e.low > truth && e.value < oracle + 3.0 * e.std_error,
            "{name} {e:?}: uniform {truth}, oracle {oracle}"
        );
    }
}

#[test]
fn impressions_without_a_propensity_are_refused_and_named() {
    let c = config("[policy]\nstrategy = \"greedy\"\nepsilon = 0.1\n");
    // Every propensity 0 (a log written without them): refused, naming the first.
    let (records, _) = uniform_log(&c, 200, 4, |_| 0.0);
    let options = Options { samples: 100, details: false, max_refused_share: 0.01 };
    let err = evaluate(&c, &records, options).expect_err("refused");
    let EvalError::NoPropensity { refused, impressions, .. } = &err else { panic!("{err}") };
    assert_eq!((refused.count, *impressions, refused.offset), (200, 200, 0));
    let text = err.to_string();
    assert!(text.contains("200 of 200 impressions have no valid propensity"), "{text}");
    assert!(text.contains("topic `impressions` offset 0"), "{text}");
    // One bad impression in 200 is left out and reported; the other 199 are evaluated.
    let (records, _) = uniform_log(&c, 200, 4, |k| if k == 17 { 1.5 } else { 0.25 });
    let e = evaluate(&c, &records, options).expect("evaluates");
    assert_eq!(e.refused.as_ref().map(|r| r.count), Some(1));
    assert_eq!(e.models[0].report.as_ref().map(|r| r.rounds), Some(199));
}

#[test]
fn obps_own_estimators_agree_on_the_open_bandit_dataset() {
    // scripts/ope_crosscheck.py: obp 0.5.7's bundled Open Bandit Dataset sample (random and
    // Bernoulli TS logs, 10,000 rounds each), evaluated by banditflow for ε-greedy and Thompson
    // sampling; obp's IPW, SNIPW and DR on the same arrays must agree to 1e-9.
    let work = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new("python3")
        .arg(root().join("scripts/ope_crosscheck.py"))
        .args(["--banditflow", env!("CARGO_BIN_EXE_banditflow"), "--work"])
        .arg(work.path())
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cross-check failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    assert_eq!(v["agree"], serde_json::json!(true), "{v}");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "{v}");
    for r in results {
        assert_eq!(r["rounds"], serde_json::json!(10_000), "{r}");
        for est in ["ipw", "snipw", "dr"] {
            let d = r[est]["abs_diff"].as_f64().expect("diff");
            assert!(d <= 1e-9, "{est}: {r}");
        }
    }
    eprintln!("{stderr}");
}
