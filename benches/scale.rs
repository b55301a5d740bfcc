//! A large shop's model on a real broker (not a timed test; figures go to BENCHMARKS.md,
//! "Scale"): the bytes the processor writes to its snapshot topic per second when every
//! partition's shard holds a large catalogue and traffic is steady, for this build and, with
//! BENCH_BASELINE_BIN, another build of `banditflow` on the same records (a same-run baseline
//! of a previous version). Each runs with the default configuration (its own default
//! `kafka.snapshot_interval`).
//!
//! 1. warm-up: every partition gets impressions that place every (segment, item) arm once
//!    (BENCH_SEGMENTS × BENCH_ITEMS arms per model and partition), so each shard holds the
//!    whole catalogue;
//! 2. steady traffic: BENCH_RATE impressions/s (6-item slates of uniformly drawn items and
//!    segments, a click on 3 % of them) for BENCH_SECONDS, spread over BENCH_PARTITIONS;
//! 3. the bytes (key + value, committed records) written to the snapshot topic and to the
//!    changelog topic between the end of the warm-up and the end of the steady phase, per
//!    second, by kind of key; and the CPU seconds the processor spent per steady-phase event.
//!
//! 4. with BENCH_NODES=1 (this build only): two serving nodes follow the steady phase, one
//!    merging every partition's shard from the snapshot topic, one reading the merged-model
//!    topic `banditflow aggregate` writes (the aggregator runs too): each one's model updates,
//!    CPU seconds per update and resident memory at the end, and the aggregator's;
//! 5. with BENCH_NODES=2, also the aggregation divided by partition group in the same run (with
//!    its own merged-model topic and transactional ids): an aggregator per 16 partitions
//!    (`aggregate --group K`), the one merging their merges (`--from-groups`) and a node reading
//!    its merged-model topic, each one's updates, CPU per update and resident memory.
//!
//! Run: `scripts/kafka.sh start && BANDITFLOW_KAFKA_BOOTSTRAP=127.0.0.1:39092 cargo bench --bench scale`
//! Environment: BENCH_PARTITIONS (12), BENCH_SEGMENTS (3), BENCH_ITEMS (20,000), BENCH_RATE
//! (1,000), BENCH_SECONDS (60), BENCH_BASELINE_BIN, BENCH_NODES (0, 1 or 2).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[path = "support/broker.rs"]
mod broker;
use broker::{
    committed, config_file, cpu_seconds, env_or, gauge_sum, get_status, produce, rss_mb, spawn_ready,
    start_binary, stop,
};

use banditflow::core::blob::LatestByKey;
use banditflow::core::event::{self, Encoding, Event, Feedback, FeedbackKind, TopicRole};
use banditflow::kafka::{admin, bootstrap_config, now_ms};

const SLATE: usize = 6;

struct Shop {
    partitions: i32,
    segments: usize,
    items: usize,
}

impl Shop {
    fn impression(&self, id: &str, t: i64, segment: usize, items: &[usize]) -> Event {
        broker::impression(id, t, segment, items)
    }

    /// The input partition of a record keyed `key` (its impression id).
    fn partition_of(&self, key: &str) -> i32 {
        (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % self.partitions as u64) as i32
    }

    fn record(&self, key: &str, e: &Event) -> (i32, Vec<u8>, Vec<u8>) {
        (
            self.partition_of(key),
            key.as_bytes().to_vec(),
            event::encode(TopicRole::Combined, Encoding::Protobuf, e),
        )
    }

    /// Impressions that place every arm once on every partition (ids chosen per partition).
    fn warm_up(&self, t: i64) -> Vec<(i32, Vec<u8>, Vec<u8>)> {
        let per_segment = self.items.div_ceil(SLATE);
        let mut out = Vec::new();
        for p in 0..self.partitions {
            let mut n = 0;
            for s in 0..self.segments {
                for k in 0..per_segment {
                    let items: Vec<usize> = (0..SLATE).map(|j| (k * SLATE + j) % self.items).collect();
                    // An id that lands on partition p.
                    let id = loop {
                        let id = format!("warm-{p}-{n}");
                        n += 1;
                        if self.partition_of(&id) == p {
                            break id;
                        }
                    };
                    out.push(self.record(&id, &self.impression(&id, t, s, &items)));
                }
            }
        }
        out
    }
}

