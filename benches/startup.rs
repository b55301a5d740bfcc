//! How long a serving node takes to become ready (`GET /readyz` 200) when the processor retains
//! many impressions (not a timed test; figures go to BENCHMARKS.md, "Serving start-up"). For
//! this build and, with BENCH_BASELINE_BIN, another build of `banditflow` on the same records
//! (a same-run baseline of a previous version):
//!
//! 1. a warm-up places BENCH_ITEMS items in each of 3 segments once per partition, dated 4 h
//!    ago, so every partition's shard holds the same catalogue;
//! 2. then R retained impressions (BENCH_RETAINED, a list: 0, 1 M and 10 M by default), dated
//!    30 min ago, and one more per partition: with the default funnel an unclicked impression
//!    is kept for 1 h + 1 h, so the warm-up is released and these R + partitions are retained;
//! 3. `banditflow run` learns everything and stops (SIGTERM: its final commit); its
//!    `banditflow_buffered_impressions` at the end says how many it retained;
//! 4. `banditflow run` starts again: wall time from spawn to its `/readyz` 200 (every partition
//!    restored), its CPU seconds and resident memory then;
//! 5. `banditflow serve` starts BENCH_STARTS times on the topics; each time: wall time from
//!    spawn to the first `/readyz` 200, its CPU seconds and resident memory then;
//! 6. (this build only) `banditflow aggregate` starts and writes the merged models (its ready
//!    time, CPU and resident memory), and `banditflow serve` with `serving.read_merged` starts
//!    BENCH_STARTS times on the merged-model topic, measured as in 5.
//!
//! Run: `scripts/kafka.sh start && BANDITFLOW_KAFKA_BOOTSTRAP=127.0.0.1:39092 cargo bench --bench startup`
//! Environment: BENCH_PARTITIONS (4), BENCH_ITEMS (2,000), BENCH_RETAINED (0,1000000,10000000),
//! BENCH_STARTS (3), BENCH_BASELINE_BIN.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[path = "support/broker.rs"]
mod broker;
use broker::{
    committed, config_file_with, env_or, gauge_sum, get_status, produce, spawn_ready, start_binary, stop,
    Start,
};

use banditflow::core::event::{self, Encoding, TopicRole};
use banditflow::kafka::{admin, now_ms};

const SLATE: usize = 6;
const SEGMENTS: usize = 3;
const HOUR: i64 = 3_600_000;

fn partition_of(key: &str, partitions: i32) -> i32 {
    (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % partitions as u64) as i32
}

fn record(partitions: i32, id: &str, t: i64, segment: usize, items: &[usize]) -> (i32, Vec<u8>, Vec<u8>) {
    let e = broker::impression(id, t, segment, items);
    (
        partition_of(id, partitions),
        id.as_bytes().to_vec(),
        event::encode(TopicRole::Combined, Encoding::Protobuf, &e),
    )
}

/// Produces the warm-up, `retained` impressions and one clock impression per partition;
/// returns how many records.
fn produce_shop(bootstrap: &str, topic: &str, partitions: i32, items: usize, retained: usize) -> usize {
    let now = now_ms();
    let mut n = 0;
    // Warm-up: every (segment, item) once per partition.
    let mut warm = Vec::new();
    for p in 0..partitions {
        let mut k = 0;
        for s in 0..SEGMENTS {
            for first in (0..items).step_by(SLATE) {
                let id = loop {
                    let id = format!("warm-{p}-{k}");
                    k += 1;
                    if partition_of(&id, partitions) == p {
                        break id;
                    }
                };
                let slate: Vec<usize> = (0..SLATE).map(|j| (first + j) % items).collect();
                warm.push(record(partitions, &id, now - 4 * HOUR, s, &slate));
            }
        }
    }
    produce(bootstrap, topic, &warm, None);
    n += warm.len();
    // Retained impressions, produced in blocks so the records never all sit in memory.
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |m: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % m as u64) as usize
    };
    let block = 500_000;
    let mut done = 0;
    while done < retained {
        let len = block.min(retained - done);
        let recs: Vec<_> = (done..done + len)
            .map(|i| {
                // Distinct items (a slate naming one twice is dead-lettered).
                let first = next(items);
                let slate: Vec<usize> = (0..SLATE).map(|j| (first + j * 7) % items).collect();
                record(
                    partitions,
                    &format!("kept-{i}"),
                    now - HOUR / 2 + (i as i64 % 1000),
                    next(SEGMENTS),
                    &slate,
                )
            })
            .collect();
        produce(bootstrap, topic, &recs, None);
        done += len;
        n += len;
    }
    // One per partition, the newest, so every partition's watermark passes the warm-up's end.
    let mut clock = Vec::new();
    for p in 0..partitions {
        let id = (0..)
            .map(|k| format!("clock-{p}-{k}"))
            .find(|id| partition_of(id, partitions) == p)
            .unwrap_or_default();
        clock.push(record(partitions, &id, now - HOUR / 2 + 1000, 0, &[0, 1, 2, 3, 4, 5]));
    }
    produce(bootstrap, topic, &clock, None);
    n + clock.len()
}

/// Starts `bin <command> --config config` and measures it at its first `/readyz` 200 on
/// `listen`; then kills it (a processor's state is committed already; nothing is lost).
fn start_until_ready(bin: &str, command: &str, config: &std::path::Path, listen: &str) -> Start {
    start_until_ready_with(bin, command, config, listen, &[])
}

