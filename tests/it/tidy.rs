//! Architecture invariants, enforced: the core does no I/O, reads no clock, draws no unseeded
//! randomness, and does not depend on the async runtime, Kafka, metrics or logging.

use std::path::Path;

const FORBIDDEN: &[(&str, &str)] = &[
    ("tokio", "the async runtime"),
    ("rdkafka", "Kafka"),
    ("metrics", "metrics"),
    ("tracing", "logging"),
    ("std::time", "the clock"),
    ("SystemTime", "the clock"),
    ("Instant", "the clock"),
    ("thread_rng", "unseeded randomness"),
    ("rand::rng(", "unseeded randomness"),
    ("from_entropy", "unseeded randomness"),
    ("from_os_rng", "unseeded randomness"),
    ("OsRng", "unseeded randomness"),
    ("std::fs", "file I/O"),
    ("std::net", "network I/O"),
    ("std::env", "the environment"),
    ("println!", "printing"),
    ("eprintln!", "printing"),
    ("crate::config", "config files (the core takes validated parameters)"),
    ("crate::replay", "an edge"),
];

/// Every forbidden use in the `.rs` files of `dir` and its subdirectories, as
/// "file:line: uses …"; and how many files were read.
fn violations(dir: &Path) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("directory exists") {
        let path = entry.expect("readable dir entry").path();
        if path.is_dir() {
            let (more, n) = violations(&path);
            problems.extend(more);
            files += n;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (needle, what) in FORBIDDEN {
                if code.contains(needle) {
                    problems.push(format!("{}:{}: uses {what} (`{needle}`)", path.display(), n + 1));
                }
            }
        }
    }
    (problems, files)
}

#[test]
fn core_does_no_io_reads_no_clock_and_draws_no_unseeded_randomness() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let (problems, files) = violations(&dir);
    assert!(files >= 8, "expected the core's modules under {}", dir.display());
    assert!(problems.is_empty(), "core invariants broken:\n{}", problems.join("\n"));
}

#[test]
fn tidy_catches_violations_planted_in_a_copy_of_the_core() {
    // The real check, run on a copy of src/core with one violation planted per line kind:
    // it must report exactly the planted ones (and nothing in comments).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let copy = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(&src).expect("src/core") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            std::fs::copy(&path, copy.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let planted = "use tokio::time::sleep;\n// std::time in a comment is fine\nfn f() { let _ = std::time::Instant::now(); }\n";
    let target = copy.path().join("join.rs");
    let text = std::fs::read_to_string(&target).expect("join.rs");
    let lines_before = text.lines().count();
    std::fs::write(&target, format!("{text}{planted}")).expect("plant");
    let (problems, _) = violations(copy.path());
    let at = |n: usize, needle: &str| {
        problems.iter().any(|p| p.contains(&format!("join.rs:{n}:")) && p.contains(needle))
    };
    assert!(at(lines_before + 1, "`tokio`"), "{problems:?}");
    assert!(at(lines_before + 3, "`std::time`") && at(lines_before + 3, "`Instant`"), "{problems:?}");
    assert!(!problems.iter().any(|p| p.contains(&format!("join.rs:{}:", lines_before + 2))), "{problems:?}");
    assert_eq!(problems.len(), 3, "only the planted violations: {problems:?}");
}
