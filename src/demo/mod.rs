//! `banditflow demo`: the whole loop in one process — Kafka (librdkafka's in-process mock
//! cluster, or a real broker), the processor, a serving node, and a simulated shop that asks the
//! node for rankings, shows them to shoppers and sends their feedback — with live progress and a
//! results table judged against the simulator's truth.
//!
//! The shop calls the node in process (`serving::node::Node::rank`, the code behind
//! `POST /v1/rank`, impression logging included); feedback is written with the node's producer
//! when it falls due. Freshness is measured per feedback record: from the moment it was written
//! to the moment the subscriber published a merged model whose input offsets cover it.

pub mod report;
pub use report::{table, write_report};
pub mod shop;

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::core::event::{Event, Feedback};
use crate::kafka::now_ms;
use crate::serving::node::{Node, RankRequest};
use crate::serving::subscriber::{Subscriber, Update};
use shop::{Priors, Shop, ShopSpec};

/// The priors script, embedded so the demo runs from any directory.
const PRIORS_SCRIPT: &str = include_str!("../../scripts/zozotown_priors.py");
const MODEL: &str = "shop";
/// Width of one point of the learning curves.
pub const BUCKET_MS: i64 = 5_000;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    /// Shop visits (rank requests) per second.
    pub rate: f64,
    /// A real broker instead of the in-process mock cluster.
    pub bootstrap: Option<String>,
    pub report: Option<PathBuf>,
    pub seed: u64,
    pub ctr_scale: f64,
    pub holdout_share: f64,
    pub shift_at: Option<Duration>,
    /// A priors file (default: fetched once into the cache by `scripts/zozotown_priors.py`).
    pub priors: Option<PathBuf>,
    /// Share of feedback records planted with a microsecond timestamp (dead-lettered).
    pub poison_share: f64,
    pub partitions: i32,
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            duration: Duration::from_secs(75),
            rate: 1_000.0,
            bootstrap: None,
            report: None,
            seed: 42,
            ctr_scale: 20.0,
            holdout_share: 0.05,
            shift_at: None,
            priors: None,
            poison_share: 0.001,
            partitions: 4,
            progress: true,
        }
    }
}

/// Per-variant tallies: impressions, clicks (and their squares, for the variance), and the
/// expected clicks of the served slates under the simulator's truth.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub impressions: u64,
    pub clicks: u64,
    pub clicks_sq: u64,
    pub expected: f64,
    pub oracle: f64,
    pub random: f64,
}

impl Tally {
    fn add(&mut self, clicks: u32, expected: f64, oracle: f64, random: f64) {
        self.impressions += 1;
        self.clicks += u64::from(clicks);
        self.clicks_sq += u64::from(clicks) * u64::from(clicks);
        self.expected += expected;
        self.oracle += oracle;
        self.random += random;
    }

    fn merge(&mut self, o: &Tally) {
        self.impressions += o.impressions;
        self.clicks += o.clicks;
        self.clicks_sq += o.clicks_sq;
        self.expected += o.expected;
        self.oracle += o.oracle;
        self.random += o.random;
    }

    pub fn ctr(&self) -> f64 {
        self.clicks as f64 / self.impressions.max(1) as f64
    }

    pub fn per(&self, v: f64) -> f64 {
        v / self.impressions.max(1) as f64
    }

    fn variance(&self) -> f64 {
        let n = self.impressions as f64;
        if n < 2.0 {
            return 0.0;
        }
        let mean = self.clicks as f64 / n;
        ((self.clicks_sq as f64 - n * mean * mean) / (n - 1.0)).max(0.0)
    }
}

/// Difference of mean clicks per impression, treatment − holdout, with a 95 % Welch interval.
#[derive(Debug, Clone, Copy)]
pub struct Lift {
    pub diff: f64,
    pub low: f64,
    pub high: f64,
    pub relative: f64,
}

