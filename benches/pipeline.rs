//! End-to-end benchmark on a real broker (not a timed test; figures go to BENCHMARKS.md):
//!
//! 1. throughput: N events (default 1,000,000) on a combined topic (with BENCH_TOPICS=2 on an
//!    impressions topic in protobuf and a feedback topic in JSON, the default configuration's
//!    layout, which the processor aligns by event time); raw rdkafka consumption of the topics (a bare consumer counting records)
//!    against the whole pipeline (the release
//!    `banditflow run` binary: consume → decode → attribute → update → snapshot → commit),
//!    both timed from assignment to the last record (pipeline: to the last committed offset);
//! 2. freshness: events produced at a steady rate (default 100,000/s for 20 s) with their
//!    timestamp set when produced; a reader follows the snapshot topic (read_committed) and,
//!    for every committed checkpoint, takes `visible - timestamp` of every input record it
//!    newly covers. Reports p50 / p99 / max.
//!
//! 3. restore: a partition state with BENCH_RESTORE_IMPRESSIONS (default 1,000,000) retained
//!    impressions, saved as `banditflow run` saves it (a changelog segment per save), is written
//!    to a snapshot topic; then reading that partition back and rebuilding its state is timed
//!    (wall and CPU).
//!
//! Each throughput run also reports CPU seconds per million events (utime + stime from /proc:
//! of this process for the raw consumer, of the `banditflow run` child for the pipeline) and
//! the bytes the run wrote to the snapshot topic per input event, by kind of key (buffer
//! changelog, held feedback, models, checkpoint headers). With BENCH_BASELINE_BIN set to
//! another build of `banditflow`, each throughput run and each freshness rate also runs that
//! binary on the same records: a same-run baseline of a previous version.
//!
//! Run: `scripts/kafka.sh start && BANDITFLOW_KAFKA_BOOTSTRAP=127.0.0.1:39092 cargo bench --bench pipeline`
//! Environment: BENCH_EVENTS, BENCH_RATE (or BENCH_RATES, a list; empty skips freshness),
//! BENCH_SECONDS, BENCH_PARTITIONS, BENCH_TOPICS (1 or 2 input topics for the throughput runs),
//! BENCH_REPEAT (throughput runs, default 3; medians reported),
//! BENCH_BASELINE_BIN, BENCH_RESTORE_IMPRESSIONS (0 skips the restore measurement),
//! BENCH_SNAPSHOT_INTERVAL (the processor's `kafka.snapshot_interval`; unset: the binary's default),
//! BENCH_MERGED (1: the freshness runs of this build also run `banditflow aggregate` and report
//! freshness through the merged-model topic too; 2: the aggregation divided by partition group,
//! `aggregate --group K` per 16 partitions and `aggregate --from-groups`: input record → a merged head of every model
//! covering it); BENCH_AGGREGATOR_LOG (a log filter, e.g. `banditflow=debug`): each aggregator's
//! log to a file in the temporary directory; BENCH_IDLE_S (the stage idles that long before the
//! freshness traffic); BENCH_VERBOSE (the processor's log lines, and the latency of a sample of
//! the first 2 s of freshness records).
//! The processor runs with the default configuration otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[path = "support/broker.rs"]
mod broker;
use broker::{
    committed, config_file, config_file_inputs, cpu_seconds, env_or, get_status, produce_records,
    start_binary, stop,
};

use banditflow::core::blob::LatestByKey;
use banditflow::core::pb;
use banditflow::generate::{self, ShopSpec};
use banditflow::kafka::{admin, bootstrap_config, now_ms};

/// Events of the synthetic shop for `topic`, as (partition, key, payload).
fn events(topic: &str, partitions: i32, impressions: usize, seed: u64) -> Vec<(i32, Vec<u8>, Vec<u8>)> {
    generate::generate(&ShopSpec {
        seed,
        impressions,
        partitions,
        malformed_share: 0.0,
        combined_topic: Some(topic.into()),
        ..ShopSpec::default()
    })
    .records
    .into_iter()
    .map(|r| (r.partition, r.key.unwrap_or_default(), r.payload))
    .collect()
}