/// Steady traffic: `rate` impressions/s for `seconds`, a click on 3 % of them; produced by one
/// producer, each record when due (event time = when it is due).
fn steady(bootstrap: &str, topic: &str, shop: &Shop, rate: f64, seconds: f64, seed: u64) -> usize {
    let mut rng = seed | 1;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let n = (rate * seconds) as usize;
    let t0 = now_ms() + 500;
    let mut records = Vec::with_capacity(n + n / 20);
    for i in 0..n {
        let t = t0 + (i as f64 * 1000.0 / rate) as i64;
        let id = format!("imp-{seed}-{i}");
        let items: Vec<usize> = (0..SLATE).map(|_| next(shop.items)).collect();
        records.push(shop.record(&id, &shop.impression(&id, t, next(shop.segments), &items)));
        if next(100) < 3 {
            let pos = next(SLATE);
            let f = Feedback {
                impression_id: id.clone(),
                item_id: format!("item-{:05}", items[pos]),
                position: pos as u32 + 1,
                kind: FeedbackKind::Click,
                value: 0.0,
                time_ms: t,
            };
            records.push(shop.record(&id, &Event::Feedback(f)));
        }
    }
    while now_ms() < t0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    produce(bootstrap, topic, &records, Some(records.len() as f64 / seconds));
    records.len()
}

fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", "bench-scale-offsets").set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().expect("consumer");
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map_or(0, |w| w.1))
        .collect()
}

/// Bytes (key + value) and records of the committed records of `topic` from `from` to `to` (per
/// partition), by kind of key.
fn bytes_between(
    bootstrap: &str,
    topic: &str,
    from: &[i64],
    to: &[i64],
) -> BTreeMap<&'static str, (usize, usize)> {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", "bench-scale-bytes")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in from.iter().enumerate() {
        tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o)).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut open: std::collections::BTreeSet<i32> =
        (0..from.len() as i32).filter(|p| from[*p as usize] < to[*p as usize]).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !open.is_empty() && Instant::now() < deadline {
        // A transaction's commit marker may be the last offset before `to`: the end of the
        // partition, or any record at or past `to`, closes it.
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                continue;
            }
            _ => continue,
        };
        {
            let p = m.partition();
            if m.offset() >= to[p as usize] {
                open.remove(&p);
                continue;
            }
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            let class = match key.split('/').next().unwrap_or("") {
                "buf" | "imp" => "changelog",
                "held" => "held",
                // Heads `model/<m>/<p>`, arm segments `model/<m>/<p>/<seq>`, whole shards of
                // older builds under the heads' keys.
                "model" if key.split('#').next().unwrap_or("").matches('/').count() == 3 => "arms",
                "model" => "models",
                "checkpoint" => "checkpoint",
                _ => "other",
            };
            if class == "arms" && !key.contains('#') {
                // Arms in the segment (a whole value: chunks are not counted).
                let mut one = LatestByKey::default();
                one.put(key.clone(), m.payload().map(<[u8]>::to_vec));
                if let Ok(Some((_, v))) = one.get(&key) {
                    let n = banditflow::core::armlog::decode_segment(&v).map_or(0, |seg| seg.arms.len());
                    out.entry("arm count").or_default().1 += n;
                }
            }
            let e: &mut (usize, usize) = out.entry(class).or_default();
            e.0 += key.len() + m.payload().map_or(0, <[u8]>::len);
            e.1 += 1;
            if m.offset() + 1 >= to[p as usize] {
                open.remove(&p);
            }
        }
    }
    out
}

/// One binary through warm-up and steady traffic; prints and returns the bytes per second it
/// wrote to (the snapshot topic, the snapshot and changelog topics together). A build before
/// the changelog topic writes its attribution changelog to the snapshot topic.
/// A process measured over the steady phase: `banditflow serve` (its model updates from its
/// /metrics) or `banditflow aggregate`.
struct Followed {
    name: String,
    child: std::process::Child,
    listen: String,
    cpu0: f64,
    updates0: f64,
}