pub fn lift(t: &Tally, h: &Tally) -> Option<Lift> {
    if t.impressions < 2 || h.impressions < 2 {
        return None;
    }
    let diff = t.ctr() - h.ctr();
    let se = (t.variance() / t.impressions as f64 + h.variance() / h.impressions as f64).sqrt();
    Some(Lift { diff, low: diff - 1.96 * se, high: diff + 1.96 * se, relative: diff / h.ctr().max(1e-12) })
}

/// One point of the learning curves.
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    pub treatment: Tally,
    pub holdout: Tally,
    /// Freshness samples (ms) of feedback that became visible in this bucket.
    pub freshness_ms: Vec<i64>,
}

#[derive(Debug, Default)]
struct Stats {
    treatment: Tally,
    holdout: Tally,
    buckets: Vec<Bucket>,
    impressions_written: u64,
    feedback_written: u64,
    poison_written: u64,
    rank_errors: BTreeMap<String, u64>,
    write_errors: u64,
}

impl Stats {
    fn bucket(&mut self, elapsed_ms: i64) -> &mut Bucket {
        let i = usize::try_from(elapsed_ms.max(0) / BUCKET_MS).unwrap_or(0);
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        &mut self.buckets[i]
    }
}

/// Feedback records written but not yet covered by a visible model: (topic, partition) →
/// offset → wall-clock ms of writing.
#[derive(Debug, Default)]
struct Freshness {
    pending: HashMap<(String, i32), BTreeMap<i64, i64>>,
    samples: Vec<i64>,
}

pub struct Outcome {
    pub treatment: Tally,
    pub holdout: Tally,
    pub lift: Option<Lift>,
    pub lift_last_third: Option<Lift>,
    pub buckets: Vec<Bucket>,
    pub freshness_ms: Vec<i64>,
    pub produced: u64,
    pub processed: u64,
    pub dead_lettered: u64,
    pub poison_planted: u64,
    pub rank_errors: BTreeMap<String, u64>,
    pub write_errors: u64,
    pub mock: bool,
    pub elapsed: Duration,
    pub model_version: u64,
    pub priors_source: String,
}

