//! The `banditflow` command line: a thin edge over the library.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use banditflow::config::Config;
use banditflow::core::event::Encoding;
use banditflow::core::policy::{self, PolicySpec, RankRequest, Strategy};
use banditflow::core::snapshot;
use banditflow::generate::{self, ShopSpec};
use banditflow::recording;
use banditflow::replay;

#[derive(Parser)]
#[command(
    name = "banditflow",
    version,
    about = "Learns position-aware bandit rankings from impressions and feedback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a recording offline through the same core as the Kafka path; writes one snapshot
    /// per model and input partition, the merged model, dead letters and a summary.
    Replay {
        /// Recording (JSON lines, see README).
        #[arg(long)]
        input: PathBuf,
        /// Config file (TOML); environment variables BANDITFLOW__… override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Items to list per model in the summary.
        #[arg(long, default_value_t = 10)]
        top: usize,
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
    },
    /// Prints what a snapshot file holds.
    Inspect {
        snapshot: PathBuf,
        #[arg(long, default_value_t = 10)]
        top: usize,
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
        #[arg(long, default_value_t = 1000)]
        propensity_samples: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Reading time in ms since the epoch (default: the snapshot's watermark).
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Replay { input, config, out, top } => {
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
        Command::Inspect { snapshot: path, top } => {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let s = snapshot::decode(&bytes)
                .with_context(|| format!("{} is not a usable snapshot", path.display()))?;
            let mut text = String::new();
            replay::describe_model(&mut text, &s, top);
            println!("partition {} ({} bytes), offsets:", s.meta.source_partition, bytes.len());
            for (t, p, o) in &s.meta.input_offsets {
                println!("  {t}/{p} next {o}");
            }
            print!("{text}");
        }
        Command::Merge { out, shards } => {
            let mut decoded = Vec::new();
            for p in &shards {
                let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                decoded.push(snapshot::decode(&bytes).with_context(|| format!("{}", p.display()))?);
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
            seed,
            now_ms,
            features,
        } => {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let s = snapshot::decode(&bytes)?;
            let policy = PolicySpec {
                strategy: match strategy {
                    Strat::Thompson => Strategy::Thompson,
                    Strat::Ucb => Strategy::Ucb { c: ucb_c },
                    Strat::Greedy => Strategy::Greedy,
                },
                epsilon,
                propensity_samples,
            };
            let req = RankRequest {
                segment: &segment,
                features: &features,
                candidates: &candidates,
                slate_size,
                now_ms: now_ms.unwrap_or(s.meta.watermark_ms),
                seed,
            };
            println!("{:>8}  {:<16} {:>10} {:>10}", "position", "item", "score", "propensity");
            for p in policy::rank(&s.spec, &s.shard, &policy, &req) {
                println!("{:>8}  {:<16} {:>10.5} {:>10.5}", p.position, p.item_id, p.score, p.propensity);
            }
        }
    }
    Ok(())
}
