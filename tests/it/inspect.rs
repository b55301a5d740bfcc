//! `banditflow inspect`: JSON at full precision, every position's examination, reading the
//! decayed statistics at a chosen time, and the linear model's own view.

use std::path::PathBuf;
use std::process::Command;

use banditflow::replay::{format_time, parse_time};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_banditflow"))
}

/// Replays the golden fixture into a temporary directory; returns it.
fn replayed() -> tempfile::TempDir {
    replayed_with(&[]).0
}

/// [`replayed`] with environment overrides of the config; also returns the printed summary.
fn replayed_with(env: &[(&str, &str)]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args(["replay", "--input"])
        .arg(root().join("tests/fixtures/shop.jsonl"))
        .arg("--config")
        .arg(root().join("tests/fixtures/shop.toml"))
        .arg("--out")
        .arg(dir.path())
        .envs(env.iter().copied())
        .output()
        .expect("replay runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn inspect_json(path: &std::path::Path, extra: &[&str]) -> Value {
    let out = bin().arg("inspect").arg(path).arg("--json").args(extra).output().expect("inspect runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn times_parse_as_they_are_printed() {
    // 2026-01-01 is day 20,454 of the epoch.
    assert_eq!(parse_time("2026-01-01T00:00:00Z"), Some(20_454 * 86_400_000));
    assert_eq!(parse_time("2026-01-01T00:00:00.5Z"), Some(20_454 * 86_400_000 + 500));
    assert_eq!(parse_time("1767225600123"), Some(1_767_225_600_123));
    for ms in [0i64, 951_782_400_000, 1_767_225_600_123, 4_102_444_799_999, 1_709_164_800_000] {
        assert_eq!(parse_time(&format_time(ms)), Some(ms), "{}", format_time(ms));
    }
    for bad in [
        "2026-13-01T00:00:00Z",
        "2026-01-01 00:00:00",
        "yesterday",
        "2026-01-01T00:00:00",
        "99999999999-01-01T00:00:00Z",
        "2026-01-01T-1:00:00Z",
    ] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
    let out = bin().args(["inspect", "x.snapshot", "--at", "tomorrow"]).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither RFC 3339"), "{out:?}");
}

#[test]
fn inspect_json_shows_every_position_and_every_arm_at_full_precision() {
    let dir = replayed();
    let config = std::fs::read_to_string(root().join("tests/fixtures/shop.toml")).expect("config");
    assert!(config.contains("examination = [1.0, 0.77, 0.63, 0.53, 0.45, 0.4]"));
    let home = inspect_json(&dir.path().join("home/merged.snapshot"), &[]);
    assert_eq!(home["examination"]["source"], "configured");
    assert_eq!(home["examination"]["by_position"], serde_json::json!([1.0, 0.77, 0.63, 0.53, 0.45, 0.4]));
    let arms = home["arms"].as_array().expect("arms");
    assert_eq!(arms.len() as u64, home["arm_count"].as_u64().expect("count"), "every arm without --top");
    // Best first, and means within their intervals.
    for w in arms.windows(2) {
        assert!(w[0]["mean"].as_f64() >= w[1]["mean"].as_f64(), "{} {}", w[0], w[1]);
    }
    for a in arms {
        let (lo, m, hi) = (
            a["low"].as_f64().expect("number"),
            a["mean"].as_f64().expect("number"),
            a["high"].as_f64().expect("number"),
        );
        assert!(lo <= m && m <= hi, "{a}");
    }
    assert_eq!(
        inspect_json(&dir.path().join("home/merged.snapshot"), &["--top", "3"])["arms"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    // Estimated examination: one weight per position shown (the fixture's slates have 6).
    let recs = inspect_json(&dir.path().join("recs/merged.snapshot"), &[]);
    assert_eq!(recs["examination"]["source"], "estimated");
    let e = recs["examination"]["by_position"].as_array().expect("curve");
    assert_eq!(e.len(), 6, "{e:?}");
    assert_eq!(e[0].as_f64(), Some(1.0));
    assert!(e.iter().all(|w| (0.01..=1.0).contains(&w.as_f64().expect("number"))), "{e:?}");
}

#[test]
fn inspect_at_a_later_time_decays_every_arm_to_its_prior() {
    let dir = replayed();
    let path = dir.path().join("home/merged.snapshot");
    let now = inspect_json(&path, &[]);
    assert_eq!(now["read_at_source"], "newest impression");
    assert_eq!(now["read_at_ms"], now["newest_impression_ms"]);
    // 200 half-lives (7 days each) later the data weigh 2^-200: every arm reads as its
    // segment's prior, α / (α + β), from the fixture's config (1/10, kids 1/16).
    let later = now["newest_impression_ms"].as_i64().expect("newest") + 200 * 7 * 86_400_000;
    let at = format_time(later);
    let decayed = inspect_json(&path, &["--at", &at]);
    assert_eq!(decayed["read_at_source"], "--at");
    assert_eq!(decayed["read_at_ms"].as_i64(), Some(later));
    for a in decayed["arms"].as_array().expect("arms") {
        let prior = if a["segment"] == "kids" { 1.0 / 16.0 } else { 1.0 / 10.0 };
        assert!((a["mean"].as_f64().expect("number") - prior).abs() < 1e-12, "{a}");
    }
    // Read earlier than the data, the weights grow: a mean moves away from the prior.
    let text = bin().arg("inspect").arg(&path).args(["--at", &at]).output().expect("runs");
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("read at {at} (--at)")));
}

#[test]
fn a_linear_model_is_shown_by_its_own_scores() {
    // Regression: the summary printed Beta posteriors for a linear model. Its arms now show
    // θ̂·x with the interval LinTS draws from, and the best arm of a segment is the one a
    // greedy ranking without context puts first.
    let dir = replayed();
    let path = dir.path().join("search/merged.snapshot");
    let v = inspect_json(&path, &[]);
    assert_eq!(v["algorithm"], "linear");
    assert_eq!(v["examination"], Value::Null, "cascade has no examination curve");
    let arms = v["arms"].as_array().expect("arms");
    let seg = arms[0]["segment"].as_str().expect("segment").to_string();
    let items: Vec<&str> = arms
        .iter()
        .filter(|a| a["segment"] == seg.as_str())
        .map(|a| a["item"].as_str().expect("string"))
        .collect();
    let out = bin()
        .arg("rank")
        .arg("--snapshot")
        .arg(&path)
        .args(["--segment", &seg, "--candidates", &items.join(","), "--strategy", "greedy", "--epsilon", "0"])
        .args(["--now-ms", &v["read_at_ms"].to_string()])
        .output()
        .expect("rank runs");
    let ranked = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{ranked} {}", String::from_utf8_lossy(&out.stderr));
    assert!(ranked.contains(arms[0]["item"].as_str().expect("string")), "{ranked}");
    let first_line = ranked.lines().find(|l| l.split_whitespace().next() == Some("1")).unwrap_or("");
    assert!(
        first_line.contains(arms[0]["item"].as_str().expect("string")),
        "best arm {} vs ranking:\n{ranked}",
        arms[0]
    );
}

#[test]
fn inspect_says_which_prior_is_in_force() {
    // The fixture's home model with its prior switched to empirical Bayes from the environment:
    // kids keeps its configured segment prior, the other segments get their own fits.
    let (dir, summary) = replayed_with(&[("BANDITFLOW__MODELS__0__PRIOR", "empirical")]);
    assert!(
        summary.contains(
            "prior in force: empirical Bayes, fitted at read time: kids Beta(1.000, 15.000) (configured)"
        ),
        "{summary}"
    );
    let v = inspect_json(&dir.path().join("home/merged.snapshot"), &[]);
    assert_eq!(v["prior_kind"], "empirical");
    let by = &v["prior_in_force"]["by_segment"];
    assert_eq!(by["kids"]["source"], "configured");
    for seg in ["men", "women"] {
        assert_eq!(by[seg]["source"], "empirical (segment)", "{v}");
        let (a, b) = (by[seg]["alpha"].as_f64().expect("alpha"), by[seg]["beta"].as_f64().expect("beta"));
        assert!(a > 0.0 && b > a, "{seg}: Beta({a}, {b})");
    }
    // The configured model says so.
    let recs = inspect_json(&dir.path().join("recs/merged.snapshot"), &[]);
    assert_eq!(recs["prior_kind"], "configured");
}