impl Outcome {
    /// The learning variant beats the holdout: the 95 % interval of the lift excludes zero.
    pub fn significant(&self) -> bool {
        self.lift.is_some_and(|l| l.low > 0.0)
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("banditflow")
}

/// The priors file, fetched from PyPI (obp 0.5.7) by the embedded script on first use.
pub fn fetch_priors() -> anyhow::Result<PathBuf> {
    let dir = cache_dir();
    let out = dir.join("zozotown-priors.json");
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("zozotown_priors.py");
    std::fs::write(&script, PRIORS_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    eprintln!("fetching ZOZOTOWN's item priors (obp 0.5.7 from PyPI) into {} …", dir.display());
    let status = std::process::Command::new("python3")
        .arg(&script)
        .arg("--cache")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running python3 (needed once, to fetch the shop's priors)")?;
    if !status.success() || !out.exists() {
        bail!("fetching the priors failed ({status}); run `python3 scripts/zozotown_priors.py` to see why, or pass --priors FILE");
    }
    Ok(out)
}

struct Topics {
    impressions: String,
    feedback: String,
    snapshots: String,
    dead_letters: String,
}

fn demo_config(
    bootstrap: &str,
    t: &Topics,
    group: &str,
    holdout: f64,
    create: bool,
) -> anyhow::Result<Config> {
    let overlay = format!(
        r#"
[input]
topics = [
  {{ name = "{imp}", role = "impressions", encoding = "protobuf" }},
  {{ name = "{fb}", role = "feedback", encoding = "protobuf" }},
]
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
snapshot_topic = "{snap}"
dead_letter_topic = "{dlq}"
create_topics = {create}
metrics_address = ""
snapshot_interval = "500ms"
[serving]
holdout_share = {holdout}
cold_start = true
[[models]]
id = "{MODEL}"
algorithm = "beta"
position_model = "pbm"
examination = [1.0, 0.85, 0.72, 0.62, 0.54, 0.47, 0.42, 0.38, 0.34, 0.31]
half_life = "1d"
prior = {{ alpha = 1.0, beta = 20.0 }}
"#,
        imp = t.impressions,
        fb = t.feedback,
        snap = t.snapshots,
        dlq = t.dead_letters,
    );
    Ok(Config::from_layers(Some(("demo configuration", &overlay)), Vec::new())?)
}

/// Runs the demo; the caller prints [`Outcome`] (see [`table`]) and decides the exit code.
pub fn run(opts: &DemoOptions) -> anyhow::Result<Outcome> {
    let priors_path = match &opts.priors {
        Some(p) => p.clone(),
        None => fetch_priors()?,
    };
    let priors = Priors::load(&priors_path)?;
    let spec = ShopSpec {
        seed: opts.seed,
        ctr_scale: opts.ctr_scale,
        shift_at_ms: opts.shift_at.map(|d| d.as_millis() as i64),
        ..ShopSpec::default()
    };
    let shop = Shop::new(&priors, spec)?;

    // Kafka: the in-process mock cluster (kept on this thread: it is not Send) or a broker.
    let run_id = now_ms();
    let (mock, bootstrap, topics) = match &opts.bootstrap {
        None => {
            let mock =
                rdkafka::mocking::MockCluster::new(1).context("starting the in-process mock cluster")?;
            let topics = Topics {
                impressions: "impressions".into(),
                feedback: "feedback".into(),
                snapshots: "banditflow-snapshots".into(),
                dead_letters: "banditflow-dead-letters".into(),
            };
            // The changelog topic under its default name for the snapshot topic.
            let changelog = format!("{}-changelog", topics.snapshots);
            for t in
                [&topics.impressions, &topics.feedback, &topics.snapshots, &changelog, &topics.dead_letters]
            {
                mock.create_topic(t, opts.partitions, 1)
                    .with_context(|| format!("creating `{t}` on the mock cluster"))?;
            }
            let b = mock.bootstrap_servers();
            (Some(mock), b, topics)
        }
        Some(b) => {
            let p = format!("demo-{run_id}");
            let topics = Topics {
                impressions: format!("{p}-impressions"),
                feedback: format!("{p}-feedback"),
                snapshots: format!("{p}-snapshots"),
                dead_letters: format!("{p}-dead-letters"),
            };
            crate::kafka::admin::create_topics(
                b,
                &[
                    (&topics.impressions, opts.partitions, false),
                    (&topics.feedback, opts.partitions, false),
                    (&topics.snapshots, opts.partitions, true),
                    (&format!("{}-changelog", topics.snapshots), opts.partitions, true),
                    (&topics.dead_letters, opts.partitions, false),
                ],
            )?;
            (None, b.clone(), topics)
        }
    };
    let config = Arc::new(demo_config(
        &bootstrap,
        &topics,
        &format!("banditflow-demo-{run_id}"),
        opts.holdout_share,
        mock.is_none(),
    )?);

    let shutdown = Arc::new(AtomicBool::new(false));
    let processor = {
        let (config, shutdown, prepared) = (Arc::clone(&config), Arc::clone(&shutdown), mock.is_some());
        std::thread::Builder::new().name("banditflow-processor".into()).spawn(move || {
            if prepared {
                crate::kafka::driver::run_prepared(
                    config,
                    shutdown,
                    crate::kafka::probes::Health::new(Duration::MAX),
                )
            } else {
                crate::kafka::driver::run(config, shutdown, crate::kafka::probes::Health::new(Duration::MAX))
            }
        })?
    };
    let (tx, rx) = std::sync::mpsc::channel::<Update>();
    let subscriber =
        Subscriber::start(crate::kafka::client_config(&config.kafka), &topics.snapshots, Some(tx))?;
    let node = Arc::new(Node::new(
        Arc::clone(&config),
        subscriber.catalog(),
        Some(crate::serving::producer(&config)?),
    ));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let freshness = Arc::new(Mutex::new(Freshness::default()));
    let start_ms = now_ms();
    let watcher = {
        let (freshness, stats) = (Arc::clone(&freshness), Arc::clone(&stats));
        std::thread::Builder::new().name("banditflow-freshness".into()).spawn(move || {
            for u in rx {
                cover(&freshness, &stats, &u, start_ms);
            }
        })?
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("banditflow-demo")
        .enable_all()
        .build()?;
    let bar = if opts.progress { ProgressBar::new(opts.duration.as_secs()) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {bar:24.cyan/blue} {pos:>3}/{len}s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if mock.is_some() {
        bar.println("Kafka: librdkafka's in-process mock cluster. It has no real transactions (commits always succeed, aborted records stay visible); `--bootstrap host:port` runs the same loop on a real broker.");
    } else {
        bar.println(format!(
            "Kafka: {bootstrap} (topics {}-…)",
            topics.impressions.trim_end_matches("-impressions")
        ));
    }
    let began = Instant::now();
    runtime.block_on(simulate(
        opts,
        shop,
        Arc::clone(&node),
        Arc::clone(&stats),
        Arc::clone(&freshness),
        start_ms,
        &bar,
    ));

    // Let the processor and the subscriber catch up with everything written (bounded): every
    // feedback record visible, and the model covering every record on the input topics.
    let written =
        stats.lock().map(|s| s.impressions_written + s.feedback_written + s.poison_written).unwrap_or(0);
    let catch_up = Instant::now() + Duration::from_secs(20);
    while Instant::now() < catch_up {
        let visible = freshness.lock().map(|f| f.pending.values().all(BTreeMap::is_empty)).unwrap_or(true);
        let version = subscriber.catalog().load().models.get(MODEL).map_or(0, |m| m.version);
        if visible && version >= written {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let elapsed = began.elapsed();
    let model_version = subscriber.catalog().load().models.get(MODEL).map_or(0, |m| m.version);
    shutdown.store(true, Ordering::SeqCst);
    match processor.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "the processor stopped with an error"),
        Err(_) => bail!("the processor thread panicked"),
    }
    drop(node);
    subscriber.stop();
    let _ = watcher.join();
    let dead_lettered = count_records(&config, &topics.dead_letters).unwrap_or(0);
    drop(mock);

    let s = std::mem::take(&mut *stats.lock().map_err(|_| anyhow::anyhow!("stats lock poisoned"))?);
    let f = std::mem::take(&mut *freshness.lock().map_err(|_| anyhow::anyhow!("freshness lock poisoned"))?);
    let third = s.buckets.len() * 2 / 3;
    let (mut t3, mut h3) = (Tally::default(), Tally::default());
    for b in &s.buckets[third.min(s.buckets.len())..] {
        t3.merge(&b.treatment);
        h3.merge(&b.holdout);
    }
    Ok(Outcome {
        lift: lift(&s.treatment, &s.holdout),
        lift_last_third: lift(&t3, &h3),
        treatment: s.treatment,
        holdout: s.holdout,
        buckets: s.buckets,
        freshness_ms: f.samples,
        produced: s.impressions_written + s.feedback_written + s.poison_written,
        processed: model_version,
        dead_lettered,
        poison_planted: s.poison_written,
        rank_errors: s.rank_errors,
        write_errors: s.write_errors,
        mock: opts.bootstrap.is_none(),
        elapsed,
        model_version,
        priors_source: format!(
            "{} (sha256 {})",
            priors.source,
            priors.sha256.chars().take(12).collect::<String>()
        ),
    })
}

/// Marks every written feedback record the update covers as visible.
fn cover(freshness: &Mutex<Freshness>, stats: &Mutex<Stats>, u: &Update, start_ms: i64) {
    let Ok(mut f) = freshness.lock() else { return };
    let mut seen = Vec::new();
    for (topic, partition, next) in &u.input_offsets {
        if let Some(p) = f.pending.get_mut(&(topic.clone(), *partition)) {
            let rest = p.split_off(next);
            for (_, written) in std::mem::replace(p, rest) {
                seen.push(u.visible_at_ms - written);
            }
        }
    }
    f.samples.extend(&seen);
    drop(f);
    if let Ok(mut s) = stats.lock() {
        s.bucket(u.visible_at_ms - start_ms).freshness_ms.extend(seen);
    }
}

/// Committed records on `topic` (read to its end: transaction markers take offsets too, so
/// watermarks would overcount on a real broker).
fn count_records(config: &Config, topic: &str) -> anyhow::Result<u64> {
    let mut out = Vec::new();
    crate::kafka::transfer::record(
        crate::kafka::client_config(&config.kafka),
        &[topic.to_string()],
        crate::kafka::transfer::StartAt::Beginning,
        crate::kafka::transfer::StopAt::End,
        false,
        &mut out,
    )?;
    Ok(out.iter().filter(|b| **b == b'\n').count() as u64)
}

/// Feedback due at `due_ms`, ordered soonest first in the heap.
struct Due(i64, Feedback);

impl PartialEq for Due {
    fn eq(&self, o: &Due) -> bool {
        self.0 == o.0
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Due) -> std::cmp::Ordering {
        o.0.cmp(&self.0)
    }
}

async fn simulate(
    opts: &DemoOptions,
    shop: Shop,
    node: Arc<Node>,
    stats: Arc<Mutex<Stats>>,
    freshness: Arc<Mutex<Freshness>>,
    start_ms: i64,
    bar: &ProgressBar,
) {
    let candidates: Arc<Vec<(String, Vec<String>)>> =
        Arc::new(shop.campaigns.iter().map(|c| (c.segment.clone(), c.items.clone())).collect());
    let shop = Arc::new(Mutex::new(shop));
    let queue: Arc<Mutex<BinaryHeap<Due>>> = Arc::new(Mutex::new(BinaryHeap::new()));
    let end_ms = start_ms + opts.duration.as_millis() as i64;
    let interval_ms = 1_000.0 / opts.rate.max(1.0);
    let next_slot = Arc::new(Mutex::new(0u64));
    let workers = 32;
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (shop, node, stats, queue, candidates, next_slot) = (
            Arc::clone(&shop),
            Arc::clone(&node),
            Arc::clone(&stats),
            Arc::clone(&queue),
            Arc::clone(&candidates),
            Arc::clone(&next_slot),
        );
        handles.push(tokio::spawn(async move {
            loop {
                let slot = {
                    let Ok(mut n) = next_slot.lock() else { return };
                    *n += 1;
                    *n
                };
                let at = start_ms + (slot as f64 * interval_ms) as i64;
                if at >= end_ms {
                    return;
                }
                let wait = at - now_ms();
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
                let Ok((campaign, user)) = shop.lock().map(|mut s| s.next_visit()) else { return };
                let (segment, items) = &candidates[campaign];
                let req = RankRequest {
                    model: MODEL.into(),
                    candidates: items.clone(),
                    slate_size: Some(10),
                    segment: Some(segment.clone()),
                    features: None,
                    user_key: Some(user),
                };
                let t = now_ms();
                let resp = match node.rank(&req, t).await {
                    Ok(r) => r,
                    Err(p) => {
                        if let Ok(mut s) = stats.lock() {
                            *s.rank_errors.entry(p.code().to_string()).or_default() += 1;
                        }
                        continue;
                    }
                };
                let slate: Vec<(String, u32)> =
                    resp.slate.iter().map(|p| (p.item_id.clone(), p.position)).collect();
                let Ok(reaction) = shop.lock().map(|mut s| s.react(campaign, &slate, t - start_ms)) else {
                    return;
                };
                if let Ok(mut s) = stats.lock() {
                    s.impressions_written += 1;
                    let holdout = resp.variant == "holdout";
                    let (r, c) = (&reaction, reaction.clicks);
                    // Bucketed by the visit's slot, so the last window holds no stragglers.
                    let b = s.bucket(at - start_ms);
                    let tally = if holdout { &mut b.holdout } else { &mut b.treatment };
                    tally.add(c, r.expected_clicks, r.oracle_clicks, r.random_clicks);
                    let total = if holdout { &mut s.holdout } else { &mut s.treatment };
                    total.add(c, r.expected_clicks, r.oracle_clicks, r.random_clicks);
                }
                if let Ok(mut q) = queue.lock() {
                    for f in reaction.feedback {
                        let due = t + f.delay_ms;
                        q.push(Due(
                            due,
                            Feedback {
                                impression_id: resp.impression_id.clone(),
                                item_id: f.item_id,
                                position: f.position,
                                kind: f.kind,
                                value: f.value,
                                time_ms: due,
                            },
                        ));
                    }
                }
            }
        }));
    }

    // Feedback falls due: write it (and, now and then, a planted bad record).
    let sender = {
        let (node, stats, queue, freshness) =
            (Arc::clone(&node), Arc::clone(&stats), Arc::clone(&queue), Arc::clone(&freshness));
        let poison_every = if opts.poison_share > 0.0 { (1.0 / opts.poison_share).round() as u64 } else { 0 };
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut inflight = tokio::task::JoinSet::new();
            loop {
                let now = now_ms();
                let due: Vec<Feedback> = match queue.lock() {
                    Ok(mut q) => {
                        let mut v = Vec::new();
                        while q.peek().is_some_and(|d| d.0 <= now) {
                            if let Some(d) = q.pop() {
                                v.push(d.1);
                            }
                        }
                        v
                    }
                    Err(_) => return,
                };
                if now >= end_ms {
                    break;
                }
                for mut f in due {
                    sent += 1;
                    let poison = poison_every > 0 && sent % poison_every == 0;
                    if poison {
                        // A client sending microseconds: far in the future of its record time.
                        f.time_ms = f.time_ms.saturating_mul(1000);
                    }
                    let (node, stats, freshness) =
                        (Arc::clone(&node), Arc::clone(&stats), Arc::clone(&freshness));
                    inflight.spawn(async move {
                        let written = now_ms();
                        let r = node.write_event(&Event::Feedback(f)).await;
                        let Ok(mut s) = stats.lock() else { return };
                        match r {
                            Ok((partition, offset)) if !poison => {
                                s.feedback_written += 1;
                                drop(s);
                                if let Ok(mut fr) = freshness.lock() {
                                    let topic = node.feedback_topic().to_string();
                                    fr.pending.entry((topic, partition)).or_default().insert(offset, written);
                                }
                            }
                            Ok(_) => s.poison_written += 1,
                            Err(_) => s.write_errors += 1,
                        }
                    });
                }
                while inflight.try_join_next().is_some() {}
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            while inflight.join_next().await.is_some() {}
        })
    };

    // Progress, every quarter second.
    let mut last = (Instant::now(), 0u64);
    loop {
        let now = now_ms();
        if now >= end_ms {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(s) = stats.lock() else { break };
        let events = s.impressions_written + s.feedback_written;
        let rate = (events - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        last = (Instant::now(), events);
        let fresh = recent_p50(&s.buckets);
        let version = node.catalog().load().models.get(MODEL).map_or(0, |m| m.version);
        bar.set_position(((now - start_ms) / 1000).max(0) as u64);
        bar.set_message(format!(
            "{:>6.0} ev/s  CTR treatment {:.3} holdout {:.3}  model v{}  fresh p50 {}",
            rate,
            s.treatment.ctr(),
            s.holdout.ctr(),
            version,
            fresh.map_or("–".to_string(), |f| format!("{:.2} s", f as f64 / 1000.0)),
        ));
    }
    for h in handles {
        let _ = h.await;
    }
    let _ = sender.await;
}

fn recent_p50(buckets: &[Bucket]) -> Option<i64> {
    let b = buckets.iter().rev().find(|b| !b.freshness_ms.is_empty())?;
    let mut v = b.freshness_ms.clone();
    v.sort_unstable();
    Some(v[v.len() / 2])
}

pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}