/// Events of the synthetic shop on an impressions (protobuf) and a feedback topic (JSON), as
/// (topic, partition, key, payload).
fn split_events(
    impressions_topic: &str,
    feedback_topic: &str,
    partitions: i32,
    impressions: usize,
    seed: u64,
) -> Vec<(String, i32, Vec<u8>, Vec<u8>)> {
    generate::generate(&ShopSpec {
        seed,
        impressions,
        partitions,
        malformed_share: 0.0,
        impressions_topic: impressions_topic.into(),
        feedback_topic: feedback_topic.into(),
        ..ShopSpec::default()
    })
    .records
    .into_iter()
    .map(|r| (r.topic, r.partition, r.key.unwrap_or_default(), r.payload))
    .collect()
}

/// Bytes (key + value) on a state topic by kind of key: buffer changelog (`buf/`, `imp/`),
/// held feedback, models, checkpoint headers.
fn snapshot_bytes(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<&'static str, usize> {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", "bench-bytes")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = BTreeMap::new();
    let mut open = partitions;
    let deadline = Instant::now() + Duration::from_secs(120);
    while open > 0 && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                let class = match key.split('/').next().unwrap_or("") {
                    "buf" | "imp" => "changelog",
                    "held" => "held",
                    "model" => "models",
                    "checkpoint" => "checkpoint",
                    _ => "other",
                };
                *out.entry(class).or_default() += key.len() + m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => open -= 1,
            _ => {}
        }
    }
    out
}