impl Followed {
    fn start(
        bin: &str,
        cfg: &std::path::Path,
        name: impl Into<String>,
        command: &str,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Followed {
        let name = name.into();
        let (child, s) = spawn_ready(bin, command, cfg, listen, env);
        println!("{name}: ready in {:.2} s, {:.0} MB resident", s.ready_s, s.rss_mb);
        let mut f = Followed { name, child, listen: listen.to_string(), cpu0: 0.0, updates0: 0.0 };
        (f.cpu0, f.updates0) = (f.cpu(), f.updates());
        f
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(&self.child.id().to_string())
    }

    /// Merged models made visible (a node) or written (the aggregator).
    fn updates(&self) -> f64 {
        let page = get_status(&self.listen, "/metrics").map(|(_, p)| p).unwrap_or_default();
        gauge_sum(&page, "banditflow_serving_model_updates_total")
            + gauge_sum(&page, "banditflow_aggregate_published_total")
    }

    fn report(mut self, label: &str) {
        let (cpu, updates) = (self.cpu() - self.cpu0, self.updates() - self.updates0);
        println!(
            "RESULT {label}: {} over the steady phase: {updates:.0} model updates, {:.1} CPU ms per update ({cpu:.2} CPU s), {:.0} MB resident",
            self.name,
            cpu / updates.max(1.0) * 1e3,
            rss_mb(self.child.id())
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(
    bootstrap: &str,
    shop: &Shop,
    bin: &str,
    label: &str,
    rate: f64,
    seconds: f64,
    nodes: u32,
) -> (f64, f64) {
    let tag = format!("scale-{}-{}", now_ms(), label.replace(' ', "-"));
    let topic = format!("{tag}-events");
    let snapshots = format!("{tag}-snapshots");
    // The default name for the snapshot topic.
    let changelog = format!("{snapshots}-changelog");
    admin::create_topics(
        bootstrap,
        &[
            (&topic, shop.partitions, false),
            (&snapshots, shop.partitions, true),
            (&changelog, shop.partitions, true),
        ],
    )
    .expect("topics");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config_file(dir.path(), bootstrap, &topic, &tag);
    let warm = shop.warm_up(now_ms());
    produce(bootstrap, &topic, &warm, None);
    println!("{label}: warm-up of {} impressions produced", warm.len());
    let (child, assigned, _) = start_binary(bin, &cfg, shop.partitions);
    let pid = child.id().to_string();
    while !assigned.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = format!("{tag}-group");
    while committed(bootstrap, &group, &topic, shop.partitions) < warm.len() as i64 {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{label}: warm-up learned");
    // Past the warm-up's last transaction (it may still be in flight when its offsets show).
    std::thread::sleep(Duration::from_secs(3));
    let mut followers: Vec<Followed> = if nodes >= 1 {
        let aggregator = Followed::start(
            bin,
            &cfg,
            "aggregator",
            "aggregate",
            "127.0.0.1:19478",
            &[("BANDITFLOW__KAFKA__METRICS_ADDRESS", "127.0.0.1:19478")],
        );
        let shards = Followed::start(
            bin,
            &cfg,
            "node merging the shards",
            "serve",
            "127.0.0.1:18093",
            &[("BANDITFLOW__SERVING__LISTEN", "127.0.0.1:18093")],
        );
        let merged = Followed::start(
            bin,
            &cfg,
            "node reading the merged topic",
            "serve",
            "127.0.0.1:18094",
            &[
                ("BANDITFLOW__SERVING__LISTEN", "127.0.0.1:18094"),
                ("BANDITFLOW__SERVING__READ_MERGED", "true"),
            ],
        );
        vec![aggregator, shards, merged]
    } else {
        Vec::new()
    };
    if nodes >= 2 {
        // Divided by partition group, beside the single aggregator: its own merged-model topic
        // and consumer-group name (hence transactional ids). (name, command, listen, whether a node)
        let groups = (shop.partitions + 15) / 16;
        let mut procs: Vec<(String, String, String, bool)> = (0..groups)
            .map(|g| {
                let listen = format!("127.0.0.1:{}", 19480 + g);
                (format!("aggregator of group {g}"), format!("aggregate --group {g}"), listen, false)
            })
            .collect();
        procs.push((
            "aggregator of the groups".into(),
            "aggregate --from-groups".into(),
            "127.0.0.1:19479".into(),
            false,
        ));
        procs.push((
            "node reading the divided stage's merged topic".into(),
            "serve".into(),
            "127.0.0.1:18095".into(),
            true,
        ));
        let (group_id, merged) = (format!("{tag}-divided"), format!("{snapshots}-merged-divided"));
        for (name, command, listen, node) in procs {
            let mut env = vec![
                ("BANDITFLOW__KAFKA__GROUP_ID", group_id.as_str()),
                ("BANDITFLOW__KAFKA__MERGED_TOPIC", &merged),
            ];
            if node {
                env.extend([
                    ("BANDITFLOW__SERVING__LISTEN", listen.as_str()),
                    ("BANDITFLOW__SERVING__READ_MERGED", "true"),
                ]);
            } else {
                env.push(("BANDITFLOW__KAFKA__METRICS_ADDRESS", &listen));
            }
            followers.push(Followed::start(bin, &cfg, name, &command, &listen, &env));
        }
    }
    let from = end_offsets(bootstrap, &snapshots, shop.partitions);
    let from_changelog = end_offsets(bootstrap, &changelog, shop.partitions);
    let (t0, cpu0) = (Instant::now(), cpu_seconds(&pid));
    let n = steady(bootstrap, &topic, shop, rate, seconds, 7);
    println!("{label}: {n} events of steady traffic produced in {:.1} s", t0.elapsed().as_secs_f64());
    let total = warm.len() as i64 + n as i64;
    let mut report = Instant::now();
    loop {
        let done = committed(bootstrap, &group, &topic, shop.partitions);
        if done >= total {
            break;
        }
        if report.elapsed() > Duration::from_secs(10) {
            println!("{label}: {done} of {total} input records committed");
            report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (elapsed, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(&pid) - cpu0);
    let to = end_offsets(bootstrap, &snapshots, shop.partitions);
    let to_changelog = end_offsets(bootstrap, &changelog, shop.partitions);
    stop(child);
    if !followers.is_empty() {
        // The last commit's merged models reach the aggregator and the nodes.
        std::thread::sleep(Duration::from_secs(3));
    }
    for f in followers {
        f.report(label);
    }
    let mut bytes = bytes_between(bootstrap, &snapshots, &from, &to);
    let on_snapshots: usize = bytes.iter().filter(|(k, _)| **k != "arm count").map(|(_, b)| b.0).sum();
    for (k, (b, n)) in bytes_between(bootstrap, &changelog, &from_changelog, &to_changelog) {
        let e = bytes.entry(k).or_default();
        e.0 += b;
        e.1 += n;
    }
    let arms_written = bytes.get("arm count").map(|b| b.1);
    let sum: usize = bytes.iter().filter(|(k, _)| **k != "arm count").map(|(_, b)| b.0).sum();
    let per_s = |k: &str| bytes.get(k).map_or(0, |b| b.0) as f64 / elapsed;
    // Every commit writes each partition's checkpoint header once.
    let commits = bytes.get("checkpoint").map_or(0, |b| b.1) as f64 / f64::from(shop.partitions);
    println!(
        "{label}: {:.0} B/s to the snapshot and changelog topics ({:.0} B/s to the snapshot topic) over {elapsed:.1} s \
         of steady traffic ({n} events): models {:.0} B/s (heads or whole shards) + {:.0} B/s (arm segments), changelog {:.0} B/s, held {:.0} B/s, checkpoints {:.0} B/s; \
         {:.1} CPU µs per event ({:.2} cores); {:.2} commits per partition and second \
         (every {:.2} s), {:.0} B per commit, {:.0} B per head record, {:.1} B per arm written",
        sum as f64 / elapsed,
        on_snapshots as f64 / elapsed,
        per_s("models"),
        per_s("arms"),
        per_s("changelog"),
        per_s("held"),
        per_s("checkpoint"),
        cpu / n as f64 * 1e6,
        cpu / elapsed,
        commits / elapsed,
        elapsed / commits.max(1.0),
        sum as f64 / commits.max(1.0),
        bytes.get("models").map_or(0.0, |b| b.0 as f64 / b.1.max(1) as f64),
        arms_written.map_or(f64::NAN, |n| per_s("arms") * elapsed / n as f64),
    );
    (on_snapshots as f64 / elapsed, sum as f64 / elapsed)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let bootstrap = std::env::var("BANDITFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:39092".into());
    let shop = Shop {
        partitions: env_or("BENCH_PARTITIONS", 12),
        segments: env_or("BENCH_SEGMENTS", 3),
        items: env_or("BENCH_ITEMS", 20_000),
    };
    let rate: f64 = env_or("BENCH_RATE", 1_000.0);
    let seconds: f64 = env_or("BENCH_SECONDS", 60.0);
    println!(
        "{} partitions, {} arms per model and partition ({} segments × {} items), {rate} impressions/s for {seconds} s",
        shop.partitions,
        shop.segments * shop.items,
        shop.segments,
        shop.items
    );
    let nodes: u32 = env_or("BENCH_NODES", 0);
    let this = run(&bootstrap, &shop, env!("CARGO_BIN_EXE_banditflow"), "this build", rate, seconds, nodes);
    if let Some(bin) = std::env::var("BENCH_BASELINE_BIN").ok().filter(|b| !b.is_empty()) {
        let base = run(&bootstrap, &shop, &bin, "baseline", rate, seconds, 0);
        println!(
            "bytes per second, baseline / this build: snapshot topic {:.1}×, both state topics {:.1}×",
            base.0 / this.0,
            base.1 / this.1
        );
    }
}
