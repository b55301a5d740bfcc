//! Two input topics read at very different speeds, on a real broker (started by
//! `scripts/kafka.sh`, address from BANDITFLOW_KAFKA_BOOTSTRAP as in `kafka.rs`).
//!
//! The feedback topic is written in large batches and the impressions topic one record per
//! batch, and the consumer fetches at most one batch per partition at a time: feedback arrives
//! far ahead of its impressions, as when a processor catches up on a backlog. A partition task
//! must not apply that feedback before the impressions still on the broker (it would move the
//! event-time watermark past them and orphan the feedback); it pauses the feedback partition
//! instead. The oracle is the offline replay of the same records, which `truth.rs` shows learns
//! the generator's ground truth: integer statistics and every join outcome (orphans included)
//! must be equal, also across a SIGTERM in the middle and a successor that restores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use banditflow::config::Config;
use banditflow::core::{checkpoint, snapshot};
use banditflow::generate::{self, ShopSpec};
use banditflow::kafka::{admin, store, transfer};
use banditflow::recording::Record;
use banditflow::replay;

const PARTITIONS: i32 = 2;

fn bootstrap() -> String {
    let b = std::env::var("BANDITFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:39092".into());
    let c: BaseConsumer = banditflow::kafka::bootstrap_config(&b).create().expect("client");
    if let Err(e) = c.fetch_metadata(None, Duration::from_secs(15)) {
        panic!("no Kafka broker answers at {b} ({e}); start one with `scripts/kafka.sh start` (scripts/test.sh does)");
    }
    b
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        banditflow::kafka::now_ms() % 1_000_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Waits for `cond`, checking every 100 ms, failing after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn end_offsets(bootstrap: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = banditflow::kafka::bootstrap_config(bootstrap).create().expect("client");
    (0..PARTITIONS)
        .map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks").1)
        .collect()
}

fn committed_offsets(bootstrap: &str, group: &str, topic: &str) -> Vec<i64> {
    let mut cfg = banditflow::kafka::bootstrap_config(bootstrap);
    cfg.set("group.id", group);
    let c: BaseConsumer = cfg.create().expect("client");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    match c.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(t) => t.elements().iter().map(|e| e.offset().to_raw().unwrap_or(-1)).collect(),
        Err(_) => vec![-1; PARTITIONS as usize],
    }
}

struct Processor {
    child: Option<Child>,
    log: PathBuf,
}

