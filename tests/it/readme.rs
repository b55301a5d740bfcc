//! The README's commands, run as written: every ```sh block, in order, as one bash script
//! against the test broker, with the built `banditflow` on PATH (`cargo run --release --`
//! stands for it). So the README cannot drift from the program. Also: every example config
//! loads.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banditflow::config::Config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The ```sh blocks of `text`, in order.
fn shell_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match (&mut cur, line.trim_end()) {
            (None, "```sh") => cur = Some(String::new()),
            (Some(_), "```") => out.extend(cur.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn every_example_config_loads() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("config/examples")).expect("config/examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(Some(&path), Vec::new()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "example configs: {n}");
}

#[test]
fn the_readme_commands_work_as_written() {
    let bootstrap = crate::kafka::bootstrap();
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let blocks = shell_blocks(&readme);
    assert!(blocks.len() >= 2, "README has {} sh blocks", blocks.len());
    // Background jobs (`run`, `serve`) are stopped however the script ends.
    let script =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{}", blocks.join("\n"))
            .replace("cargo run --release --", "banditflow")
            .replace("127.0.0.1:39092", &bootstrap);
    // A scratch directory that sees the repository's files but keeps what the commands write.
    let dir = tempfile::tempdir().expect("tmp");
    for d in ["config", "scripts", "tests", "api"] {
        std::os::unix::fs::symlink(root().join(d), dir.path().join(d)).expect("symlink");
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_banditflow"));
    let path =
        format!("{}:{}", bin.parent().expect("bin dir").display(), std::env::var("PATH").unwrap_or_default());
    let log = dir.path().join("readme.log");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        // The example config names the development broker; the suite's may listen elsewhere.
        .env("BANDITFLOW__KAFKA__BOOTSTRAP_SERVERS", &bootstrap)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(dir.path().join("readme.err")).expect("log"))
        .spawn()
        .expect("bash runs");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.is_none() {
        // Over time: SIGTERM lets the script's EXIT trap stop its background jobs.
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until && child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let err = std::fs::read_to_string(dir.path().join("readme.err")).unwrap_or_default();
    let tail = |s: &str| {
        s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    match status {
        Some(st) if st.success() => {}
        Some(st) => panic!(
            "the README's commands failed ({st})\n--- stdout:\n{}\n--- stderr:\n{}",
            tail(&out),
            tail(&err)
        ),
        None => panic!(
            "the README's commands ran over 300 s\n--- stdout:\n{}\n--- stderr:\n{}",
            tail(&out),
            tail(&err)
        ),
    }
    // What they should have shown: a ranked slate and the learned model.
    assert!(out.contains("\"impression_id\""), "no rank answer in:\n{}", tail(&out));
    assert!(out.contains("\"ready\":true"), "the node never got ready:\n{}", tail(&out));
    assert!(out.contains("model home"), "inspect-topic output missing:\n{}", tail(&out));
}
