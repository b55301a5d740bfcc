//! The `banditflow` command line: a thin edge over the library.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use banditflow::config::Config;
use banditflow::core::event::Encoding;
use banditflow::core::policy::{self, PolicySpec, RankRequest, Strategy};
use banditflow::core::snapshot;
use banditflow::generate::{self, ShopSpec};
use banditflow::kafka::transfer::{self, StartAt, StopAt};
use banditflow::recording;
use banditflow::replay;
use banditflow::telemetry::Component;

/// mimalloc instead of the system allocator: the partition tasks allocate and free decoded
/// events on worker threads while the consumer thread allocates record copies, a pattern on
/// which glibc's arenas spent about a quarter of the pipeline's CPU (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "banditflow",
    version,
    about = "Learns position-aware bandit rankings from impressions and feedback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: human-readable lines, or one JSON object per line (for log pipelines).
    /// Levels come from RUST_LOG (e.g. `info,banditflow::kafka=debug`).
    #[arg(long, global = true, value_enum, env = "BANDITFLOW_LOG_FORMAT", default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs as a member of the Kafka consumer group: learns from the assigned input partitions
    /// and publishes their snapshots exactly once. Stops cleanly on SIGTERM/SIGINT.
    Run {
        /// Config file (TOML); environment variables BANDITFLOW__… override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Merges every partition's shard of every model from the snapshot topic and writes the
    /// merged models to the merged-model topic (`kafka.merged_topic`), only the arms that
    /// changed, exactly once; serving nodes with `serving.read_merged` read that instead of
    /// every shard. One per consumer group. Stops cleanly on SIGTERM/SIGINT.
    Aggregate {
        /// Config file (TOML): the processors' (same topics, group and models).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Merge only partition group K (partitions 16K … 16K + 15 of the snapshot topic) into
        /// the groups topic (`kafka.groups_topic`): one such aggregator per group, when one
        /// process cannot hold every partition's shard.
        #[arg(long, value_name = "K", conflicts_with = "from_groups", allow_negative_numbers = true)]
        group: Option<i64>,
        /// Merge the group merges of the groups topic (written by `--group K` aggregators) into
        /// the merged-model topic.
        #[arg(long)]
        from_groups: bool,
    },
    /// The whole loop in one command: an embedded Kafka (librdkafka's in-process mock cluster),
    /// the processor, a serving node and a shop simulated from ZOZOTOWN's item priors. Shows live
    /// progress, prints a results table, and exits non-zero unless the learning variant beats
    /// the holdout significantly.
    Demo {
        /// How long the shop sends traffic.
        #[arg(long, default_value = "75s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Shop visits (rank requests) per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Run on this Kafka broker instead of the in-process mock cluster (topics demo-<time>-…).
        #[arg(long)]
        bootstrap: Option<String>,
        /// Also write results.txt, curves.csv and learning-curve / freshness charts (PNG) here.
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Multiplies ZOZOTOWN's click rates (≈ 0.35 % on average) so a short demo sees enough clicks.
        #[arg(long, default_value_t = 20.0)]
        ctr_scale: f64,
        /// Share of shoppers (by user-key hash) in the holdout.
        #[arg(long, default_value_t = 0.05)]
        holdout_share: f64,
        /// Permute every catalogue's appeal at this time into the run (a trend shift).
        #[arg(long, value_parser = parse_duration)]
        shift_at: Option<std::time::Duration>,
        /// Priors file (default: fetched once from PyPI's obp 0.5.7 into ~/.cache/banditflow).
        #[arg(long)]
        priors: Option<PathBuf>,
        /// Share of feedback records planted with a microsecond timestamp, to show dead-lettering.
        #[arg(long, default_value_t = 0.001)]
        poison_share: f64,
        /// Partitions of each demo topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// No progress bar (for logs and tests).
        #[arg(long)]
        quiet: bool,
    },
    /// A ranking node: follows the snapshot topic, ranks with the newest merged model and logs
    /// impressions and feedback to the input topics (HTTP API: api/openapi.json). Stops on
    /// SIGTERM/SIGINT.
    Serve {
        /// Config file (TOML), the same file the processor reads; BANDITFLOW__… override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides serving.listen).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Replays a recording offline through the same core as the Kafka path; writes one snapshot
    /// per model and input partition, the merged model, dead letters and a summary. With
    /// --to-kafka it produces the recording to its topics instead.
    Replay {
        /// Recording (JSON lines, see README).
        #[arg(long)]
        input: PathBuf,
        /// Config file (TOML); environment variables BANDITFLOW__… override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory (offline replay).
        #[arg(long, required_unless_present = "to_kafka")]
        out: Option<PathBuf>,
        /// Items to list per model in the summary.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Produce the records to Kafka (same topics, partitions, keys, headers, timestamps).
        #[arg(long, requires = "bootstrap")]
        to_kafka: bool,
        #[arg(long)]
        bootstrap: Option<String>,
        /// librdkafka properties as name=value (TLS, SASL, …).
        #[arg(long = "property", value_parser = parse_property)]
        properties: Vec<(String, String)>,
    },
    /// Off-policy evaluation of the policy a config would run, on a recording with logged
    /// propensities: IPW, SNIPW, direct method and doubly robust estimates of its reward per
    /// placement, each with a 95 % interval, and the effective sample size.
    Evaluate {
        /// Recording (JSON lines, see README).
        #[arg(long)]
        input: PathBuf,
        /// Config file (TOML) whose [policy] and models are evaluated; BANDITFLOW__… override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON (full precision) instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write every round (catalogue-sized probability and reward vectors) as JSON
        /// lines to this file.
        #[arg(long)]
        rounds: Option<PathBuf>,
        /// Monte Carlo rankings per impression for Thompson sampling's placement probabilities.
        #[arg(long, default_value_t = banditflow::evaluate::DEFAULT_SAMPLES)]
        samples: u32,
        /// Largest share of impressions without a valid propensity that is left out (and
        /// named) rather than refusing the evaluation.
        #[arg(long, default_value_t = 0.01)]
        max_refused_share: f64,
    },
    /// Creates topics (for trying banditflow out; production topics are usually managed elsewhere).
    CreateTopics {
        #[arg(long)]
        bootstrap: String,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Create them compacted.
        #[arg(long)]
        compact: bool,
        #[arg(required = true)]
        topics: Vec<String>,
    },
    /// Records topics (every partition) into a recording file.
    Record {
        #[arg(long)]
        bootstrap: String,
        /// Comma-separated topic names.
        #[arg(long, value_delimiter = ',', required = true)]
        topics: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// Start at this offset in every partition (default: the beginning).
        #[arg(long, conflicts_with = "from_time_ms")]
        from_offset: Option<i64>,
        /// Start at the first record at or after this time (ms since the epoch).
        #[arg(long)]
        from_time_ms: Option<i64>,
        /// Record for this long (e.g. 30s) instead of until the end of every partition.
        #[arg(long)]
        duration: Option<String>,
        /// Include records of open or aborted transactions.
        #[arg(long)]
        read_uncommitted: bool,
        #[arg(long = "property", value_parser = parse_property)]
        properties: Vec<(String, String)>,
    },
    /// Writes a recording from a seeded synthetic shop.
    Generate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 2000)]
        impressions: usize,
        #[arg(long, default_value_t = 2)]
        partitions: i32,
        #[arg(long, default_value_t = 40)]
        items: usize,
        #[arg(long, default_value_t = 6)]
        slate_size: usize,
        #[arg(long, default_value_t = 0.1)]
        holdout_share: f64,
        #[arg(long, default_value_t = 0.01)]
        malformed_share: f64,
        #[arg(long, value_enum, default_value_t = Enc::Protobuf)]
        impressions_encoding: Enc,
        /// Model ids (comma-separated); each impression picks one at random.
        #[arg(long, value_delimiter = ',', default_value = "home")]
        models: Vec<String>,
        #[arg(long, value_enum, default_value_t = Enc::Json)]
        feedback_encoding: Enc,
        /// Write impressions and feedback to this one topic (banditflow.v1.Event, in the
        /// impressions encoding).
        #[arg(long)]
        combined_topic: Option<String>,
    },
    /// Prints what a snapshot file holds.
    Inspect {
        snapshot: PathBuf,
        /// Arms to list, best first (default: 10 in the table, all in JSON).
        #[arg(long)]
        top: Option<usize>,
        /// Print JSON (full precision): every position's examination, every arm (or --top),
        /// variants, lift, offsets.
        #[arg(long)]
        json: bool,
        /// Read the decayed statistics at this time (RFC 3339 in UTC, e.g.
        /// 2026-01-01T12:00:00Z, or milliseconds since the epoch) instead of the newest
        /// impression the model learned.
        #[arg(long, value_parser = parse_at)]
        at: Option<i64>,
    },
    /// Reads every shard snapshot from a snapshot topic, merges them per model and prints them.
    InspectTopic {
        #[arg(long)]
        bootstrap: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Also write each merged model to <dir>/<model>.snapshot.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long = "property", value_parser = parse_property)]
        properties: Vec<(String, String)>,
    },
    /// Merges shard snapshot files of one model into a global model.
    Merge {
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
    /// Ranks candidate items with a (merged) snapshot, as a serving node would.
    Rank {
        #[arg(long)]
        snapshot: PathBuf,
        #[arg(long, default_value = "")]
        segment: String,
        /// Comma-separated item ids.
        #[arg(long, value_delimiter = ',', required = true)]
        candidates: Vec<String>,
        #[arg(long, default_value_t = 5)]
        slate_size: usize,
        #[arg(long, value_enum, default_value_t = Strat::Thompson)]
        strategy: Strat,
        #[arg(long, default_value_t = 2.0)]
        ucb_c: f64,
        #[arg(long, default_value_t = 0.05)]
        epsilon: f64,
        #[arg(long, default_value_t = 16)]
        propensity_samples: u32,
        /// Stop Monte Carlo rankings once each served propensity has this relative standard error (0: never).
        #[arg(long, default_value_t = 0.1)]
        propensity_rse: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Reading time in ms since the epoch (default: the newest impression the snapshot learned, else its watermark).
        #[arg(long)]
        now_ms: Option<i64>,
        /// Context features as name=value.
        #[arg(long = "feature", value_parser = parse_feature)]
        features: Vec<(String, f64)>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Enc {
    Protobuf,
    Json,
}

impl From<Enc> for Encoding {
    fn from(e: Enc) -> Encoding {
        match e {
            Enc::Protobuf => Encoding::Protobuf,
            Enc::Json => Encoding::Json,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Strat {
    Thompson,
    Ucb,
    Greedy,
}

fn parse_at(text: &str) -> Result<i64, String> {
    replay::parse_time(text)
        .ok_or_else(|| format!("`{text}` is neither RFC 3339 in UTC (2026-01-01T12:00:00Z) nor milliseconds"))
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected name=value")?;
    Ok((k.to_string(), v.to_string()))
}

fn client(bootstrap: &str, properties: &[(String, String)]) -> rdkafka::config::ClientConfig {
    let mut c = banditflow::kafka::bootstrap_config(bootstrap);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// Logs to stderr; levels from RUST_LOG (or BANDITFLOW_LOG), else `default`.
fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("BANDITFLOW_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Human => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init()
        }
    };
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    banditflow::config::parse_duration_ms(s)
        .filter(|ms| *ms >= 0)
        .map(|ms| std::time::Duration::from_millis(ms as u64))
        .ok_or_else(|| format!("`{s}` is not a duration (e.g. 500ms, 30s, 2m)"))
}

fn parse_feature(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s.split_once('=').ok_or("expected name=value")?;
    let v: f64 = v.parse().map_err(|_| format!("`{v}` is not a number"))?;
    Ok((k.to_string(), v))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `run` and `aggregate` start before their loop: the probes (and metrics) on
/// `kafka.metrics_address`, reporting `ready_message` when ready, and the signal watch.
fn service(
    config: &Config,
    component: Component,
    ready_message: &'static str,
) -> anyhow::Result<(Arc<banditflow::kafka::probes::Health>, Arc<AtomicBool>)> {
    let k = &config.kafka;
    // The loop may block on a restore (or reading its own topic back), a transaction or
    // initialising the producer; it counts as stalled only well beyond all of them.
    let stall = std::time::Duration::from_millis(
        (k.restore_timeout_ms + 2 * k.transaction_timeout_ms) as u64 + 60_000,
    );
    let health = banditflow::kafka::probes::Health::with_ready_message(stall, ready_message);
    if let Some(addr) = k.metrics_address {
        let exporter = banditflow::telemetry::install(component)?;
        banditflow::kafka::probes::serve(addr, Arc::clone(&health), exporter)?;
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    watch_signals(Arc::clone(&shutdown))?;
    Ok((health, shutdown))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The demo draws a progress bar: only warnings go to the log unless BANDITFLOW_LOG says otherwise.
    init_logging(if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "info" }, cli.log_format);
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(config.as_deref(), std::env::vars())?;
            let (health, shutdown) = service(
                &config,
                Component::Processor,
                "ready: group joined and every assigned partition restored",
            )?;
            banditflow::kafka::driver::run(Arc::new(config), shutdown, health)?;
        }
        Command::Aggregate { config, group, from_groups } => {
            let stage = match (group, from_groups) {
                (Some(k), _) => banditflow::kafka::aggregate::Stage::group(k)?,
                (None, true) => banditflow::kafka::aggregate::Stage::FromGroups,
                (None, false) => banditflow::kafka::aggregate::Stage::Whole,
            };
            let config = Config::load(config.as_deref(), std::env::vars())?;
            let (health, shutdown) = service(
                &config,
                Component::Aggregator,
                "ready: snapshot topic read and every model merged and written",
            )?;
            banditflow::kafka::aggregate::run(Arc::new(config), stage, shutdown, health)?;
        }
        Command::Demo {
            duration,
            rate,
            bootstrap,
            report,
            seed,
            ctr_scale,
            holdout_share,
            shift_at,
            priors,
            poison_share,
            partitions,
            quiet,
        } => {
            if !(rate > 0.0 && rate.is_finite()) {
                anyhow::bail!("--rate must be positive");
            }
            if !(0.0..=0.5).contains(&holdout_share) {
                anyhow::bail!("--holdout-share must be within [0, 0.5]");
            }
            if !(1..=64).contains(&partitions) {
                anyhow::bail!("--partitions must be within 1..=64");
            }
            let opts = banditflow::demo::DemoOptions {
                duration,
                rate,
                bootstrap,
                report: report.clone(),
                seed,
                ctr_scale,
                holdout_share,
                shift_at,
                priors,
                poison_share: poison_share.clamp(0.0, 0.5),
                partitions,
                progress: !quiet,
            };
            let outcome = banditflow::demo::run(&opts)?;
            print!("{}", banditflow::demo::table(&outcome));
            if let Some(dir) = &report {
                for p in banditflow::demo::write_report(&outcome, dir)? {
                    println!("wrote {}", p.display());
                }
            }
            if !outcome.significant() {
                anyhow::bail!("the learning variant did not beat the holdout with 95 % confidence");
            }
        }
        Command::Serve { config, listen } => {
            let mut config = Config::load(config.as_deref(), std::env::vars())?;
            if let Some(l) = listen {
                config.serving.listen = l;
            }
            let handle = banditflow::telemetry::install(Component::Serving)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(banditflow::serving::serve(Arc::new(config), handle, async {
                let term = async {
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                        Ok(mut s) => {
                            s.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = term => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("signal received: stopping");
            }))?;
        }
        Command::Record {
            bootstrap,
            topics,
            out,
            from_offset,
            from_time_ms,
            duration,
            read_uncommitted,
            properties,
        } => {
            let start = match (from_offset, from_time_ms) {
                (Some(o), _) => StartAt::Offset(o),
                (_, Some(t)) => StartAt::Timestamp(t),
                _ => StartAt::Beginning,
            };
            let stop = match duration {
                Some(d) => StopAt::Duration(std::time::Duration::from_millis(u64::try_from(
                    banditflow::config::parse_duration_ms(&d)
                        .ok_or_else(|| anyhow::anyhow!("--duration `{d}` is not a duration"))?,
                )?)),
                None => StopAt::End,
            };
            let tmp = out.with_extension("tmp");
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
            );
            let n = transfer::record(
                client(&bootstrap, &properties),
                &topics,
                start,
                stop,
                read_uncommitted,
                &mut file,
            )?;
            drop(file);
            std::fs::rename(&tmp, &out)?;
            println!("recorded {n} records from {} into {}", topics.join(","), out.display());
        }
        Command::CreateTopics { bootstrap, partitions, compact, topics } => {
            let specs: Vec<(&str, i32, bool)> =
                topics.iter().map(|t| (t.as_str(), partitions, compact)).collect();
            banditflow::kafka::admin::create_topics(&bootstrap, &specs)?;
            println!("topics ready: {}", topics.join(", "));
        }
        Command::Replay { input, to_kafka: true, bootstrap: Some(bootstrap), properties, .. } => {
            let file =
                std::fs::File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
            let mut bad = None;
            let records = std::io::BufRead::lines(BufReader::new(file)).enumerate().map_while(|(i, l)| {
                let parsed = l
                    .map_err(anyhow::Error::from)
                    .and_then(|l| recording::parse_line(i + 1, &l).map_err(anyhow::Error::from));
                match parsed {
                    Ok(r) => Some(r),
                    Err(e) => {
                        bad = Some(e);
                        None
                    }
                }
            });
            let n = transfer::produce_recording(client(&bootstrap, &properties), records)?;
            if let Some(e) = bad {
                return Err(e.context(format!("stopped after producing {n} records")));
            }
            println!("produced {n} records to {bootstrap}");
        }
        Command::Replay { input, config, out, top, .. } => {
            let out = out.ok_or_else(|| anyhow::anyhow!("--out is required for an offline replay"))?;
            let config = Config::load(config.as_deref(), std::env::vars())?;
            let file =
                std::fs::File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
            let run = replay::replay_reader(&config, BufReader::new(file))?;
            let text = replay::summary(&config, &run, top)?;
            std::fs::create_dir_all(&out)?;
            let paths = replay::write_outputs(&config, &run, &out, &text)?;
            print!("{text}");
            println!(
                "\nwrote {} snapshot files and {} dead letters under {}",
                paths.len(),
                run.dead_letters.len(),
                out.display()
            );
        }
        Command::Evaluate { input, config, json, rounds, samples, max_refused_share } => {
            let config = Config::load(config.as_deref(), std::env::vars())?;
            let file =
                std::fs::File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
            let mut records = Vec::new();
            for (i, line) in std::io::BufRead::lines(BufReader::new(file)).enumerate() {
                let line = line?;
                if !line.trim().is_empty() {
                    records.push(recording::parse_line(i + 1, &line)?);
                }
            }
            let options =
                banditflow::evaluate::Options { samples, details: rounds.is_some(), max_refused_share };
            let e = banditflow::evaluate::evaluate(&config, &records, options)?;
            if let Some(path) = rounds {
                replay::write_atomic(&path, banditflow::evaluate::details_jsonl(&e).as_bytes())?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&banditflow::evaluate::to_json(&e))?);
            } else {
                print!("{}", banditflow::evaluate::to_text(&e));
            }
        }
        Command::Generate {
            out,
            seed,
            impressions,
            partitions,
            items,
            slate_size,
            holdout_share,
            malformed_share,
            impressions_encoding,
            feedback_encoding,
            models,
            combined_topic,
        } => {
            anyhow::ensure!(partitions >= 1, "--partitions must be at least 1");
            anyhow::ensure!(items >= 1 && slate_size >= 1, "--items and --slate-size must be at least 1");
            anyhow::ensure!(models.iter().all(|m| !m.is_empty()), "--models needs non-empty ids");
            let spec = ShopSpec {
                seed,
                impressions,
                partitions,
                items,
                slate_size,
                holdout_share,
                malformed_share,
                impressions_encoding: impressions_encoding.into(),
                feedback_encoding: feedback_encoding.into(),
                model_ids: models,
                combined_topic,
                ..ShopSpec::default()
            };
            let shop = generate::generate(&spec);
            let mut text = String::new();
            for r in &shop.records {
                text.push_str(&recording::format_line(r));
                text.push('\n');
            }
            replay::write_atomic(&out, text.as_bytes())?;
            println!(
                "wrote {} records ({} valid events, {} malformed) to {}",
                shop.records.len(),
                shop.events.len(),
                shop.malformed,
                out.display()
            );
        }
        Command::Inspect { snapshot: path, top, json, at } => {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let s = snapshot::decode_whole(&bytes)
                .with_context(|| format!("{} is not a usable snapshot", path.display()))?;
            let view = replay::view_model(&s, at);
            if json {
                println!("{}", serde_json::to_string_pretty(&replay::view_json(&view, top))?);
                return Ok(());
            }
            let mut text = String::new();
            replay::describe_view(&mut text, &view, top.unwrap_or(10));
            println!("partition {} ({} bytes), offsets:", s.meta.source_partition, bytes.len());
            for (t, p, o) in &s.meta.input_offsets {
                println!("  {t}/{p} next {o}");
            }
            print!("{text}");
        }
        Command::InspectTopic { bootstrap, topic, top, out, properties } => {
            let all = banditflow::kafka::store::read_models(
                client(&bootstrap, &properties),
                &topic,
                std::time::Duration::from_secs(60),
            )?;
            let mut by_model: std::collections::BTreeMap<String, Vec<snapshot::DecodedSnapshot>> =
                Default::default();
            for ((model, _), s) in all {
                by_model.entry(model).or_default().push(s);
            }
            if by_model.is_empty() {
                println!("no model snapshots on `{topic}` yet");
            }
            for (model, shards) in by_model {
                let m = snapshot::merge(&shards)?;
                let mut text = String::new();
                replay::describe_model(&mut text, &m, top);
                println!("{} shards of {model}", shards.len());
                print!("{text}");
                if let Some(dir) = &out {
                    std::fs::create_dir_all(dir)?;
                    replay::write_atomic(
                        &dir.join(format!("{model}.snapshot")),
                        &snapshot::encode(&m.spec, &m.shard, &m.meta),
                    )?;
                }
            }
        }
        Command::Merge { out, shards } => {
            let mut decoded = Vec::new();
            for p in &shards {
                let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                decoded.push(snapshot::decode_whole(&bytes).with_context(|| format!("{}", p.display()))?);
            }
            let m = snapshot::merge(&decoded)?;
            replay::write_atomic(&out, &snapshot::encode(&m.spec, &m.shard, &m.meta))?;
            println!("merged {} shards of model {} into {}", shards.len(), m.meta.model_id, out.display());
        }
        Command::Rank {
            snapshot: path,
            segment,
            candidates,
            slate_size,
            strategy,
            ucb_c,
            epsilon,
            propensity_samples,
            propensity_rse,
            seed,
            now_ms,
            features,
        } => {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let s = snapshot::decode_whole(&bytes)?;
            let policy = PolicySpec {
                strategy: match strategy {
                    Strat::Thompson => Strategy::Thompson,
                    Strat::Ucb => Strategy::Ucb { c: ucb_c },
                    Strat::Greedy => Strategy::Greedy,
                },
                epsilon,
                propensity_samples,
                propensity_rse,
            };
            let req = RankRequest {
                segment: &segment,
                features: &features,
                candidates: &candidates,
                slate_size,
                now_ms: now_ms.unwrap_or_else(|| s.shard.read_time(s.meta.watermark_ms)),
                seed,
                prior: None,
                linear: None,
                examination: None,
            };
            println!("{:>8}  {:<16} {:>10} {:>10}", "position", "item", "score", "propensity");
            for p in policy::rank(&s.spec, &s.shard, &policy, &req) {
                println!("{:>8}  {:<16} {:>10.5} {:>10.5}", p.position, p.item_id, p.score, p.propensity);
            }
        }
    }
    Ok(())
}

/// Sets `flag` on SIGTERM or SIGINT (a second signal exits at once).
fn watch_signals(flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("banditflow-signals".into()).spawn(move || {
        rt.block_on(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            for _ in 0..2 {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                if flag.swap(true, Ordering::SeqCst) {
                    eprintln!("second signal: exiting without final snapshots");
                    std::process::exit(130);
                }
                tracing::info!("signal received: stopping");
            }
        });
    })?;
    Ok(())
}