impl Processor {
    fn start(config: &Path, dir: &Path) -> Processor {
        let log = dir.join(format!("processor-{}.log", unique("run")));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_banditflow"))
            .args(["run", "--config"])
            .arg(config)
            .env("BANDITFLOW__KAFKA__INSTANCE_ID", "0")
            .env("BANDITFLOW_LOG", "info,banditflow::kafka::service=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("processor starts");
        Processor { child: Some(child), log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("processor ignored SIGTERM for 30 s; log {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            eprintln!("--- last lines of {}:", self.log.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

#[test]
fn feedback_fetched_far_ahead_of_its_impressions_waits_for_them() {
    let b = bootstrap();
    let imp = unique("align-impressions");
    let fb = unique("align-feedback");
    let snapshots = unique("align-snapshots");
    let dlq = unique("align-dlq");
    let group = unique("align-group");
    admin::create_topics(&b, &[(&imp, PARTITIONS, false), (&fb, PARTITIONS, false)]).expect("input topics");
    let dir = tempfile::tempdir().expect("tmp");
    let config_path = dir.path().join("banditflow.toml");
    let text = format!(
        r#"
[input]
topics = [{{ name = "{imp}", role = "impressions", encoding = "protobuf" }}, {{ name = "{fb}", role = "feedback", encoding = "json" }}]

[kafka]
bootstrap_servers = "{b}"
group_id = "{group}"
snapshot_topic = "{snapshots}"
dead_letter_topic = "{dlq}"
snapshot_interval = "250ms"
# Shorter than the session timeout below, as zombie fencing at restore requires.
transaction_timeout = "5s"
restore_timeout = "60s"
metrics_address = ""
# A small queue per partition task: holding the feedback must pause its partitions.
partition_queue_records = 64

[kafka.properties]
"session.timeout.ms" = "10000"
"heartbeat.interval.ms" = "500"
# One record batch per partition per fetch: the impressions come a record at a time, the
# feedback thousands at a time.
"max.partition.fetch.bytes" = "1"
"#
    );
    std::fs::write(&config_path, text).expect("config");
    let config = Config::load(Some(&config_path), Vec::new()).expect("test config is valid");

    let shop = generate::generate(&ShopSpec {
        seed: 31,
        impressions: 3000,
        partitions: PARTITIONS,
        malformed_share: 0.0,
        impressions_topic: imp.clone(),
        feedback_topic: fb.clone(),
        ..ShopSpec::default()
    });
    let (impressions, feedback): (Vec<Record>, Vec<Record>) =
        shop.records.iter().cloned().partition(|r| r.topic == imp);
    assert!(!impressions.is_empty() && !feedback.is_empty());
    // Feedback first, in large lz4 batches; then impressions, one record per batch.
    transfer::produce_recording(banditflow::kafka::bootstrap_config(&b), feedback.into_iter())
        .expect("produce feedback");
    let mut one_per_batch = banditflow::kafka::bootstrap_config(&b);
    one_per_batch.set("batch.num.messages", "1");
    transfer::produce_recording(one_per_batch, impressions.into_iter()).expect("produce impressions");
    let (imp_ends, fb_ends) = (end_offsets(&b, &imp), end_offsets(&b, &fb));
    let done =
        || committed_offsets(&b, &group, &imp) == imp_ends && committed_offsets(&b, &group, &fb) == fb_ends;

    // First processor: stopped by SIGTERM once it has paused feedback (or finished).
    let mut first = Processor::start(&config_path, dir.path());
    wait_until("a feedback partition paused (or everything committed)", Duration::from_secs(120), || {
        first.log_text().contains("paused: the partition task waits") || done()
    });
    let paused = first.log_text().contains("paused: the partition task waits");
    let st = first.terminate();
    assert!(st.success(), "SIGTERM while partitions are paused must exit cleanly: {st:?}");
    assert!(paused, "the feedback ran ahead and must have been paused; see {}", first.log.display());

    // A successor restores from the committed snapshots and finishes.
    let _second = Processor::start(&config_path, dir.path());
    wait_until("both topics committed to their end", Duration::from_secs(180), done);

    // The offline replay of the same records: every shard and every join outcome.
    let mut run = replay::ReplayRun::default();
    for r in shop.records.clone() {
        replay::apply_record(&config, &mut run, r);
    }
    let core = &config.core;
    let mut want: Vec<((String, i32), snapshot::DecodedSnapshot)> = Vec::new();
    for (p, st) in &run.partitions {
        for (i, m) in core.models.iter().enumerate() {
            let bytes = snapshot::encode(m, &st.models[i], &checkpoint::shard_meta(core, st, &m.id));
            want.push(((m.id.clone(), *p), snapshot::decode(&bytes).expect("decodes")));
        }
    }
    let read_shards = || {
        store::read_models(banditflow::kafka::bootstrap_config(&b), &snapshots, Duration::from_secs(60))
            .expect("snapshot topic readable")
    };
    wait_until("snapshots covering both topics", Duration::from_secs(60), || {
        let got = read_shards();
        want.iter().all(|(k, w)| got.get(k).is_some_and(|g| g.meta.input_offsets == w.meta.input_offsets))
    });
    let got = read_shards();
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!(g.meta.version, w.meta.version, "{k:?}: records applied");
        let spec = config.core.model(&k.0).expect("model");
        crate::support::assert_shards_equivalent(
            &g.shard,
            &w.shard,
            spec,
            w.meta.watermark_ms,
            &format!("{k:?}"),
        );
    }
    let parts: Vec<i32> = (0..PARTITIONS).collect();
    let stores = store::read_partitions(
        banditflow::kafka::bootstrap_config(&b),
        &snapshots,
        &parts,
        Duration::from_secs(60),
    )
    .expect("snapshot topic readable");
    for p in parts {
        let restored = store::restore_partition(&config, p, &stores[&p]).expect("restores");
        assert_eq!(
            restored.join.counters.rows(),
            run.partitions[&p].join.counters.rows(),
            "partition {p}: join outcomes (orphaned feedback included) differ from the offline replay"
        );
    }
}
