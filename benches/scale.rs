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
//! 3. the snapshot topic's bytes (key + value, committed records) written between the end of
//!    the warm-up and the end of the steady phase, per second, by kind of key; and the CPU
//!    seconds the processor spent per steady-phase event.
//!
//! Run: `scripts/kafka.sh start && BANDITFLOW_KAFKA_BOOTSTRAP=127.0.0.1:39092 cargo bench --bench scale`
//! Environment: BENCH_PARTITIONS (12), BENCH_SEGMENTS (3), BENCH_ITEMS (20,000), BENCH_RATE
//! (1,000), BENCH_SECONDS (60), BENCH_BASELINE_BIN.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[path = "support/broker.rs"]
mod broker;
use broker::{committed, config_file, cpu_seconds, env_or, produce, start_binary, stop};

use banditflow::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use banditflow::kafka::{admin, bootstrap_config, now_ms};

const SLATE: usize = 6;

struct Shop {
    partitions: i32,
    segments: usize,
    items: usize,
}

impl Shop {
    fn impression(&self, id: &str, t: i64, segment: usize, items: &[usize]) -> Event {
        Event::Impression(Impression {
            impression_id: id.into(),
            time_ms: t,
            model_id: "home".into(),
            model_version: 0,
            variant: Variant::Treatment,
            segment: format!("seg-{segment}"),
            features: Vec::new(),
            slate: items
                .iter()
                .enumerate()
                .map(|(i, it)| SlateEntry {
                    item_id: format!("item-{it:05}"),
                    position: i as u32 + 1,
                    propensity: 0.5,
                    score: 0.0,
                })
                .collect(),
            opted_out: false,
        })
    }

    fn record(&self, key: &str, e: &Event) -> (i32, Vec<u8>, Vec<u8>) {
        let p = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % self.partitions as u64) as i32;
        (p, key.as_bytes().to_vec(), event::encode(TopicRole::Combined, Encoding::Protobuf, e))
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
                        if self.record(&id, &Event::Feedback(dummy())).0 == p {
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

fn dummy() -> Feedback {
    Feedback {
        impression_id: String::new(),
        item_id: String::new(),
        position: 1,
        kind: FeedbackKind::Click,
        value: 0.0,
        time_ms: 0,
    }
}

/// Steady traffic: `rate` impressions/s for `seconds`, produced as due, with a click on 3 %.
fn steady(bootstrap: &str, topic: &str, shop: &Shop, rate: f64, seconds: f64, seed: u64) -> usize {
    let mut rng = seed | 1;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let n = (rate * seconds) as usize;
    let started = Instant::now();
    let mut batch = Vec::new();
    let mut produced = 0;
    for i in 0..n {
        let due = Duration::from_secs_f64(i as f64 / rate);
        if due > started.elapsed() {
            produce(bootstrap, topic, &std::mem::take(&mut batch), None);
            while due > started.elapsed() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let t = now_ms();
        let id = format!("imp-{seed}-{i}");
        let items: Vec<usize> = (0..SLATE).map(|_| next(shop.items)).collect();
        batch.push(shop.record(&id, &shop.impression(&id, t, next(shop.segments), &items)));
        produced += 1;
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
            batch.push(shop.record(&id, &Event::Feedback(f)));
            produced += 1;
        }
    }
    produce(bootstrap, topic, &batch, None);
    produced
}

fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", "bench-scale-offsets").set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().expect("consumer");
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map_or(0, |w| w.1))
        .collect()
}

/// Bytes (key + value) of the committed records of `topic` from `from` to `to` (per partition),
/// by kind of key.
fn bytes_between(bootstrap: &str, topic: &str, from: &[i64], to: &[i64]) -> BTreeMap<&'static str, usize> {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", "bench-scale-bytes")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in from.iter().enumerate() {
        tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o)).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = BTreeMap::new();
    let mut open: std::collections::BTreeSet<i32> =
        (0..from.len() as i32).filter(|p| from[*p as usize] < to[*p as usize]).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !open.is_empty() && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let p = m.partition();
            if m.offset() >= to[p as usize] {
                open.remove(&p);
                continue;
            }
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            let class = match key.split('/').next().unwrap_or("") {
                "buf" | "imp" => "changelog",
                "held" => "held",
                "model" => "models",
                "checkpoint" => "checkpoint",
                _ => "other",
            };
            *out.entry(class).or_default() += key.len() + m.payload().map_or(0, <[u8]>::len);
            if m.offset() + 1 >= to[p as usize] {
                open.remove(&p);
            }
        }
    }
    out
}

/// One binary through warm-up and steady traffic; prints and returns its snapshot-topic bytes
/// per second.
fn run(bootstrap: &str, shop: &Shop, bin: &str, label: &str, rate: f64, seconds: f64) -> f64 {
    let tag = format!("scale-{}-{label}", now_ms());
    let topic = format!("{tag}-events");
    let snapshots = format!("{tag}-snapshots");
    admin::create_topics(bootstrap, &[(&topic, shop.partitions, false), (&snapshots, shop.partitions, true)])
        .expect("topics");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config_file(dir.path(), bootstrap, &topic, &tag);
    let warm = shop.warm_up(now_ms());
    produce(bootstrap, &topic, &warm, None);
    let (child, assigned, _) = start_binary(bin, &cfg, shop.partitions);
    let pid = child.id().to_string();
    while !assigned.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = format!("{tag}-group");
    while committed(bootstrap, &group, &topic, shop.partitions) < warm.len() as i64 {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the warm-up's last transaction (it may still be in flight when its offsets show).
    std::thread::sleep(Duration::from_secs(3));
    let from = end_offsets(bootstrap, &snapshots, shop.partitions);
    let (t0, cpu0) = (Instant::now(), cpu_seconds(&pid));
    let n = steady(bootstrap, &topic, shop, rate, seconds, 7);
    let total = warm.len() as i64 + n as i64;
    while committed(bootstrap, &group, &topic, shop.partitions) < total {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (elapsed, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(&pid) - cpu0);
    let to = end_offsets(bootstrap, &snapshots, shop.partitions);
    stop(child);
    let bytes = bytes_between(bootstrap, &snapshots, &from, &to);
    let sum: usize = bytes.values().sum();
    let per_s = |k: &str| bytes.get(k).copied().unwrap_or(0) as f64 / elapsed;
    println!(
        "{label}: {:.0} B/s to the snapshot topic over {elapsed:.1} s of steady traffic ({n} events): \
         models {:.0} B/s, changelog {:.0} B/s, held {:.0} B/s, checkpoints {:.0} B/s; \
         {:.1} CPU µs per event ({:.2} cores)",
        sum as f64 / elapsed,
        per_s("models"),
        per_s("changelog"),
        per_s("held"),
        per_s("checkpoint"),
        cpu / n as f64 * 1e6,
        cpu / elapsed
    );
    sum as f64 / elapsed
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
    let this = run(&bootstrap, &shop, env!("CARGO_BIN_EXE_banditflow"), "this build", rate, seconds);
    if let Some(bin) = std::env::var("BENCH_BASELINE_BIN").ok().filter(|b| !b.is_empty()) {
        let base = run(&bootstrap, &shop, &bin, "baseline", rate, seconds);
        println!("snapshot-topic bytes per second: baseline / this build = {:.1}×", base / this);
    }
}