fn raw_consume(bootstrap: &str, topics: &[String], partitions: i32, total: usize, run: usize) -> (f64, f64) {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", format!("bench-raw-{run}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut n = 0usize;
    let mut bytes = 0usize;
    let mut first = None;
    let cpu0 = cpu_seconds("self");
    while n < total {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let cpu = cpu_seconds("self") - cpu0;
    std::hint::black_box(bytes);
    (n as f64 / secs, cpu / n as f64 * 1e6)
}

/// Starts `banditflow run`; returns the child and a flag set once every partition is assigned.
fn start_pipeline(
    config: &std::path::Path,
    partitions: i32,
) -> (std::process::Child, Arc<AtomicBool>, Arc<std::sync::Mutex<Option<Instant>>>) {
    start_binary(env!("CARGO_BIN_EXE_banditflow"), config, partitions)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` / `cargo bench -- --list`: nothing to list or check here.
        return;
    }
    let bootstrap = std::env::var("BANDITFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:39092".into());
    let partitions: i32 = env_or("BENCH_PARTITIONS", 4);
    let total: usize = env_or("BENCH_EVENTS", 1_000_000);
    let rate: f64 = env_or("BENCH_RATE", 100_000.0);
    let seconds: f64 = env_or("BENCH_SECONDS", 20.0);
    let tag = format!("bench-{}", now_ms());
    let dir = tempfile::tempdir().expect("tmp");

    // 1. Throughput.
    let inputs: Vec<(String, &str, &str)> = if env_or("BENCH_TOPICS", 1) == 2 {
        vec![
            (format!("{tag}-impressions"), "impressions", "protobuf"),
            (format!("{tag}-feedback"), "feedback", "json"),
        ]
    } else {
        vec![(format!("{tag}-events"), "combined", "protobuf")]
    };
    let topics: Vec<String> = inputs.iter().map(|(t, _, _)| t.clone()).collect();
    for t in &topics {
        admin::create_topics(&bootstrap, &[(t, partitions, false)]).expect("topic");
    }
    let mut evs = match &topics[..] {
        [imps, fbs] => split_events(imps, fbs, partitions, total / 2 + 1000, 1),
        _ => events(&topics[0], partitions, total / 2 + 1000, 1)
            .into_iter()
            .map(|(p, k, v)| (topics[0].clone(), p, k, v))
            .collect(),
    };
    evs.truncate(total);
    let t = Instant::now();
    // In the generator's (logging) order, so the record timestamps the aligner orders two
    // topics by interleave as a shop's would.
    produce_records(
        &bootstrap,
        evs.iter().map(|(t, p, k, v)| (t.as_str(), *p, k.as_slice(), v.as_slice())),
        None,
    );
    println!(
        "produced {} events to {} in {:.1} s",
        evs.len(),
        topics.join(" and "),
        t.elapsed().as_secs_f64()
    );
    // Raw and pipeline runs alternate, so both see the same machine load; the medians are the
    // figures (a shared two-core machine varies by tens of percent between runs).
    let repeat: usize = env_or("BENCH_REPEAT", 3).max(1);
    let baseline_bin = std::env::var("BENCH_BASELINE_BIN").ok().filter(|b| !b.is_empty());
    let (mut raws, mut pipes, mut bases) = (Vec::new(), Vec::new(), Vec::new());
    let n = evs.len();
    for r in 0..repeat {
        let (raw, raw_cpu) = raw_consume(&bootstrap, &topics, partitions, n, r);
        println!(
            "run {}: raw rdkafka consumption: {raw:.0} events/s, {raw_cpu:.2} CPU s per million events",
            r + 1
        );
        let pipeline =
            pipeline_run(&bootstrap, &inputs, partitions, n, dir.path(), &format!("{tag}-tp{r}"), None);
        println!(
            "run {}: pipeline (consume → decode → attribute → update → snapshot → commit): {:.0} events/s (ratio {:.2}), {:.2} CPU s per million events (ratio {:.2})",
            r + 1,
            pipeline.0,
            pipeline.0 / raw,
            pipeline.1,
            pipeline.1 / raw_cpu
        );
        if let Some(bin) = &baseline_bin {
            let base = pipeline_run(
                &bootstrap,
                &inputs,
                partitions,
                n,
                dir.path(),
                &format!("{tag}-bl{r}"),
                Some(bin),
            );
            println!(
                "run {}: baseline {bin}: {:.0} events/s (ratio {:.2}), {:.2} CPU s per million events",
                r + 1,
                base.0,
                base.0 / raw,
                base.1
            );
            bases.push(base.0);
        }
        raws.push(raw);
        pipes.push(pipeline.0);
    }
    raws.sort_by(f64::total_cmp);
    pipes.sort_by(f64::total_cmp);
    let (raw, pipeline) = (percentile(&raws, 0.5), percentile(&pipes, 0.5));
    println!(
        "median of {repeat}: raw {raw:.0} events/s (range {:.0}–{:.0}), pipeline {pipeline:.0} events/s (range {:.0}–{:.0})",
        raws[0],
        raws[raws.len() - 1],
        pipes[0],
        pipes[pipes.len() - 1]
    );
    println!("ratio of medians pipeline / raw: {:.2}", pipeline / raw);
    if !bases.is_empty() {
        bases.sort_by(f64::total_cmp);
        println!("baseline median: {:.0} events/s", percentile(&bases, 0.5));
    }

    // 3. Restore of a large buffer from the snapshot topic.
    let restore_n: usize = env_or("BENCH_RESTORE_IMPRESSIONS", 1_000_000);
    if restore_n > 0 {
        restore(&bootstrap, &tag, restore_n);
    }

    // 2. Freshness at steady rates.
    let rates: Vec<f64> = std::env::var("BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![rate, rate / 2.0]);
    let baseline = std::env::var("BENCH_BASELINE_BIN").ok().filter(|b| !b.is_empty());
    for (i, rate) in rates.into_iter().enumerate() {
        freshness(&bootstrap, &tag, i, partitions, rate, seconds, dir.path(), None);
        if let Some(bin) = &baseline {
            freshness(
                &bootstrap,
                &format!("{tag}-base"),
                i,
                partitions,
                rate,
                seconds,
                dir.path(),
                Some(bin),
            );
        }
    }
}

/// One pipeline run over the topic: (events/s from assignment to the last committed offset,
/// CPU seconds per million events), and what it wrote to its snapshot topic per event.
fn pipeline_run(
    bootstrap: &str,
    inputs: &[(String, &str, &str)],
    partitions: i32,
    n: usize,
    dir: &std::path::Path,
    tag: &str,
    bin: Option<&str>,
) -> (f64, f64) {
    let cfg = match inputs {
        [(topic, "combined", "protobuf")] => config_file(dir, bootstrap, topic, tag),
        _ => config_file_inputs(dir, bootstrap, inputs, tag),
    };
    // The changelog topic under its default name, so that it exists for a build before it too.
    let changelog = format!("{tag}-snapshots-changelog");
    admin::create_topics(bootstrap, &[(&changelog, partitions, true)]).expect("changelog topic");
    let (child, assigned, at) = match bin {
        Some(b) => start_binary(b, &cfg, partitions),
        None => start_pipeline(&cfg, partitions),
    };
    let pid = child.id().to_string();
    while !assigned.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = at.lock().expect("lock").unwrap_or_else(Instant::now);
    let cpu0 = cpu_seconds(&pid);
    let group = format!("{tag}-group");
    while inputs.iter().map(|(t, _, _)| committed(bootstrap, &group, t, partitions)).sum::<i64>() < n as i64 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(&pid) - cpu0) / n as f64 * 1e6;
    stop(child);
    // Both state topics (a build before the changelog topic writes everything to the first and
    // leaves the second empty).
    let mut bytes = snapshot_bytes(bootstrap, &format!("{tag}-snapshots"), partitions);
    for (class, b) in snapshot_bytes(bootstrap, &format!("{tag}-snapshots-changelog"), partitions) {
        *bytes.entry(class).or_default() += b;
    }
    let per = |k: &str| bytes.get(k).copied().unwrap_or(0) as f64 / n as f64;
    println!(
        "  snapshot topic per input event: changelog {:.1} B, held {:.1} B, models {:.1} B, checkpoints {:.1} B",
        per("changelog"),
        per("held"),
        per("models"),
        per("checkpoint")
    );
    (rate, cpu)
}

/// Writes a partition with `n` retained impressions (6-item slates) to a snapshot topic as the
/// processor does (a save, i.e. a segment, per 20,000 impressions), then times reading it back
/// and restoring the partition.
fn restore(bootstrap: &str, tag: &str, n: usize) {
    use banditflow::core::checkpoint;
    use banditflow::core::event::{Event, SlateEntry, TopicRole, Variant};
    use banditflow::core::partition::{InputRecord, PartitionState};
    let config = banditflow::config::Config::from_layers(None, Vec::new()).expect("defaults");
    let spec = &config.core;
    let topic = format!("{tag}-restore-snapshots");
    let changelog = format!("{topic}-changelog");
    admin::create_topics(bootstrap, &[(&topic, 1, true), (&changelog, 1, true)]).expect("topics");
    let mut c = bootstrap_config(bootstrap);
    c.set("linger.ms", "20").set("message.max.bytes", "2000000");
    let p: BaseProducer = c.create().expect("producer");
    let send = |key: &str, value: &[u8]| {
        for r in banditflow::core::blob::split(key, 1, value, 900_000, 0) {
            let Some(v) = r.value else { continue };
            let to = if banditflow::core::checkpoint::is_changelog_key(key) { &changelog } else { &topic };
            let mut rec = BaseRecord::to(to).partition(0).key(r.key.as_str()).payload(v.as_slice());
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        p.poll(Duration::from_millis(1));
                    }
                }
            }
        }
    };
    let mut state = PartitionState::new(spec, 0);
    let t0 = 1_767_225_600_000i64;
    let mut bytes = 0usize;
    let mut last = None;
    for i in 0..n {
        let imp = banditflow::core::event::Impression {
            impression_id: format!("{:016x}-{i}", 0x5eed_u64),
            time_ms: t0 + i as i64,
            model_id: "home".into(),
            model_version: 1,
            variant: Variant::Treatment,
            segment: ["women", "men", "kids"][i % 3].into(),
            features: Vec::new(),
            slate: (0..6)
                .map(|k| SlateEntry {
                    item_id: format!("sku-{:06}", (i * 7 + k * 13) % 20_000),
                    position: k as u32 + 1,
                    propensity: 0.2,
                    score: 0.0,
                })
                .collect(),
            opted_out: false,
        };
        let payload = banditflow::core::event::encode(
            TopicRole::Impressions,
            banditflow::core::event::Encoding::Protobuf,
            &Event::Impression(imp),
        );
        state.apply(
            spec,
            InputRecord {
                topic: "impressions",
                partition: 0,
                offset: i as i64,
                role: TopicRole::Impressions,
                encoding: banditflow::core::event::Encoding::Protobuf,
                payload: &payload,
                timestamp_ms: Some(t0 + i as i64),
            },
        );
        if (i + 1) % 20_000 == 0 || i + 1 == n {
            let saved = checkpoint::save_changes(spec, &mut state);
            for (k, v) in &saved.puts {
                bytes += v.len();
                send(k, v);
            }
            last = Some(saved);
        }
    }
    let saved = last.expect("saved");
    send(&checkpoint::header_key(0), &saved.header);
    for (m, b) in &saved.models {
        send(&checkpoint::model_key(m, 0), b);
    }
    p.flush(Duration::from_secs(120)).expect("flushed");
    let retained = state.join.buffered_impressions();
    drop(state);
    let cpu0 = cpu_seconds("self");
    let t = Instant::now();
    let read = |topic: &str| {
        banditflow::kafka::store::read_partitions(
            bootstrap_config(bootstrap),
            topic,
            &[0],
            Duration::from_secs(300),
        )
        .expect("read")
        .remove(&0)
        .expect("partition 0")
    };
    let (snapshots, changes) = (read(&topic), read(&changelog));
    let read = t.elapsed().as_secs_f64();
    let restored =
        banditflow::kafka::store::restore_partition(&config, 0, &snapshots, &changes).expect("restores");
    let total = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds("self") - cpu0;
    assert_eq!(restored.join.buffered_impressions(), retained);
    println!(
        "restore: {retained} retained impressions from {:.1} MB of changelog segments ({:.1} B each): read {:.2} s + rebuild {:.2} s = {:.2} s wall, {:.2} CPU s ({:.2} s per million)",
        bytes as f64 / 1e6,
        bytes as f64 / retained as f64,
        read,
        total - read,
        total,
        cpu,
        total / retained as f64 * 1e6
    );
}

/// For each (partition, next offset, visible ms) whose records the input reader has seen: the
/// latency of every record it newly covers goes to `fresh`; the others stay pending.
fn newly_visible(
    pending: &mut Vec<(i32, usize, i64)>,
    ts: &BTreeMap<i32, Vec<i64>>,
    covered: &mut BTreeMap<i32, usize>,
    fresh: &mut Vec<(i64, f64)>,
) {
    pending.retain(|&(p, next, visible)| {
        let seen = ts.get(&p).map_or(0, Vec::len);
        if seen < next {
            return true;
        }
        let from = covered.get(&p).copied().unwrap_or(0);
        for t in &ts[&p][from.min(next)..next] {
            fresh.push((*t, (visible - t) as f64 / 1e3));
        }
        covered.insert(p, next.max(from));
        false
    });
}

/// Freshness of this build (`bin` None) or of another build of `banditflow`.
#[allow(clippy::too_many_arguments)]
fn freshness(
    bootstrap: &str,
    tag: &str,
    run: usize,
    partitions: i32,
    rate: f64,
    seconds: f64,
    dir: &std::path::Path,
    bin: Option<&str>,
) {
    let bootstrap = bootstrap.to_string();
    let tag = format!("{tag}-{run}");
    let ftopic = format!("{tag}-fresh");
    admin::create_topics(&bootstrap, &[(&ftopic, partitions, false)]).expect("topic");
    let n = (rate * seconds) as usize;
    let fevs: Vec<_> = events(&ftopic, partitions, n / 2 + 1000, 2).into_iter().take(n).collect();
    let fcfg = config_file(dir, &bootstrap, &ftopic, &format!("{tag}-fr"));
    // Made now, it has its producer id and the topic's metadata by the time traffic starts.
    let producer = broker::producer(&bootstrap);
    producer.client().fetch_metadata(Some(&ftopic), Duration::from_secs(10)).expect("input topic metadata");
    let (child, assigned, _) = match bin {
        Some(b) => start_binary(b, &fcfg, partitions),
        None => start_pipeline(&fcfg, partitions),
    };
    while !assigned.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Reader of the input (offset → timestamp) and of the snapshot topic (commits).
    let snapshots = format!("{tag}-fr-snapshots");
    // With BENCH_MERGED=1 (this build): the merged-model stage too; with 2, divided by
    // partition group (an aggregator per 16 partitions and one merging their merges).
    let stage: u32 = env_or("BENCH_MERGED", 0);
    let merged = (bin.is_none() && stage >= 1).then(|| format!("{snapshots}-merged"));
    let commands: Vec<Vec<String>> = match stage {
        2 => (0..(partitions + 15) / 16)
            .map(|g| vec!["aggregate".to_string(), "--group".to_string(), g.to_string()])
            .chain([vec!["aggregate".to_string(), "--from-groups".to_string()]])
            .collect(),
        _ => vec![vec!["aggregate".to_string()]],
    };
    let aggregators: Vec<std::process::Child> = match &merged {
        None => Vec::new(),
        Some(m) => {
            admin::create_topics(&bootstrap, &[(m.as_str(), 1, true)]).expect("merged topic");
            commands
                .iter()
                .enumerate()
                .map(|(i, args)| {
                    // BENCH_AGGREGATOR_LOG (a log filter): each aggregator's log to a file.
                    let (filter, log) = match std::env::var("BENCH_AGGREGATOR_LOG") {
                        Ok(f) => {
                            let path = std::env::temp_dir().join(format!("{tag}-aggregator-{i}.log"));
                            println!("aggregator {args:?} logs to {}", path.display());
                            (f, std::process::Stdio::from(std::fs::File::create(path).expect("log file")))
                        }
                        Err(_) => ("warn".to_string(), std::process::Stdio::inherit()),
                    };
                    // Each is ready (its `/readyz` 200) before the next starts and before
                    // records are produced: the figures are of a running stage, not its start.
                    let listen = format!("127.0.0.1:{}", 19490 + i);
                    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_banditflow"))
                        .args(args)
                        .arg("--config")
                        .arg(&fcfg)
                        .env("BANDITFLOW__KAFKA__METRICS_ADDRESS", &listen)
                        .env("BANDITFLOW_LOG", filter)
                        .stdout(std::process::Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("aggregator starts");
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while get_status(&listen, "/readyz").is_none_or(|(c, _)| c != 200) {
                        assert!(Instant::now() < deadline, "{args:?} did not become ready within 2 min");
                        assert!(child.try_wait().ok().flatten().is_none(), "{args:?} exited");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    child
                })
                .collect()
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (bootstrap, ftopic, done) = (bootstrap.clone(), ftopic.clone(), Arc::clone(&done));
        let merged = merged.clone();
        std::thread::spawn(move || {
            let mut c = bootstrap_config(&bootstrap);
            c.set("group.id", "bench-fresh")
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed");
            let consumer: BaseConsumer = c.create().expect("consumer");
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(&ftopic, p, Offset::Beginning).expect("tpl");
                tpl.add_partition_offset(&snapshots, p, Offset::Beginning).expect("tpl");
            }
            if let Some(m) = &merged {
                tpl.add_partition_offset(m, 0, Offset::Beginning).expect("tpl");
            }
            consumer.assign(&tpl).expect("assign");
            // Through the merged-model topic: per model and input partition, the next offset
            // its newest merged head covers.
            let mut mstore = LatestByKey::default();
            let mut mcover: BTreeMap<String, BTreeMap<i32, i64>> = BTreeMap::new();
            let mut mpending: Vec<(i32, usize, i64)> = Vec::new();
            let mut mcovered: BTreeMap<i32, usize> = BTreeMap::new();
            let mut mfresh: Vec<(i64, f64)> = Vec::new();
            let mut ts: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
            let mut covered: BTreeMap<i32, usize> = BTreeMap::new();
            let mut stores: BTreeMap<i32, LatestByKey> = BTreeMap::new();
            let mut pending: Vec<(i32, usize, i64)> = Vec::new();
            let mut fresh: Vec<(i64, f64)> = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else { continue };
                let now = now_ms();
                if m.topic() == ftopic {
                    ts.entry(m.partition()).or_default().push(m.timestamp().to_millis().unwrap_or(now));
                } else if Some(m.topic()) == merged.as_deref() {
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    mstore.put(key.clone(), m.payload().map(<[u8]>::to_vec));
                    if key.ends_with("/-1") && banditflow::core::checkpoint::parse_model_key(&key).is_some() {
                        if let Ok(Some((_, bytes))) = mstore.get(&key) {
                            if let Ok(head) = banditflow::core::snapshot::decode(&bytes) {
                                let cover = mcover.entry(head.meta.model_id.clone()).or_default();
                                for (t, p, next) in &head.meta.input_offsets {
                                    if *t == ftopic {
                                        cover.insert(*p, *next);
                                    }
                                }
                                // Visible once every model's merged head covers it.
                                for p in 0..partitions {
                                    let next = mcover.values().map(|c| c.get(&p).copied().unwrap_or(0)).min();
                                    mpending.push((p, next.unwrap_or(0) as usize, now));
                                }
                            }
                        }
                    }
                } else {
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    let p = m.partition();
                    let store = stores.entry(p).or_default();
                    store.put(key.clone(), m.payload().map(<[u8]>::to_vec));
                    if key == format!("checkpoint/{p}") {
                        if let Ok(Some((_, bytes))) = store.get(&key) {
                            if let Ok(cp) = pb::PartitionCheckpoint::decode(bytes.as_slice()) {
                                let next = cp
                                    .input_offsets
                                    .iter()
                                    .find(|o| o.topic == ftopic)
                                    .map_or(0, |o| o.next_offset);
                                pending.push((p, next as usize, now));
                            }
                        }
                    }
                }
                // A commit can become visible before the input reader saw those records.
                newly_visible(&mut pending, &ts, &mut covered, &mut fresh);
                newly_visible(&mut mpending, &ts, &mut mcovered, &mut mfresh);
            }
            (fresh, mfresh)
        })
    };
    // BENCH_IDLE_S: the stage idles that long before traffic starts (traffic after a quiet spell).
    std::thread::sleep(Duration::from_secs_f64(env_or("BENCH_IDLE_S", 0.0)));
    let t = Instant::now();
    broker::produce_with(
        &producer,
        fevs.iter().map(|(p, k, v)| (ftopic.as_str(), *p, k.as_slice(), v.as_slice())),
        Some(rate),
    );
    let achieved = fevs.len() as f64 / t.elapsed().as_secs_f64();
    let fgroup = format!("{tag}-fr-group");
    while committed(&bootstrap, &fgroup, &ftopic, partitions) < fevs.len() as i64 {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::SeqCst);
    let (fresh, mfresh) = reader.join().expect("reader");
    stop(child);
    if !aggregators.is_empty() {
        for mut a in aggregators {
            let _ = a.kill();
            let _ = a.wait();
        }
        let (windows, mfresh) = by_window(mfresh);
        println!(
            "freshness through the merged-model topic ({}) at the same rate over {} events: p50 {:.3} s, p99 {:.3} s, max {:.3} s; p99 per 2 s of records: {windows}",
            if stage == 2 { "divided by partition group: two aggregator hops" } else { "one aggregator" },
            mfresh.len(),
            percentile(&mfresh, 0.5),
            percentile(&mfresh, 0.99),
            mfresh.last().copied().unwrap_or(f64::NAN)
        );
    }
    let (windows, fresh) = by_window(fresh);
    println!(
        "freshness{} at {:.0} events/s over {} events: p50 {:.3} s, p99 {:.3} s, max {:.3} s; p99 per 2 s of records: {windows}",
        bin.map_or(String::new(), |b| format!(" of {b}")),
        achieved,
        fresh.len(),
        percentile(&fresh, 0.5),
        percentile(&fresh, 0.99),
        fresh.last().copied().unwrap_or(f64::NAN)
    );
}

/// The latencies sorted, and the p99 of each 2 s of record timestamps (from the first record)
/// as text: where in the run the tail lies.
fn by_window(fresh: Vec<(i64, f64)>) -> (String, Vec<f64>) {
    let first = fresh.iter().map(|(t, _)| *t).min().unwrap_or(0);
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        let mut early: Vec<&(i64, f64)> = fresh.iter().filter(|(t, _)| t - first < 2000).collect();
        early.sort_by_key(|(t, _)| *t);
        for (t, l) in early.iter().step_by((early.len() / 40).max(1)) {
            println!("  record at {} ms ({t}): visible after {l:.3} s", t - first);
        }
    }
    let mut windows: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for (t, l) in &fresh {
        windows.entry((t - first) / 2000).or_default().push(*l);
    }
    let text = windows
        .values_mut()
        .map(|w| {
            w.sort_by(f64::total_cmp);
            format!("{:.2}", percentile(w, 0.99))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut all: Vec<f64> = fresh.into_iter().map(|(_, l)| l).collect();
    all.sort_by(f64::total_cmp);
    (text, all)
}