/// [`start_until_ready`] with environment variables (config overrides).
fn start_until_ready_with(
    bin: &str,
    command: &str,
    config: &std::path::Path,
    listen: &str,
    env: &[(&str, &str)],
) -> Start {
    let (mut child, s) = spawn_ready(bin, command, config, listen, env);
    let _ = child.kill();
    let _ = child.wait();
    s
}

fn run(
    bootstrap: &str,
    bin: &str,
    label: &str,
    partitions: i32,
    items: usize,
    retained: usize,
    starts: usize,
) {
    // Only this build has the merged-model stage (a baseline binary may not).
    let merged = bin == env!("CARGO_BIN_EXE_banditflow");
    let tag = format!("startup-{}-{}-{retained}", now_ms(), label.replace(' ', "-"));
    let topic = format!("{tag}-events");
    admin::create_topics(bootstrap, &[(&topic, partitions, false)]).expect("topics");
    let dir = tempfile::tempdir().expect("tmp");
    let (metrics, listen) = ("127.0.0.1:19466", "127.0.0.1:18086");
    let cfg = config_file_with(
        dir.path(),
        bootstrap,
        &topic,
        &tag,
        metrics,
        &format!("[serving]\nlisten = \"{listen}\"\n"),
    );
    let t = Instant::now();
    let total = produce_shop(bootstrap, &topic, partitions, items, retained);
    println!("{label}, {retained} retained: {total} records produced in {:.1} s", t.elapsed().as_secs_f64());
    let (child, assigned, _) = start_binary(bin, &cfg, partitions);
    while !assigned.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = format!("{tag}-group");
    let t = Instant::now();
    while committed(bootstrap, &group, &topic, partitions) < total as i64 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = get_status(metrics, "/metrics").map(|(_, p)| p).unwrap_or_default();
    let kept = gauge_sum(&page, "banditflow_buffered_impressions");
    let written = gauge_sum(&page, "banditflow_snapshot_written_bytes_total");
    println!(
        "{label}, {retained} retained: learned in {:.1} s; the processor retains {kept} impressions, wrote {:.1} MB to the snapshot topic",
        t.elapsed().as_secs_f64(),
        written / 1e6
    );
    stop(child);
    let restore = start_until_ready(bin, "run", &cfg, metrics);
    println!(
        "RESULT {label}: {kept} retained impressions: processor restored every partition (ready) in {:.2} s, {:.2} CPU s, {:.0} MB resident",
        restore.ready_s, restore.cpu_s, restore.rss_mb
    );
    let mut runs: Vec<Start> = (0..starts).map(|_| start_until_ready(bin, "serve", &cfg, listen)).collect();
    for (i, s) in runs.iter().enumerate() {
        println!(
            "{label}, {retained} retained: node start {}: ready in {:.2} s, {:.2} CPU s, {:.0} MB resident",
            i + 1,
            s.ready_s,
            s.cpu_s,
            s.rss_mb
        );
    }
    runs.sort_by(|a, b| a.ready_s.total_cmp(&b.ready_s));
    let m = &runs[runs.len() / 2];
    println!(
        "RESULT {label}: {kept} retained impressions: node ready in {:.2} s (median of {starts}), {:.2} CPU s, {:.0} MB resident",
        m.ready_s, m.cpu_s, m.rss_mb
    );
    if !merged {
        return;
    }
    // The merged-model stage: `banditflow aggregate` merges every partition's shard once and
    // writes the merged models; nodes with `serving.read_merged` read only those.
    let (mut aggregator, a) = spawn_ready(bin, "aggregate", &cfg, metrics, &[]);
    println!(
        "RESULT {label}: aggregator ready (every model merged and written) in {:.2} s, {:.2} CPU s, {:.0} MB resident",
        a.ready_s, a.cpu_s, a.rss_mb
    );
    let merged_env = [("BANDITFLOW__SERVING__READ_MERGED", "true")];
    let mut runs: Vec<Start> =
        (0..starts).map(|_| start_until_ready_with(bin, "serve", &cfg, listen, &merged_env)).collect();
    let _ = aggregator.kill();
    let _ = aggregator.wait();
    runs.sort_by(|a, b| a.ready_s.total_cmp(&b.ready_s));
    let m = &runs[runs.len() / 2];
    println!(
        "RESULT {label}: {kept} retained impressions: node on the merged topic ready in {:.2} s (median of {starts}), {:.2} CPU s, {:.0} MB resident",
        m.ready_s, m.cpu_s, m.rss_mb
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let bootstrap = std::env::var("BANDITFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:39092".into());
    let partitions: i32 = env_or("BENCH_PARTITIONS", 4);
    let items: usize = env_or("BENCH_ITEMS", 2_000);
    let starts: usize = env_or("BENCH_STARTS", 3);
    let retained: Vec<usize> = std::env::var("BENCH_RETAINED")
        .unwrap_or_else(|_| "0,1000000,10000000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let baseline = std::env::var("BENCH_BASELINE_BIN").ok().filter(|b| !b.is_empty());
    for r in &retained {
        run(&bootstrap, env!("CARGO_BIN_EXE_banditflow"), "this build", partitions, items, *r, starts);
        if let Some(bin) = &baseline {
            run(&bootstrap, bin, "baseline", partitions, items, *r, starts);
        }
    }
}
