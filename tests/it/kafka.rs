//! Tests on a real Apache Kafka broker (started by `scripts/kafka.sh`; its address comes from
//! BANDITFLOW_KAFKA_BOOTSTRAP, default 127.0.0.1:39092). They fail, never skip, when the broker
//! cannot be reached. Each test uses its own topics and consumer group, so they can run side by
//! side; the broker-restart test runs its own second broker.
//!
//! The oracle everywhere is the offline replay: the records that were produced, replayed
//! through the same core, must give exactly the shard snapshots the service committed — the
//! same bytes, so no event was lost or counted twice — whatever happened in between.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use banditflow::config::Config;
use banditflow::core::checkpoint;
use banditflow::core::snapshot;
use banditflow::generate::{self, ShopSpec};
use banditflow::kafka::{admin, store, transfer};
use banditflow::recording::Record;
use banditflow::replay;

pub(crate) fn bootstrap() -> String {
    let b = std::env::var("BANDITFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:39092".into());
    let c: BaseConsumer = banditflow::kafka::bootstrap_config(&b).create().expect("client");
    if let Err(e) = c.fetch_metadata(None, Duration::from_secs(15)) {
        panic!("no Kafka broker answers at {b} ({e}); start one with `scripts/kafka.sh start` (scripts/test.sh does)");
    }
    b
}

pub(crate) fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        banditflow::kafka::now_ms() % 1_000_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Waits for `cond`, checking every 100 ms, failing after `limit`.
pub(crate) fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The three learning paths of the core, as in the golden fixture: Beta with configured
/// examination, linear with cascade, Beta with estimated examination.
const MODELS: &str = r#"
[[models]]
id = "home"
algorithm = "beta"
position_model = "pbm"
examination = [1.0, 0.77, 0.63, 0.53, 0.45, 0.4]
half_life = "7d"
prior = { alpha = 1.0, beta = 9.0 }

[[models]]
id = "search"
algorithm = "linear"
position_model = "cascade"
half_life = "3d"
linear = { dim = 16, lambda = 1.0, hash_seed = 11 }

[[models]]
id = "recs"
algorithm = "beta"
position_model = "pbm"
examination = "estimated"
half_life = "1d"
"#;

/// The model ids the test shops draw impressions for.
pub(crate) fn model_ids() -> Vec<String> {
    ["home", "search", "recs"].map(String::from).to_vec()
}

/// One test's topics, group and config.
pub(crate) struct Setup {
    pub(crate) bootstrap: String,
    pub(crate) input: String,
    pub(crate) snapshots: String,
    pub(crate) dead_letters: String,
    group: String,
    pub(crate) partitions: i32,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config_path: PathBuf,
}

impl Setup {
    pub(crate) fn new(name: &str, bootstrap: &str, partitions: i32) -> Setup {
        Setup::replicated(name, bootstrap, partitions, 1)
    }

