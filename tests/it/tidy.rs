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

#[test]
fn core_does_no_io_reads_no_clock_and_draws_no_unseeded_randomness() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut problems = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("src/core exists") {
        let path = entry.expect("readable dir entry").path();
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
    assert!(files >= 8, "expected the core's modules under {}", dir.display());
    assert!(problems.is_empty(), "core invariants broken:\n{}", problems.join("\n"));
}

#[test]
fn tidy_catches_a_forbidden_import() {
    // The check above must be able to fail.
    let code = "use tokio::time::sleep;";
    assert!(FORBIDDEN.iter().any(|(n, _)| code.contains(n)));
}
