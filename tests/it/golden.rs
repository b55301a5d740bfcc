//! Golden tests of the offline replay, through the binary as a user runs it: the fixture
//! replays to byte-identical files twice, its summary matches the reviewed golden file, and the
//! fixture itself is what the generator makes (so it can always be re-made).
//!
//! To accept an intended change: `UPDATE_GOLDEN=1 cargo test golden`, then review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_banditflow"))
}

fn replay(out: &Path) -> String {
    let o = bin()
        .args(["replay", "--input"])
        .arg(root().join("tests/fixtures/shop.jsonl"))
        .arg("--config")
        .arg(root().join("tests/fixtures/shop.toml"))
        .arg("--out")
        .arg(out)
        .env_remove("BANDITFLOW__JOIN__GRACE")
        .output()
        .expect("runs");
    assert!(o.status.success(), "replay failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).expect("utf-8 summary")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn replaying_the_fixture_twice_gives_identical_files() {
    let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let sa = replay(a.path());
    let sb = replay(b.path());
    // Identical but for the output directory named on the last line.
    let body = |s: &str| s.lines().filter(|l| !l.starts_with("wrote ")).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&sa), body(&sb));
    let fa = files(a.path());
    let fb = files(b.path());
    let rel = |v: &[PathBuf], base: &Path| {
        v.iter().map(|p| p.strip_prefix(base).expect("under").to_path_buf()).collect::<Vec<_>>()
    };
    assert_eq!(rel(&fa, a.path()), rel(&fb, b.path()));
    // One snapshot per model and partition plus one merged per model: 3 models × (2 + 1).
    assert_eq!(fa.iter().filter(|p| p.extension().is_some_and(|e| e == "snapshot")).count(), 9);
    for (x, y) in fa.iter().zip(&fb) {
        let st = Command::new("cmp").arg(x).arg(y).status().expect("cmp runs");
        assert!(st.success(), "{} and {} differ", x.display(), y.display());
    }
    let golden = root().join("tests/fixtures/shop.summary.txt");
    let summary = std::fs::read_to_string(a.path().join("summary.txt")).expect("summary written");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &summary).expect("write golden");
    }
    let want = std::fs::read_to_string(&golden).expect("golden summary exists (UPDATE_GOLDEN=1 makes it)");
    assert_eq!(summary, want, "summary differs from {}", golden.display());
}

#[test]
fn the_fixture_is_what_the_generator_makes() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("shop.jsonl");
    let o =
        bin().args(["generate", "--models", "home,search,recs", "--out"]).arg(&out).output().expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let made = std::fs::read(&out).expect("written");
    let fixture = std::fs::read(root().join("tests/fixtures/shop.jsonl")).expect("fixture");
    assert!(made == fixture, "generator output differs from tests/fixtures/shop.jsonl");
}

#[test]
fn dead_letters_carry_their_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let summary = replay(dir.path());
    let dl = std::fs::read_to_string(dir.path().join("dead-letters.jsonl")).expect("dead letters");
    let lines: Vec<&str> = dl.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let r = banditflow::recording::parse_line(1, l).expect("dead letter is a record");
        let code = r.headers.iter().find(|(k, _)| k == banditflow::replay::HEADER_CODE).expect("code header");
        assert!(!code.1.is_empty());
        assert!(r.headers.iter().any(|(k, v)| k == banditflow::replay::HEADER_REASON && !v.is_empty()));
    }
    assert!(summary.contains(&format!("invalid {}", lines.len())), "summary counts every dead letter");
}

#[test]
fn bad_config_names_the_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("bad.toml");
    for (text, env, field) in [
        ("[join]\ngrace = \"soon\"\n", None, "join.grace"),
        ("[[models]]\nid = \"m\"\nposition_model = \"zigzag\"\n", None, "models[0].position_model"),
        ("", Some(("BANDITFLOW__POLICY__EPSILON", "7")), "policy.epsilon"),
    ] {
        std::fs::write(&cfg, text).expect("write");
        let mut c = bin();
        c.args(["replay", "--input"])
            .arg(root().join("tests/fixtures/shop.jsonl"))
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(dir.path().join("out"));
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let o = c.output().expect("runs");
        assert!(!o.status.success(), "{field}: accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(field), "{field} not named in: {err}");
    }
}

#[test]
fn every_model_of_the_fixture_learns_something_real() {
    // A summary that shows only priors would pass a golden comparison; this would not. Each
    // model's most-clicked arm, read as the summary reads it, must carry evidence well beyond
    // its prior: successes and exposures that have not decayed away.
    let config = banditflow::config::Config::load(Some(&root().join("tests/fixtures/shop.toml")), Vec::new())
        .expect("fixture config");
    let text = std::fs::read_to_string(root().join("tests/fixtures/shop.jsonl")).expect("fixture");
    let mut run = banditflow::replay::ReplayRun::default();
    for (i, l) in text.lines().enumerate() {
        let r = banditflow::recording::parse_line(i + 1, l).expect("fixture line");
        banditflow::replay::apply_record(&config, &mut run, r);
    }
    for m in banditflow::replay::merged_models(&config, &run).expect("merges") {
        let spec = &m.spec;
        let now = m.shard.read_time(m.meta.watermark_ms);
        let exam = matches!(
            spec.position,
            banditflow::core::params::PositionModel::Pbm(banditflow::core::params::Examination::Estimated)
        )
        .then(|| m.shard.estimated_examination());
        let (seg, item, _) = m
            .shard
            .arms
            .iter()
            .flat_map(|(s, items)| items.iter().map(move |(i, a)| (s, i, a.feedback[0])))
            .max_by_key(|(s, i, clicks)| (*clicks, (*s).clone(), (*i).clone()))
            .expect("arms");
        let post = m.shard.posterior(spec, seg, item, now, exam.as_deref());
        let prior = spec.prior_for(seg);
        let evidence = (post.alpha + post.beta) - (prior.alpha + prior.beta);
        assert!(
            post.alpha - prior.alpha > 5.0 && evidence > 50.0,
            "model {}: top arm {seg}/{item} reads as Beta({}, {}) against prior Beta({}, {})",
            spec.id,
            post.alpha,
            post.beta,
            prior.alpha,
            prior.beta
        );
    }
}
