//! Memory is bounded by configuration, not by the cardinality of the input: 10 million
//! impressions, each of an item never seen before (an attacker, or a catalogue-wide crawl),
//! keep the resident memory of the process under a bound set by the caps. The test runs itself
//! again in a child process (this test binary, this test only, with a marker variable) so that
//! the peak RSS measured is the probe's own, not that of the tests running beside it.

use std::process::Command;

use banditflow::core::event::{Event, Variant};
use banditflow::core::params::JoinSpec;
use banditflow::core::partition::PartitionState;

use crate::support::{apply_event, impression, spec_with_join, DAY, T0};

const PROBE_ENV: &str = "BANDITFLOW_MEMORY_PROBE";
const IMPRESSIONS: usize = 10_000_000;
const MAX_ARMS: usize = 200_000;
const MAX_IMPRESSIONS: usize = 50_000;
/// What the caps allow (arms ≈ 150 B, buffered impressions ≈ 1.1 KB each, plus the process),
/// with room to spare; 10 M uncapped arms alone would take well over 1 GB.
const BOUND_BYTES: u64 = 400 << 20;

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM line");
    kb * 1024
}

/// The probe: 10 M impressions of new items through the record path; prints what it kept.
fn probe() {
    let mut spec = spec_with_join(JoinSpec {
        watermark_delay_ms: 0,
        grace_ms: 60_000,
        late_retention_ms: DAY,
        learn_late: true,
        max_impressions: MAX_IMPRESSIONS,
        max_pending_feedback: 10_000,
        funnel: [0; 4],
    });
    spec.models.truncate(1);
    spec.limits.max_arms_per_model = MAX_ARMS;
    let mut state = PartitionState::new(&spec, 0);
    for i in 0..IMPRESSIONS {
        let item = format!("crawl-item-{i:010}");
        let imp = impression(&format!("imp-{i}"), "pbm", T0 + i as i64, Variant::Treatment, "s", &[&item]);
        apply_event(&mut state, &spec, &Event::Impression(imp), i as i64, Some(T0 + i as i64));
        // What a commit does to the changelog bookkeeping (`banditflow run` commits every
        // snapshot interval).
        if i % 100_000 == 0 {
            drop(std::mem::take(&mut state.join.changes));
        }
    }
    println!(
        "probe: arms={} rejected={} buffered={} evicted={} peak_rss_bytes={}",
        state.models[0].arm_count(),
        state.join.counters.arms_rejected,
        state.join.buffered_impressions(),
        state.join.counters.impressions_evicted,
        peak_rss_bytes()
    );
}

#[test]
fn ten_million_distinct_items_stay_within_the_memory_bound() {
    if std::env::var_os(PROBE_ENV).is_some() {
        probe();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "memory::ten_million_distinct_items_stay_within_the_memory_bound",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, "1")
        .output()
        .expect("probe runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "probe failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .chain(stderr.lines())
        .find_map(|l| l.find("probe:").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no probe line in:\n{stdout}\n{stderr}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    eprintln!("{line}");
    assert_eq!(field("arms"), MAX_ARMS as u64);
    assert_eq!(field("rejected"), (IMPRESSIONS - MAX_ARMS) as u64);
    assert_eq!(field("buffered"), MAX_IMPRESSIONS as u64);
    assert_eq!(field("evicted"), (IMPRESSIONS - MAX_IMPRESSIONS) as u64);
    let peak = field("peak_rss_bytes");
    assert!(peak < BOUND_BYTES, "peak RSS {} MiB over the bound {} MiB", peak >> 20, BOUND_BYTES >> 20);
}
