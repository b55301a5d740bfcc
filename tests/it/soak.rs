//! Soak: a processor and a serving node under steady traffic on the development broker, the
//! processor SIGKILLed and restarted every few minutes. Samples every 5 s: resident memory of
//! both, records produced and committed (lag), and the serving node's model version. At the
//! end the learned totals must equal the generator's truth exactly.
//!
//! The suite runs 2 minutes (a kill every 40 s); `scripts/soak.sh` runs the long version
//! (`BANDITFLOW_SOAK_SECONDS=1800`, a kill every 4 min) and plots the samples
//! (BENCHMARKS.md, "Soak"). Knobs: `BANDITFLOW_SOAK_SECONDS`, `BANDITFLOW_SOAK_KILL_EVERY`
//! (seconds), `BANDITFLOW_SOAK_RATE` (input events per second), `BANDITFLOW_SOAK_GAP_MS` (mean
//! event time between impressions), `BANDITFLOW_SOAK_CSV` (where the samples go).

use std::io::Write as _;
use std::time::{Duration, Instant};

use banditflow::generate::{self, ShopSpec};

use crate::kafka::{bootstrap, model_ids, wait_until, Setup};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident set size of `pid` in bytes (0 when it is gone).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// The sum over the lines of `family` (every label set) on the /metrics page at `addr`
/// (-1 when not readable).
fn scrape_sum(addr: std::net::SocketAddr, family: &str) -> i64 {
    if std::net::TcpStream::connect(addr).is_err() {
        return -1;
    }
    let (status, _, body) = crate::serving::http(addr, "GET", "/metrics", None, b"");
    if status != 200 {
        return -1;
    }
    body.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as i64
}

/// The serving node's model version of `home` from its /metrics (-1 when not readable).
fn node_version(addr: std::net::SocketAddr) -> i64 {
    let (_, _, body) = crate::serving::http(addr, "GET", "/metrics", None, b"");
    body.lines()
        .find(|l| l.starts_with("banditflow_serving_model_version{") && l.contains("model=\"home\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(-1, |v| v as i64)
}

#[test]
fn steady_traffic_with_kills_keeps_memory_bounded_and_totals_exact() {
    let seconds = knob("BANDITFLOW_SOAK_SECONDS", 120);
    let kill_every = knob("BANDITFLOW_SOAK_KILL_EVERY", 40);
    let rate = knob("BANDITFLOW_SOAK_RATE", 600);
    // Mean event time between impressions: the long run stretches event time (10 s: about 60
    // days in 30 minutes) so the funnel's longest window (30 days) passes and the retained
    // set, hence memory, levels off.
    let gap_ms = knob("BANDITFLOW_SOAK_GAP_MS", 250);
    let b = bootstrap();
    let s = Setup::new("soak", &b, 4);
    let fb = s.use_two_topics("soak");
    // About 2.1 input events per impression; event times end before now (brokers refuse
    // timestamps more than an hour ahead), so the shop is generated once to learn its span.
    let impressions = (rate * seconds * 10 / 21) as usize;
    let spec = |start_ms| ShopSpec {
        seed: 77,
        impressions,
        partitions: 4,
        malformed_share: 0.001,
        impressions_topic: s.input.clone(),
        feedback_topic: fb.clone(),
        model_ids: model_ids(),
        start_ms,
        mean_gap_ms: gap_ms as f64,
        ..ShopSpec::default()
    };
    let probe = generate::generate(&spec(0));
    let span = probe.records.iter().filter_map(|r| r.timestamp_ms).max().unwrap_or(0);
    drop(probe);
    let shop = generate::generate(&spec(banditflow::kafka::now_ms() - span - 60_000));
    let total = shop.records.len();
    eprintln!(
        "soak: {seconds} s at {rate} events/s ({total} records, {:.1} days of event time), a SIGKILL every {kill_every} s",
        span as f64 / 86_400_000.0
    );

    // The producer paces the records: `rate` per second.
    let started = Instant::now();
    let producer = s.produce_paced(shop.records.clone(), rate as f64);
    let node = crate::serving::serve(&s, &[("BANDITFLOW__SERVING__COLD_START", "true")]);
    let node_pid = node.child.as_ref().map_or(0, std::process::Child::id);
    let topics = [s.input.clone(), fb.clone()];
    let sum = |v: Vec<i64>| v.into_iter().map(|o| o.max(0)).sum::<i64>();
    let csv_path = std::env::var("BANDITFLOW_SOAK_CSV").ok();
    let mut csv = String::from(
        "seconds,produced,committed,processor_rss_bytes,node_rss_bytes,node_version_home,kills,retained_impressions,held_feedback\n",
    );
    // The processor's /metrics: how many impressions it retains (the funnel's working set).
    let metrics: std::net::SocketAddr =
        format!("127.0.0.1:{}", crate::serving::free_port()).parse().expect("addr");
    let metrics_text = metrics.to_string();
    let env = [("BANDITFLOW__KAFKA__METRICS_ADDRESS", metrics_text.as_str())];
    let mut processor = s.start_with("0", "info", &env);
    let mut kills = 0u32;
    let mut next_kill = Instant::now() + Duration::from_secs(kill_every);
    let mut peak = (0u64, 0u64);
    while !producer.is_finished() {
        std::thread::sleep(Duration::from_secs(5));
        if Instant::now() >= next_kill {
            processor.kill9();
            kills += 1;
            processor = s.start_with("0", "info", &env);
            next_kill = Instant::now() + Duration::from_secs(kill_every);
        }
        let (p_rss, n_rss) =
            (rss(processor.child.as_ref().map_or(0, std::process::Child::id)), rss(node_pid));
        peak = (peak.0.max(p_rss), peak.1.max(n_rss));
        let row = format!(
            "{:.0},{},{},{p_rss},{n_rss},{},{kills},{},{}\n",
            started.elapsed().as_secs_f64(),
            sum(s.end_offsets_of(&topics)),
            sum(s.committed_offsets_of(&topics)),
            node_version(node.addr),
            scrape_sum(metrics, "banditflow_buffered_impressions"),
            scrape_sum(metrics, "banditflow_held_feedback"),
        );
        csv.push_str(&row);
        if let Some(path) = &csv_path {
            std::fs::write(path, &csv).expect("samples written");
        }
    }
    producer.join().expect("producer thread").expect("produced");
    let ends = s.end_offsets_of(&topics);
    let drained = Instant::now();
    wait_until("both topics committed to their end", Duration::from_secs(300), || {
        s.committed_offsets_of(&topics) == ends
    });
    eprintln!(
        "soak: {total} records in {:.0} s, {kills} SIGKILLs; caught up {:.1} s after the last record; \
         peak resident memory: processor {:.0} MB, node {:.0} MB",
        started.elapsed().as_secs_f64(),
        drained.elapsed().as_secs_f64(),
        peak.0 as f64 / 1e6,
        peak.1 as f64 / 1e6
    );
    let _ = std::io::stderr().flush();
    assert!(kills >= 1, "the processor was killed at least once");
    s.assert_totals_match_truth(&shop.events);
}