    /// [`Setup::new`] with an input topic of `replication` replicas per partition.
    pub(crate) fn replicated(name: &str, bootstrap: &str, partitions: i32, replication: i32) -> Setup {
        let input = unique(&format!("{name}-events"));
        let s = Setup {
            bootstrap: bootstrap.into(),
            snapshots: unique(&format!("{name}-snapshots")),
            dead_letters: unique(&format!("{name}-dlq")),
            group: unique(&format!("{name}-group")),
            partitions,
            dir: tempfile::tempdir().expect("tmp"),
            config_path: PathBuf::new(),
            input,
        };
        admin::create_replicated_topics(bootstrap, &[(&s.input, partitions, false)], replication)
            .expect("input topic");
        let text = format!(
            r#"
[input]
topics = [{{ name = "{input}", role = "combined", encoding = "protobuf" }}]

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
snapshot_topic = "{snapshots}"
dead_letter_topic = "{dlq}"
snapshot_interval = "250ms"
# Shorter than the session timeout below, as zombie fencing at restore requires (checked at
# start-up).
transaction_timeout = "5s"
restore_timeout = "60s"
metrics_address = ""

[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
{MODELS}"#,
            input = s.input,
            group = s.group,
            snapshots = s.snapshots,
            dlq = s.dead_letters,
        )
        .replace("{MODELS}", MODELS);
        let config_path = s.dir.path().join("banditflow.toml");
        std::fs::write(&config_path, text).expect("config");
        Setup { config_path, ..s }
    }

    /// Switches the config from the combined input topic to `input` (impressions, protobuf) and
    /// a new co-partitioned `feedback` topic (JSON), whose name it returns.
    pub(crate) fn use_two_topics(&self, name: &str) -> String {
        let fb = unique(&format!("{name}-feedback"));
        admin::create_topics(&self.bootstrap, &[(&fb, self.partitions, false)]).expect("topic");
        edit_config(
            self,
            &format!(r#"topics = [{{ name = "{}", role = "combined", encoding = "protobuf" }}]"#, self.input),
            &format!(
                r#"topics = [{{ name = "{}", role = "impressions", encoding = "protobuf" }}, {{ name = "{fb}", role = "feedback", encoding = "json" }}]"#,
                self.input
            ),
        );
        fb
    }

    /// The changelog topic (the default name for the snapshot topic).
    pub(crate) fn changelog(&self) -> String {
        format!("{}-changelog", self.snapshots)
    }

    /// The newest value per key of every partition of `topic` (a state topic), committed
    /// records only.
    pub(crate) fn read_state(&self, topic: &str) -> BTreeMap<i32, banditflow::core::blob::LatestByKey> {
        let parts: Vec<i32> = (0..self.partitions).collect();
        store::read_partitions(
            banditflow::kafka::bootstrap_config(&self.bootstrap),
            topic,
            &parts,
            Duration::from_secs(60),
        )
        .expect("topic readable")
    }

    pub(crate) fn config(&self) -> Config {
        Config::load(Some(&self.config_path), Vec::new()).expect("test config is valid")
    }

    /// A shop on this setup's combined topic and partitions, for all three models.
    pub(crate) fn shop_with(&self, spec: ShopSpec) -> generate::Shop {
        generate::generate(&ShopSpec {
            partitions: self.partitions,
            combined_topic: Some(self.input.clone()),
            model_ids: model_ids(),
            ..spec
        })
    }

    /// The committed shards merged per model must hold exactly the generator's ground truth
    /// (`support::truth`): an oracle that shares no code with the join.
    pub(crate) fn assert_totals_match_truth(&self, events: &[banditflow::core::event::Event]) {
        let config = self.config();
        let truth = crate::support::truth(&config, events);
        let shards = store::read_models(
            banditflow::kafka::bootstrap_config(&self.bootstrap),
            &self.snapshots,
            Duration::from_secs(60),
        )
        .expect("snapshot topic readable");
        for m in &config.core.models {
            let mine: Vec<_> =
                shards.iter().filter(|((id, _), _)| *id == m.id).map(|(_, s)| s.clone()).collect();
            let merged = snapshot::merge(&mine).expect("shards merge");
            let got = crate::support::Totals::of(&merged.shard);
            let want = truth.get(&m.id).cloned().unwrap_or_default();
            assert!(got == want, "model {}: learned totals differ from the generator's truth", m.id);
        }
    }

    pub(crate) fn produce(&self, records: Vec<Record>) {
        transfer::produce_recording(
            banditflow::kafka::bootstrap_config(&self.bootstrap),
            records.into_iter(),
        )
        .expect("produce");
    }

    /// Everything on `topic` (committed records), through the recorder.
    fn record_topic(&self, topic: &str) -> Vec<Record> {
        let mut out = Vec::new();
        transfer::record(
            banditflow::kafka::bootstrap_config(&self.bootstrap),
            &[topic.to_string()],
            transfer::StartAt::Beginning,
            transfer::StopAt::End,
            false,
            &mut out,
        )
        .expect("topic readable");
        String::from_utf8(out)
            .expect("recording is UTF-8")
            .lines()
            .map(|l| banditflow::recording::parse_line(1, l).expect("recording line"))
            .collect()
    }

    /// Produces on another thread, so processors can be started, killed and moved meanwhile.
    pub(crate) fn produce_in_background(
        &self,
        records: Vec<Record>,
    ) -> std::thread::JoinHandle<anyhow::Result<u64>> {
        let bootstrap = self.bootstrap.clone();
        std::thread::spawn(move || {
            transfer::produce_recording(banditflow::kafka::bootstrap_config(&bootstrap), records.into_iter())
        })
    }

    /// [`Setup::produce_in_background`] at a steady `rate` of records per second.
    pub(crate) fn produce_paced(
        &self,
        records: Vec<Record>,
        rate: f64,
    ) -> std::thread::JoinHandle<anyhow::Result<u64>> {
        self.traffic(records, rate, 0).handle
    }

    /// Traffic that lasts as long as a test needs it, whatever the machine's speed: `records` go
    /// out at `rate` per second until `hold` of them are left; those trickle out at `rate / 20`
    /// until [`Traffic::release`], then go at once. The records produced are still exactly
    /// `records`, so the generator's truth stays the oracle.
    pub(crate) fn traffic(&self, records: Vec<Record>, rate: f64, hold: usize) -> Traffic {
        let bootstrap = self.bootstrap.clone();
        let released = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let total = records.len();
        let trickle_from = total.saturating_sub(hold);
        let (flag, count) = (released.clone(), sent.clone());
        let mut due = Instant::now();
        let paced = records.into_iter().enumerate().map(move |(i, r)| {
            count.store(i, Ordering::Relaxed);
            if i % 64 == 0 && i > 0 {
                let trickle = i >= trickle_from;
                due += Duration::from_secs_f64(64.0 / if trickle { rate / 20.0 } else { rate });
                // Sleep in short slices so a release is taken up at once.
                while Instant::now() < due && !(trickle && flag.load(Ordering::Relaxed)) {
                    std::thread::sleep(
                        due.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
                    );
                }
            }
            r
        });
        let handle = std::thread::spawn(move || {
            transfer::produce_recording(banditflow::kafka::bootstrap_config(&bootstrap), paced)
        });
        Traffic { released, sent, total, handle }
    }

    pub(crate) fn start(&self, instance: &str) -> Processor {
        self.start_logging(instance, "info")
    }

    /// Starts a processor whose log shows `filter` (a tracing filter, e.g. with debug targets).
    pub(crate) fn start_logging(&self, instance: &str, filter: &str) -> Processor {
        self.start_with(instance, filter, &[])
    }

    /// [`Setup::start_logging`] with more environment variables (config overrides).
    pub(crate) fn start_with(&self, instance: &str, filter: &str, env: &[(&str, &str)]) -> Processor {
        let log = self.dir.path().join(format!("processor-{instance}-{}.log", unique("run")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_banditflow"));
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .env("BANDITFLOW__KAFKA__INSTANCE_ID", instance)
            .env("RUST_LOG", filter);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("processor starts");
        Processor { child: Some(child), log }
    }

    /// Starts `banditflow aggregate` on this setup's topics, with `args` after the config and
    /// `env` set.
    pub(crate) fn start_aggregator(&self, args: &[&str], env: &[(&str, &str)]) -> Processor {
        let log = self.dir.path().join(format!("{}.log", unique("aggregate")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_banditflow"));
        cmd.args(["aggregate", "--config"]).arg(&self.config_path).args(args).env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("aggregator starts");
        Processor { child: Some(child), log }
    }

    /// End offsets of every partition of each of `topics`, in order.
    pub(crate) fn end_offsets_of(&self, topics: &[String]) -> Vec<i64> {
        let c: BaseConsumer = banditflow::kafka::bootstrap_config(&self.bootstrap).create().expect("client");
        topics
            .iter()
            .flat_map(|t| {
                (0..self.partitions)
                    .map(|p| c.fetch_watermarks(t, p, Duration::from_secs(10)).expect("watermarks").1)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The group's committed offsets of every partition of each of `topics` (-1: none).
    pub(crate) fn committed_offsets_of(&self, topics: &[String]) -> Vec<i64> {
        let mut cfg = banditflow::kafka::bootstrap_config(&self.bootstrap);
        cfg.set("group.id", &self.group);
        let c: BaseConsumer = cfg.create().expect("client");
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            for p in 0..self.partitions {
                tpl.add_partition(t, p);
            }
        }
        match c.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(t) => t.elements().iter().map(|e| e.offset().to_raw().unwrap_or(-1)).collect(),
            Err(_) => vec![-1; topics.len() * self.partitions as usize],
        }
    }

    pub(crate) fn end_offsets(&self) -> Vec<i64> {
        self.end_offsets_of(std::slice::from_ref(&self.input))
    }

    pub(crate) fn committed_offsets(&self) -> Vec<i64> {
        self.committed_offsets_of(std::slice::from_ref(&self.input))
    }

    /// Sum of the group's committed offsets over the input partitions (0 for none yet).
    pub(crate) fn committed_total(&self) -> i64 {
        self.committed_offsets().iter().map(|o| o.max(&0)).sum()
    }

    pub(crate) fn wait_caught_up(&self, limit: Duration) {
        let ends = self.end_offsets();
        wait_until("the group to commit every input record", limit, || self.committed_offsets() == ends);
    }

    /// Shard snapshots on the snapshot topic, re-encoded: (model, partition) → bytes.
    pub(crate) fn committed_shards(&self) -> BTreeMap<(String, i32), Vec<u8>> {
        store::read_models(
            banditflow::kafka::bootstrap_config(&self.bootstrap),
            &self.snapshots,
            Duration::from_secs(60),
        )
        .expect("snapshot topic readable")
        .into_iter()
        .map(|(k, s)| (k, snapshot::encode(&s.spec, &s.shard, &s.meta)))
        .collect()
    }

    /// What the offline replay makes of `records`: (model, partition) → shard snapshot bytes.
    pub(crate) fn offline_shards(&self, records: &[Record]) -> BTreeMap<(String, i32), Vec<u8>> {
        let config = self.config();
        let mut run = replay::ReplayRun::default();
        for r in records {
            replay::apply_record(&config, &mut run, r.clone());
        }
        let mut out = BTreeMap::new();
        for (p, st) in &run.partitions {
            for (i, m) in config.core.models.iter().enumerate() {
                out.insert(
                    (m.id.clone(), *p),
                    snapshot::encode(m, &st.models[i], &checkpoint::shard_meta(&config.core, st, &m.id)),
                );
            }
        }
        out
    }

    /// With two input topics the interleaving is not fixed by the log: waits until every
    /// committed shard covers the offsets the offline replay covers, then requires the same
    /// records applied, integer statistics exactly and decayed sums within rounding.
    pub(crate) fn assert_equivalent_to_offline(&self, records: &[Record]) {
        let want: BTreeMap<_, _> = self
            .offline_shards(records)
            .into_iter()
            .map(|(k, w)| (k, snapshot::decode(&w).expect("decodes")))
            .collect();
        let mut got = BTreeMap::new();
        wait_until("snapshots covering every input topic", Duration::from_secs(60), || {
            got = self.committed_shards();
            want.iter().all(|(k, w)| {
                got.get(k).is_some_and(|g| {
                    snapshot::decode(g).is_ok_and(|g| g.meta.input_offsets == w.meta.input_offsets)
                })
            })
        });
        let config = self.config();
        for (k, w) in &want {
            let g = snapshot::decode(&got[k]).expect("decodes");
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
    }

    fn assert_matches_offline(&self, records: &[Record]) {
        let want = self.offline_shards(records);
        let got = self.committed_shards();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "shards on the snapshot topic"
        );
        for (k, bytes) in &want {
            if got[k] != *bytes {
                let a = snapshot::decode(&got[k]).expect("decodes");
                let b = snapshot::decode(bytes).expect("decodes");
                panic!(
                    "shard {k:?} differs from the offline replay: version {} vs {}, variants {:?} vs {:?}",
                    a.meta.version, b.meta.version, a.shard.variants, b.shard.variants
                );
            }
        }
    }
}

pub(crate) struct Processor {
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
}

impl Processor {
    pub(crate) fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn signal(&self, sig: &str) {
        // Never `kill SIG 0`: that would signal this test's whole process group.
        assert!(self.child.is_some(), "the processor was already stopped");
        let st = Command::new("kill").args([sig, &self.pid().to_string()]).status().expect("kill runs");
        assert!(st.success());
    }

    pub(crate) fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status and how long it took.
    pub(crate) fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return (st, started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("processor ignored SIGTERM for 30 s; log {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("--- last lines of {}:", self.log.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

#[test]
fn kafka_path_equals_offline_path_and_sigterm_exits_cleanly() {
    let b = bootstrap();
    let s = Setup::new("equal", &b, 3);
    let shop =
        s.shop_with(ShopSpec { seed: 11, impressions: 4000, malformed_share: 0.01, ..ShopSpec::default() });
    let records = shop.records.clone();
    s.produce(records.clone());
    let mut p = s.start("0");
    s.wait_caught_up(Duration::from_secs(120));
    let (status, took) = p.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", p.log_text());
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    assert!(p.log_text().contains("left the group"), "log:\n{}", p.log_text());
    s.assert_matches_offline(&records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn sigterm_mid_stream_commits_final_snapshots_and_a_successor_finishes_exactly() {
    let b = bootstrap();
    let s = Setup::new("sigterm", &b, 2);
    let shop =
        s.shop_with(ShopSpec { seed: 12, impressions: 30_000, malformed_share: 0.0, ..ShopSpec::default() });
    let records = shop.records.clone();
    let producer = s.produce_in_background(records.clone());
    let mut p = s.start("0");
    wait_until("some progress", Duration::from_secs(60), || s.committed_offsets().iter().any(|o| *o > 0));
    let (status, took) = p.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", p.log_text());
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    // What was committed is exactly what the final snapshots cover.
    let committed = s.committed_offsets();
    let shards =
        store::read_models(banditflow::kafka::bootstrap_config(&b), &s.snapshots, Duration::from_secs(30))
            .expect("readable");
    for ((_, part), snap) in &shards {
        let covered = snap.meta.input_offsets.iter().find(|(t, _, _)| *t == s.input).map_or(0, |o| o.2);
        assert_eq!(
            covered, committed[*part as usize],
            "partition {part}: snapshot and committed offset disagree"
        );
    }
    producer.join().expect("producer thread").expect("produced");
    let _next = s.start("0");
    s.wait_caught_up(Duration::from_secs(120));
    s.assert_matches_offline(&records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let b = bootstrap();
    let s = Setup::new("crash", &b, 3);
    // About 1.05 M events.
    let shop =
        s.shop_with(ShopSpec { seed: 13, impressions: 500_000, malformed_share: 0.0, ..ShopSpec::default() });
    let records = shop.records.clone();
    assert!(records.len() >= 1_000_000, "{} records", records.len());
    let producer = s.produce_in_background(records.clone());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    // Kill points spread over the whole stream: each round goes on until the committed input
    // position has advanced by 2.5–12.5 % of the stream, then kills.
    let total = records.len() as i64;
    let mut targets = Vec::new();
    let mut kills = Vec::new();
    for round in 0..5 {
        // (A group in the middle of a rebalance may not answer: never count below the last.)
        let base = s.committed_total().max(kills.last().copied().unwrap_or(0));
        // Commits may run ahead of a kill point; a target past the stream's end (less a
        // margin) is capped so that it stays reachable.
        let target = (base + rng.random_range(total / 40..total / 8)).min(total - total / 50);
        targets.push(target);
        // Instance ids alternate; in rounds 1 and 3 two instances share the partitions.
        let id = ["0", "1"][round % 2];
        let mut running = vec![s.start(id)];
        if round % 2 == 1 {
            running.push(s.start(["0", "1"][(round + 1) % 2]));
        }
        eprintln!("crash test round {round}: from {base}, kill at {target} of {total}");
        wait_until("the committed position to reach the kill point", Duration::from_secs(180), || {
            s.committed_total() >= target
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        // SIGKILL one at random (the other, if any, goes on alone for a moment), then the rest.
        let victim = rng.random_range(0..running.len());
        running[victim].kill9();
        kills.push(s.committed_total().max(target));
        if running.len() > 1 {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        }
        for p in &mut running {
            if p.pid() != 0 {
                p.kill9();
            }
        }
    }
    producer.join().expect("producer thread").expect("produced");
    let _last = s.start("0");
    s.wait_caught_up(Duration::from_secs(300));
    eprintln!(
        "crash test: {} records, kill points {targets:?}, killed at committed totals {kills:?}",
        records.len()
    );
    s.assert_matches_offline(&records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn rebalance_one_three_one_keeps_exact_totals() {
    let b = bootstrap();
    let s = Setup::new("rebalance", &b, 6);
    let shop =
        s.shop_with(ShopSpec { seed: 14, impressions: 120_000, malformed_share: 0.0, ..ShopSpec::default() });
    let records = shop.records.clone();
    // The first half is produced while one instance runs; the second only once three share the
    // partitions, so the three have records to learn whatever the machine's speed.
    let (first, second) = halves(&shop);
    let producer = s.produce_in_background(first);
    let progress = || s.committed_total();
    let _a = s.start("0");
    wait_until("first instance progresses", Duration::from_secs(60), || progress() > 0);
    let at_one = progress();
    let mut bee = s.start("1");
    let mut cee = s.start("2");
    wait_until("three instances share the partitions", Duration::from_secs(60), || {
        bee.log_text().contains("partition assigned") && cee.log_text().contains("partition assigned")
    });
    producer.join().expect("producer thread").expect("produced");
    let at_three = progress();
    let producer = s.produce_in_background(second);
    wait_until("progress with three instances", Duration::from_secs(60), || progress() > at_three);
    for p in [&mut bee, &mut cee] {
        let (status, _) = p.terminate();
        assert!(status.success(), "log:\n{}", p.log_text());
    }
    producer.join().expect("producer thread").expect("produced");
    s.wait_caught_up(Duration::from_secs(180));
    eprintln!(
        "rebalance test: {} records; committed {at_one} with one instance, {at_three} when three shared",
        records.len()
    );
    s.assert_matches_offline(&records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn poison_records_go_to_the_dead_letter_topic_with_their_reason() {
    let b = bootstrap();
    let s = Setup::new("poison", &b, 2);
    let shop =
        s.shop_with(ShopSpec { seed: 15, impressions: 6000, malformed_share: 0.05, ..ShopSpec::default() });
    let mut records = shop.records.clone();
    let decodes = |r: &Record| {
        banditflow::core::event::decode(
            banditflow::core::event::TopicRole::Combined,
            banditflow::core::event::Encoding::Protobuf,
            &r.payload,
        )
    };
    // Poison the generator does not make, each a copy of a good record's envelope: dated 2100,
    // in microseconds, an over-long id, an extreme value; spread over the stream.
    let mut planted = 0;
    for k in 1..=20 {
        let at = k * records.len() / 21;
        let Ok(event) = decodes(&records[at]) else { continue };
        let bad = match (k % 4, event) {
            (0, banditflow::core::event::Event::Impression(mut i)) => {
                i.time_ms = 4_102_444_800_000;
                banditflow::core::event::Event::Impression(i)
            }
            (1, banditflow::core::event::Event::Impression(mut i)) => {
                i.time_ms *= 1000;
                banditflow::core::event::Event::Impression(i)
            }
            (2, banditflow::core::event::Event::Impression(mut i)) => {
                i.slate[0].item_id = "x".repeat(300);
                banditflow::core::event::Event::Impression(i)
            }
            (_, banditflow::core::event::Event::Feedback(mut f)) => {
                f.value = 1e200;
                banditflow::core::event::Event::Feedback(f)
            }
            _ => continue,
        };
        let payload = banditflow::core::event::encode(
            banditflow::core::event::TopicRole::Combined,
            banditflow::core::event::Encoding::Protobuf,
            &bad,
        );
        let copy = Record { payload, ..records[at].clone() };
        records.insert(at + 1, copy);
        planted += 1;
    }
    assert!(planted >= 10, "{planted} planted");
    // Offsets as the broker will assign them (fresh topic, one producer, in order).
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &mut records {
        let o = next.entry(r.partition).or_default();
        r.offset = *o;
        *o += 1;
    }
    // Expected dead letters by source position: what does not decode (the generator's
    // malformed records) plus the planted ones, which decode but break a bound.
    let config = s.config();
    let mut want: std::collections::BTreeSet<(i32, i64)> = std::collections::BTreeSet::new();
    for r in &records {
        let bad = match decodes(r) {
            Err(_) => true,
            Ok(e) => {
                let limits = &config.core.limits;
                let over_long = banditflow::core::event::check_limits(
                    &e.view(),
                    limits.max_id_bytes,
                    limits.max_features,
                )
                .is_err();
                let future =
                    r.timestamp_ms.is_some_and(|ts| e.time_ms() > ts + limits.max_event_time_skew_ms);
                over_long || future
            }
        };
        if bad {
            want.insert((r.partition, r.offset));
        }
    }
    let share = want.len() as f64 / records.len() as f64;
    assert!((0.005..0.05).contains(&share), "about 1 % malformed, got {share}");
    s.produce(records.clone());
    let _p = s.start("0");
    s.wait_caught_up(Duration::from_secs(120));
    let lines = s.record_topic(&s.dead_letters);
    let mut got: Vec<(i32, i64)> = Vec::new();
    for r in &lines {
        let header = |n: &str| {
            r.headers.iter().find(|(k, _)| k == n).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert!(header(replay::HEADER_CODE)
            .is_some_and(|c| banditflow::core::event::InvalidEvent::code_named(&c).is_some()));
        assert!(header(replay::HEADER_REASON).is_some_and(|r| !r.is_empty()));
        assert_eq!(header("banditflow.source.topic").as_deref(), Some(s.input.as_str()));
        let num = |n: &str| header(n).and_then(|v| v.parse::<i64>().ok()).expect("numeric source header");
        let source = (num("banditflow.source.partition") as i32, num("banditflow.source.offset"));
        let original =
            records.iter().find(|o| (o.partition, o.offset) == source).expect("source record exists");
        assert_eq!(r.payload, original.payload, "{source:?}: the dead letter carries the record as it came");
        got.push(source);
    }
    got.sort_unstable();
    let unique: std::collections::BTreeSet<(i32, i64)> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "a poison record dead-lettered twice");
    assert_eq!(unique, want, "dead letters by source partition/offset");
    s.assert_matches_offline(&records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn a_model_larger_than_a_message_is_chunked_and_restored() {
    let b = bootstrap();
    // Small chunks so a ~2 MB model takes many records; the broker's own limit is ~1 MB.
    let s = Setup::new("large", &b, 1);
    let mut text = std::fs::read_to_string(&s.config_path).expect("config");
    text = text.replace("restore_timeout = \"60s\"", "restore_timeout = \"60s\"\nmax_record_bytes = 300000");
    std::fs::write(&s.config_path, text).expect("config");
    let records = generate::generate(&ShopSpec {
        seed: 16,
        impressions: 1500,
        partitions: 1,
        items: 60_000,
        slate_size: 200,
        holdout_share: 1.0,
        malformed_share: 0.0,
        combined_topic: Some(s.input.clone()),
        ..ShopSpec::default()
    })
    .records;
    s.produce(records.clone());
    let mut p = s.start("0");
    s.wait_caught_up(Duration::from_secs(180));
    let (status, _) = p.terminate();
    assert!(status.success());
    let shards = s.committed_shards();
    let biggest = shards.values().map(Vec::len).max().unwrap_or(0);
    assert!(biggest > 1_100_000, "model snapshot is only {biggest} bytes");
    // The chunks are on the topic.
    let raw = s.record_topic(&s.snapshots);
    assert!(
        raw.iter().any(|r| r.key.as_deref().is_some_and(|k| k.ends_with(b"#3"))),
        "expected chunk records on the snapshot topic"
    );
    s.assert_matches_offline(&records);
    // A restarted processor restores from the chunks and carries on exactly.
    let more = generate::generate(&ShopSpec {
        seed: 17,
        impressions: 200,
        partitions: 1,
        items: 60_000,
        slate_size: 200,
        holdout_share: 1.0,
        malformed_share: 0.0,
        combined_topic: Some(s.input.clone()),
        ..ShopSpec::default()
    })
    .records;
    let base = records.len() as i64;
    let more: Vec<Record> = more.into_iter().map(|r| Record { offset: r.offset + base, ..r }).collect();
    s.produce(more.clone());
    let _p2 = s.start("0");
    s.wait_caught_up(Duration::from_secs(180));
    let all: Vec<Record> = records.into_iter().chain(more).collect();
    s.assert_matches_offline(&all);
}

#[test]
fn record_then_replay_to_kafka_round_trips() {
    let b = bootstrap();
    let imp = unique("rt-impressions");
    let fb = unique("rt-feedback");
    admin::create_topics(&b, &[(&imp, 3, false), (&fb, 3, false)]).expect("topics");
    let shop = generate::generate(&ShopSpec {
        seed: 18,
        impressions: 800,
        partitions: 3,
        impressions_topic: imp.clone(),
        feedback_topic: fb.clone(),
        ..ShopSpec::default()
    });
    let dir = tempfile::tempdir().expect("tmp");
    let original = dir.path().join("original.jsonl");
    let mut f = std::fs::File::create(&original).expect("file");
    for r in &shop.records {
        writeln!(f, "{}", banditflow::recording::format_line(r)).expect("write");
    }
    drop(f);
    let bin = env!("CARGO_BIN_EXE_banditflow");
    let st = Command::new(bin)
        .args(["replay", "--to-kafka", "--bootstrap", &b, "--input"])
        .arg(&original)
        .status()
        .expect("runs");
    assert!(st.success());
    let recorded = dir.path().join("recorded.jsonl");
    let st = Command::new(bin)
        .args(["record", "--bootstrap", &b, "--topics", &format!("{imp},{fb}"), "--out"])
        .arg(&recorded)
        .status()
        .expect("runs");
    assert!(st.success());
    let sorted = |p: &Path| {
        let mut v: Vec<Record> = std::fs::read_to_string(p)
            .expect("read")
            .lines()
            .map(|l| banditflow::recording::parse_line(1, l).expect("line"))
            .collect();
        v.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
        v
    };
    let (a, bb) = (sorted(&original), sorted(&recorded));
    assert_eq!(a.len(), bb.len());
    assert!(
        a.iter().any(|r| std::str::from_utf8(&r.payload).is_err()),
        "binary payloads are part of the test"
    );
    assert_eq!(a, bb, "topic, partition, offset, timestamp, key, headers and payload all survive");
}

#[test]
fn two_topics_give_the_offline_state_up_to_interleaving() {
    // Impressions (protobuf) and feedback (JSON) on two co-partitioned topics: the consumer
    // interleaves them in an order the log does not fix, so counters must match exactly and
    // decayed sums within rounding.
    let b = bootstrap();
    let s = Setup::new("twotopics", &b, 2);
    let fb = s.use_two_topics("twotopics");
    let shop = generate::generate(&ShopSpec {
        seed: 19,
        impressions: 3000,
        partitions: 2,
        impressions_topic: s.input.clone(),
        feedback_topic: fb.clone(),
        model_ids: model_ids(),
        ..ShopSpec::default()
    });
    s.produce(shop.records.clone());
    let _p = s.start("0");
    let ends = s.end_offsets();
    wait_until("impressions committed", Duration::from_secs(120), || s.committed_offsets() == ends);
    s.assert_equivalent_to_offline(&shop.records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn broker_restart_mid_stream_keeps_exact_totals() {
    // A broker of its own, so restarting it disturbs no other test. Its ports lie below Linux's
    // ephemeral range (32768–60999): while it is down, clients retrying 127.0.0.1:<port> can be
    // given that very port as their own source port and connect to themselves (TCP
    // self-connect), and the restarted broker then cannot bind it ("Address already in use",
    // seen once in a suite run with 39192).
    let port = 29192;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let kafka = |cmd: &str| {
        let out = Command::new("bash")
            .arg(root.join("scripts/kafka.sh"))
            .arg(cmd)
            .args(if cmd == "start" { vec!["--fresh"] } else { vec![] })
            .env("BANDITFLOW_KAFKA_PORT", port.to_string())
            .output()
            .expect("kafka.sh runs");
        assert!(out.status.success(), "kafka.sh {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    };
    struct StopBroker<'a>(&'a dyn Fn(&str));
    impl Drop for StopBroker<'_> {
        fn drop(&mut self) {
            (self.0)("stop");
        }
    }
    kafka("start");
    let _stop = StopBroker(&kafka);
    let b = format!("127.0.0.1:{port}");
    let s = Setup::new("brokerrestart", &b, 2);
    let shop =
        s.shop_with(ShopSpec { seed: 20, impressions: 60_000, malformed_share: 0.0, ..ShopSpec::default() });
    let records = shop.records.clone();
    let (first, second) = records.split_at(records.len() / 2);
    s.produce(first.to_vec());
    let _p = s.start("0");
    wait_until("progress before the restart", Duration::from_secs(60), || {
        s.committed_offsets().iter().any(|o| *o > 0)
    });
    let restarted = Command::new("bash")
        .arg(root.join("scripts/kafka.sh"))
        .arg("restart")
        .env("BANDITFLOW_KAFKA_PORT", port.to_string())
        .output()
        .expect("runs");
    assert!(restarted.status.success(), "{}", String::from_utf8_lossy(&restarted.stderr));
    s.produce(second.to_vec());
    s.wait_caught_up(Duration::from_secs(240));
    s.assert_matches_offline(&records);
    s.assert_totals_match_truth(&shop.events);
}

/// Runs `banditflow run` on `s` and waits for it to exit (for configurations it refuses).
fn run_until_it_exits(s: &Setup) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_banditflow"))
        .args(["run", "--config"])
        .arg(&s.config_path)
        .output()
        .expect("runs")
}

#[test]
fn mismatched_partition_counts_are_refused_with_a_clear_message() {
    let b = bootstrap();
    let s = Setup::new("copart", &b, 2);
    let fb = unique("copart-feedback");
    admin::create_topics(&b, &[(&fb, 3, false)]).expect("topic");
    let text = std::fs::read_to_string(&s.config_path).expect("config").replace(
        &format!(r#"topics = [{{ name = "{}", role = "combined", encoding = "protobuf" }}]"#, s.input),
        &format!(r#"topics = [{{ name = "{}", role = "impressions", encoding = "protobuf" }}, {{ name = "{fb}", role = "feedback", encoding = "json" }}]"#, s.input),
    );
    std::fs::write(&s.config_path, text).expect("config");
    let out = run_until_it_exits(&s);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not co-partitioned") && err.contains("has 2") && err.contains("has 3"), "{err}");
}

#[test]
fn librdkafka_properties_it_refuses_end_the_processor_at_once() {
    // Regression: a property librdkafka refuses at client creation restarted the session every
    // 30 s for ever instead of ending the program with the cause.
    let b = bootstrap();
    let s = Setup::new("badprops", &b, 1);
    edit_config(
        &s,
        "\"heartbeat.interval.ms\" = \"500\"",
        "\"heartbeat.interval.ms\" = \"500\"\n\"fetch.max.bytes\" = \"1024\"",
    );
    let started = Instant::now();
    let out = run_until_it_exits(&s);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("librdkafka refused the configuration") && err.contains("fetch.max.bytes"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "at once: {:?}", started.elapsed());
}

#[test]
fn a_snapshot_topic_that_retention_may_delete_is_refused() {
    // Regression: cleanup.policy=compact,delete was accepted (`contains("compact")`), and
    // retention then deleted state that restore silently did without.
    let b = bootstrap();
    let s = Setup::new("policy", &b, 1);
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        banditflow::kafka::bootstrap_config(&b).create().expect("admin");
    let topic = rdkafka::admin::NewTopic::new(&s.snapshots, 1, rdkafka::admin::TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact,delete");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let created =
        rt.block_on(admin.create_topics(&[topic], &rdkafka::admin::AdminOptions::new())).expect("create");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let out = run_until_it_exits(&s);
    assert!(!out.status.success(), "refused at start, not retried");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cleanup.policy=compact,delete") && err.contains("must be `compact` alone"),
        "{err}"
    );
}

/// Runs `first`, stops with SIGTERM, then runs `second` (after `between`) and stops again.
/// Returns the second processor's log. Waiting for every record to be committed is the proof
/// that the service neither stopped nor crash-looped.
fn run_in_two_phases(s: &Setup, first: &[Record], second: &[Record], between: impl FnOnce()) -> String {
    s.produce(first.to_vec());
    let mut p = s.start("0");
    s.wait_caught_up(Duration::from_secs(120));
    let (status, _) = p.terminate();
    assert!(status.success(), "log:\n{}", p.log_text());
    between();
    s.produce(second.to_vec());
    let mut p = s.start("0");
    s.wait_caught_up(Duration::from_secs(120));
    let (status, _) = p.terminate();
    assert!(status.success(), "log:\n{}", p.log_text());
    p.log_text()
}

/// A shop split in two halves by record position; the second half's offsets continue the first.
pub(crate) fn halves(shop: &generate::Shop) -> (Vec<Record>, Vec<Record>) {
    let (a, b) = shop.records.split_at(shop.records.len() / 2);
    (a.to_vec(), b.to_vec())
}

#[test]
fn ids_with_key_separators_survive_a_restart_byte_for_byte() {
    let b = bootstrap();
    let s = Setup::new("oddids", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 21, impressions: 3000, odd_ids: true, ..ShopSpec::default() });
    assert!(shop.records.iter().any(|r| r.key.as_deref().is_some_and(|k| k.contains(&b'#'))));
    let (first, second) = halves(&shop);
    run_in_two_phases(&s, &first, &second, || {});
    s.assert_matches_offline(&shop.records);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn the_attribution_changelog_moves_off_the_snapshot_topic_without_loss() {
    // A build before the changelog topic kept `buf/` and `held/` on the snapshot topic. The
    // first phase runs this build; between the phases its changelog values are copied, as they
    // are, onto the snapshot topic and the configuration names a new, empty changelog topic:
    // the layout an upgrade finds. The second phase must restore from it, move it in its first
    // transaction, and end byte-identical to the offline replay.
    let b = bootstrap();
    let s = Setup::new("moved", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 23, impressions: 4000, ..ShopSpec::default() });
    let (first, second) = halves(&shop);
    let read = |topic: &str| s.read_state(topic);
    let changelog_keys = |stores: &BTreeMap<i32, banditflow::core::blob::LatestByKey>| -> usize {
        stores.values().map(|st| st.values.keys().filter(|k| checkpoint::is_changelog_key(k)).count()).sum()
    };
    let moved = unique("moved-changelog");
    let mut copied = 0;
    let log = run_in_two_phases(&s, &first, &second, || {
        assert_eq!(
            changelog_keys(&read(&s.snapshots)),
            0,
            "this build keeps the snapshot topic free of them"
        );
        let old = read(&s.changelog());
        copied = changelog_keys(&old);
        assert!(copied > 0, "the first phase retained impressions");
        let producer: rdkafka::producer::BaseProducer =
            banditflow::kafka::bootstrap_config(&b).create().expect("producer");
        for (p, st) in &old {
            for (k, v) in &st.values {
                producer
                    .send(rdkafka::producer::BaseRecord::to(&s.snapshots).partition(*p).key(k).payload(v))
                    .expect("queued");
            }
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).expect("flushed");
        edit_config(&s, "[kafka]\n", &format!("[kafka]\nchangelog_topic = \"{moved}\"\n"));
    });
    assert!(log.contains("moving the attribution changelog"), "log:\n{log}");
    s.assert_matches_offline(&shop.records);
    s.assert_totals_match_truth(&shop.events);
    assert_eq!(
        changelog_keys(&read(&s.snapshots)),
        0,
        "the snapshot topic holds no changelog value any more"
    );
    assert!(changelog_keys(&read(&moved)) > 0, "the changelog topic holds it");
}

/// Rewrites the config file with `from` replaced by `to` (which must occur).
pub(crate) fn edit_config(s: &Setup, from: &str, to: &str) {
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    assert!(text.contains(from), "config has no {from:?}");
    std::fs::write(&s.config_path, text.replacen(from, to, 1)).expect("config");
}

#[test]
fn a_read_time_config_change_applies_at_once_and_keeps_every_statistic() {
    let b = bootstrap();
    let s = Setup::new("cfgprior", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 22, impressions: 3000, ..ShopSpec::default() });
    let (first, second) = halves(&shop);
    let log = run_in_two_phases(&s, &first, &second, || {
        edit_config(&s, "prior = { alpha = 1.0, beta = 9.0 }", "prior = { alpha = 2.0, beta = 30.0 }");
        edit_config(&s, "examination = [1.0, 0.77,", "examination = [1.0, 0.8,");
    });
    assert!(log.contains("read-time parameters"), "log:\n{log}");
    // Priors are read-time, so the statistics equal a replay of everything under the new
    // config except `home`'s exposures, half of which used the old examination weights.
    let want = s.offline_shards(&shop.records);
    let got = s.committed_shards();
    for model in ["search", "recs"] {
        for p in 0..2 {
            assert!(got[&(model.to_string(), p)] == want[&(model.to_string(), p)], "{model}/{p} differs");
        }
    }
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn a_half_life_change_keeps_counters_and_rescales_decayed_sums() {
    let b = bootstrap();
    let s = Setup::new("cfghalflife", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 23, impressions: 3000, ..ShopSpec::default() });
    let (first, second) = halves(&shop);
    let log = run_in_two_phases(&s, &first, &second, || {
        edit_config(&s, "half_life = \"1d\"", "half_life = \"6h\"")
    });
    assert!(log.contains("half-life changed"), "log:\n{log}");
    let got = s.committed_shards();
    let recs = snapshot::decode(&got[&("recs".to_string(), 0)]).expect("decodes");
    assert_eq!(recs.spec.half_life_ms, 6 * 3_600_000, "the snapshot carries the new half-life");
    // Integer statistics do not decay: all of them survive, exactly as produced.
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn a_meaning_changing_config_change_starts_that_model_afresh() {
    let b = bootstrap();
    let s = Setup::new("cfgreset", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 24, impressions: 3000, ..ShopSpec::default() });
    let (first, second) = halves(&shop);
    let log = run_in_two_phases(&s, &first, &second, || {
        edit_config(&s, "linear = { dim = 16,", "linear = { dim = 8,")
    });
    assert!(log.contains("starts afresh") && log.contains("linear.dim"), "log:\n{log}");
    // `search` holds only what its impressions of the second phase brought; the other models
    // everything.
    let config = s.config();
    let impression_ids = |records: &[Record]| -> std::collections::BTreeSet<String> {
        records
            .iter()
            .filter_map(|r| {
                match banditflow::core::event::decode(
                    banditflow::core::event::TopicRole::Combined,
                    banditflow::core::event::Encoding::Protobuf,
                    &r.payload,
                ) {
                    Ok(banditflow::core::event::Event::Impression(i)) => Some(i.impression_id),
                    _ => None,
                }
            })
            .collect()
    };
    let (before, after) = (impression_ids(&first), impression_ids(&second));
    // Impressions logged after the reset, with none of their feedback: the reset model counts
    // exactly these impressions.
    let fresh: Vec<banditflow::core::event::Event> = shop
        .events
        .iter()
        .filter(|e| match e {
            banditflow::core::event::Event::Impression(i) => {
                after.contains(&i.impression_id) && !before.contains(&i.impression_id)
            }
            banditflow::core::event::Event::Feedback(_) => false,
        })
        .cloned()
        .collect();
    let truth_fresh = crate::support::truth(&config, &fresh);
    let shards =
        store::read_models(banditflow::kafka::bootstrap_config(&b), &s.snapshots, Duration::from_secs(60))
            .expect("readable");
    let search: Vec<_> = shards.iter().filter(|((m, _), _)| m == "search").map(|(_, v)| v.clone()).collect();
    let merged = snapshot::merge(&search).expect("merges");
    let impressions: u64 = merged.shard.variants.values().map(|v| v.impressions).sum();
    let want: u64 = truth_fresh.get("search").map_or(0, |t| t.variants.values().map(|v| v.0).sum());
    assert_eq!(impressions, want, "search counts exactly the impressions logged after the reset");
    assert_eq!(merged.spec.algorithm, config.core.model("search").expect("search").algorithm);
    // The other models kept everything.
    let all = crate::support::truth(&config, &shop.events);
    for model in ["home", "recs"] {
        let mine: Vec<_> = shards.iter().filter(|((m, _), _)| m == model).map(|(_, v)| v.clone()).collect();
        let merged = snapshot::merge(&mine).expect("merges");
        assert!(crate::support::Totals::of(&merged.shard) == all[model], "{model} lost statistics");
    }
}

#[test]
fn removing_and_adding_models_drops_and_starts_them_without_a_restart_loop() {
    let b = bootstrap();
    let s = Setup::new("cfgmodels", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 25, impressions: 3000, ..ShopSpec::default() });
    let (first, second) = halves(&shop);
    let log = run_in_two_phases(&s, &first, &second, || {
        // `recs` (the last model of the file) removed; a new model whose id has a key separator.
        let text = std::fs::read_to_string(&s.config_path).expect("config");
        let cut = text.find("\n[[models]]\nid = \"recs\"").expect("recs configured");
        let text = format!("{}\n[[models]]\nid = \"fresh#1\"\nhalf_life = \"1d\"\n", &text[..cut]);
        std::fs::write(&s.config_path, text).expect("config");
    });
    assert!(log.contains("no longer configured") && log.contains("model added"), "log:\n{log}");
    let shards = s.committed_shards();
    let models: std::collections::BTreeSet<&str> = shards.keys().map(|(m, _)| m.as_str()).collect();
    assert_eq!(models, ["fresh#1", "home", "search"].into_iter().collect(), "recs is deleted from the topic");
    // The new model never saw an impression of its own id: it is empty but published.
    let fresh = snapshot::decode(&shards[&("fresh#1".to_string(), 0)]).expect("decodes");
    assert_eq!(fresh.shard.arm_count(), 0);
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn a_config_change_reaches_partitions_that_receive_no_records() {
    let b = bootstrap();
    let s = Setup::new("cfgquiet", &b, 2);
    let shop = s.shop_with(ShopSpec { seed: 26, impressions: 1500, ..ShopSpec::default() });
    s.produce(shop.records.clone());
    let mut p = s.start("0");
    s.wait_caught_up(Duration::from_secs(120));
    let (status, _) = p.terminate();
    assert!(status.success(), "log:\n{}", p.log_text());
    // A read-time change to `home`, `recs` removed; then no input at all.
    edit_config(&s, "prior = { alpha = 1.0, beta = 9.0 }", "prior = { alpha = 2.0, beta = 30.0 }");
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let cut = text.find("\n[[models]]\nid = \"recs\"").expect("recs configured");
    std::fs::write(&s.config_path, &text[..cut]).expect("config");
    let _p = s.start("0");
    let mut seen = BTreeMap::new();
    wait_until("every partition's snapshots to carry the new configuration", Duration::from_secs(60), || {
        seen = s.committed_shards();
        let models: std::collections::BTreeSet<(&str, i32)> =
            seen.keys().map(|(m, p)| (m.as_str(), *p)).collect();
        let want: std::collections::BTreeSet<(&str, i32)> =
            [("home", 0), ("home", 1), ("search", 0), ("search", 1)].into_iter().collect();
        models == want
            && (0..2).all(|p| {
                snapshot::decode(&seen[&("home".to_string(), p)]).is_ok_and(|d| d.spec.prior.beta == 30.0)
            })
    });
    // Serving nodes can merge the model again: every shard has the same parameters.
    let home: Vec<_> =
        (0..2).map(|p| snapshot::decode(&seen[&("home".to_string(), p)]).expect("decodes")).collect();
    snapshot::merge(&home).expect("the shards of home merge");
    s.assert_totals_match_truth(&shop.events);
}

/// Records being produced by [`Setup::traffic`].
pub(crate) struct Traffic {
    released: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    total: usize,
    handle: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl Traffic {
    /// Records not yet handed to the producer (0 once the traffic has run out).
    pub(crate) fn remaining(&self) -> usize {
        if self.handle.is_finished() {
            return 0;
        }
        self.total.saturating_sub(self.sent.load(Ordering::Relaxed) + 1)
    }

    /// Sends what is left at once and waits until every record is acknowledged.
    pub(crate) fn finish(self) -> anyhow::Result<u64> {
        self.released.store(true, Ordering::Relaxed);
        self.handle.join().map_err(|_| anyhow::anyhow!("producer thread panicked"))?
    }
}
