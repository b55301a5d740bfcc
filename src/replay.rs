//! Offline replay: drives recorded Kafka records through exactly the core code the Kafka path
//! uses ([`PartitionState::apply`]), one state per input partition, then writes one snapshot per
//! model and partition plus the merged model, the dead letters, and a summary.
//!
//! Deterministic: records are applied in file order per partition and every output is sorted,
//! so the same recording and config always give byte-identical files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::core::checkpoint;
use crate::core::event::{InvalidEvent, Variant};
use crate::core::join::JoinCounters;
use crate::core::model::{self, ModelShard};
use crate::core::params::{Algorithm, Examination, ModelSpec, PositionModel};
use crate::core::partition::{Applied, InputRecord, PartitionState};
use crate::core::snapshot::{self, DecodedSnapshot, SnapshotMeta};
use crate::recording::{self, LineError, Record};

/// Header names put on dead-lettered records.
pub const HEADER_REASON: &str = "banditflow.error.reason";
pub const HEADER_CODE: &str = "banditflow.error.code";

#[derive(Debug, Default)]
pub struct ReplayRun {
    pub partitions: BTreeMap<i32, PartitionState>,
    pub bad_lines: Vec<LineError>,
    /// Records of topics that are not inputs of this config, by topic.
    pub other_topics: BTreeMap<String, u64>,
    pub dead_letters: Vec<(Record, InvalidEvent)>,
    pub redelivered: u64,
}

impl ReplayRun {
    pub fn counters(&self) -> JoinCounters {
        let mut total = JoinCounters::default();
        for p in self.partitions.values() {
            total.add(&p.join.counters);
        }
        total
    }
}

/// Applies one record to its partition's state; what the Kafka path does per record too.
pub fn apply_record(config: &Config, run: &mut ReplayRun, record: Record) {
    let Some(topic) = config.topic(&record.topic) else {
        *run.other_topics.entry(record.topic).or_default() += 1;
        return;
    };
    let state = run.partitions.entry(record.partition).or_insert_with(|| {
        let mut state = PartitionState::new(&config.core, record.partition);
        // Nothing is persisted record by record here: keep no changelog bookkeeping.
        state.join.changes.untracked = true;
        state.join.buffer.untracked = true;
        state.declare_inputs(config.topics.iter().map(|t| t.name.as_str()));
        state
    });
    let input = InputRecord {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        role: topic.role,
        encoding: topic.encoding,
        payload: &record.payload,
        timestamp_ms: record.timestamp_ms,
    };
    match state.apply(&config.core, input) {
        Applied::Event(_) => {}
        Applied::AlreadyCovered => run.redelivered += 1,
        Applied::Invalid(reason) => run.dead_letters.push((record, reason)),
    }
}

pub fn replay_reader(config: &Config, input: impl BufRead) -> std::io::Result<ReplayRun> {
    let mut run = ReplayRun::default();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match recording::parse_line(i + 1, &line) {
            Ok(r) => apply_record(config, &mut run, r),
            Err(e) => run.bad_lines.push(e),
        }
    }
    Ok(run)
}

/// The merged model of each configured model, from the run's shards.
pub fn merged_models(
    config: &Config,
    run: &ReplayRun,
) -> Result<Vec<DecodedSnapshot>, snapshot::SnapshotError> {
    let mut out = Vec::new();
    for (i, spec) in config.core.models.iter().enumerate() {
        let shards: Vec<DecodedSnapshot> = run
            .partitions
            .values()
            .map(|st| DecodedSnapshot {
                meta: checkpoint::shard_meta(&config.core, st, &spec.id),
                spec: spec.clone(),
                shard: st.models[i].clone(),
            })
            .collect();
        if shards.is_empty() {
            out.push(DecodedSnapshot {
                meta: SnapshotMeta {
                    model_id: spec.id.clone(),
                    source_partition: -1,
                    version: 0,
                    watermark_ms: 0,
                    input_offsets: Vec::new(),
                },
                spec: spec.clone(),
                shard: ModelShard::new(spec),
            });
        } else {
            out.push(snapshot::merge(&shards)?);
        }
    }
    Ok(out)
}

/// Writes `<out>/<model>/partition-<p>.snapshot`, `<out>/<model>/merged.snapshot`,
/// `<out>/dead-letters.jsonl` and `<out>/summary.txt`; returns the snapshot paths.
pub fn write_outputs(
    config: &Config,
    run: &ReplayRun,
    out: &Path,
    summary_text: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    let merged = merged_models(config, run)?;
    for (i, spec) in config.core.models.iter().enumerate() {
        let dir = out.join(&spec.id);
        std::fs::create_dir_all(&dir)?;
        for st in run.partitions.values() {
            let bytes =
                snapshot::encode(spec, &st.models[i], &checkpoint::shard_meta(&config.core, st, &spec.id));
            let p = dir.join(format!("partition-{}.snapshot", st.partition));
            write_atomic(&p, &bytes)?;
            paths.push(p);
        }
        let m = &merged[i];
        let p = dir.join("merged.snapshot");
        write_atomic(&p, &snapshot::encode(&m.spec, &m.shard, &m.meta))?;
        paths.push(p);
    }
    let mut dl = Vec::new();
    for (r, reason) in &run.dead_letters {
        let mut r = r.clone();
        r.headers.push((HEADER_CODE.into(), reason.code().as_bytes().to_vec()));
        r.headers.push((HEADER_REASON.into(), reason.to_string().into_bytes()));
        writeln!(dl, "{}", recording::format_line(&r))?;
    }
    write_atomic(&out.join("dead-letters.jsonl"), &dl)?;
    write_atomic(&out.join("summary.txt"), summary_text.as_bytes())?;
    Ok(paths)
}

/// Writes via a temporary file and rename, so readers never see half a snapshot.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// `2026-01-01T00:00:00.000Z` from milliseconds since the epoch.
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn describe(spec: &ModelSpec) -> String {
    let alg = match spec.algorithm {
        Algorithm::BetaBernoulli => "beta-bernoulli".to_string(),
        Algorithm::Linear { dim, lambda, .. } => format!("linear d={dim} lambda={lambda}"),
    };
    let pos = match &spec.position {
        PositionModel::Pbm(Examination::Fixed(_)) => "pbm (configured examination)",
        PositionModel::Pbm(Examination::Estimated) => "pbm (estimated examination)",
        PositionModel::Cascade => "cascade",
    };
    format!("{alg}, {pos}, half-life {}ms", spec.half_life_ms)
}

/// The model part of the summary: variants, lift, and the top items by posterior mean.
pub fn describe_model(out: &mut String, m: &DecodedSnapshot, top: usize) {
    let spec = &m.spec;
    // Read at the newest impression: every decayed sum is keyed by impression time, and the
    // tail of late feedback at the end of a recording would otherwise decay everything.
    let now = m.shard.read_time(m.meta.watermark_ms);
    let _ = writeln!(out, "model {} — {}", spec.id, describe(spec));
    let _ = writeln!(
        out,
        "  version {}, watermark {}, read at {} (newest impression), {} arms",
        m.meta.version,
        if m.meta.watermark_ms > 0 { format_time(m.meta.watermark_ms) } else { "-".into() },
        if now > 0 { format_time(now) } else { "-".into() },
        m.shard.arm_count()
    );
    let _ = writeln!(out, "  {:<14} {:>11} {:>14} {:>14}", "variant", "impressions", "reward", "reward/impr");
    for (v, s) in &m.shard.variants {
        let mean = s.mean_var().map_or(0.0, |(mu, _)| mu);
        let _ = writeln!(
            out,
            "  {:<14} {:>11} {:>14.3} {:>14.5}",
            v.to_string(),
            s.impressions,
            s.reward_micros as f64 / 1e6,
            mean
        );
    }
    let empty = Default::default();
    let t = m.shard.variants.get(&Variant::Treatment).unwrap_or(&empty);
    let h = m.shard.variants.get(&Variant::Holdout).unwrap_or(&empty);
    match model::lift(t, h) {
        Some(l) => {
            let _ = writeln!(
                out,
                "  lift treatment vs holdout: {:+.5} reward/impression, 95% CI [{:+.5}, {:+.5}], relative {:+.1}%",
                l.diff,
                l.diff_low,
                l.diff_high,
                l.relative * 100.0
            );
        }
        None => {
            let _ = writeln!(out, "  lift treatment vs holdout: not enough data");
        }
    }
    let exam = match spec.position {
        PositionModel::Pbm(Examination::Estimated) => {
            let e = m.shard.estimated_examination();
            let shown: Vec<String> = e.iter().take(8).map(|w| format!("{w:.3}")).collect();
            let _ = writeln!(out, "  estimated examination (positions 1-8): {}", shown.join(" "));
            Some(e)
        }
        _ => None,
    };
    let mut rows = Vec::new();
    let mut segments: Vec<&String> = m.shard.arms.keys().collect();
    segments.sort();
    for seg in segments {
        let mut items: Vec<(&String, &model::ArmStats)> = m.shard.arms[seg].iter().collect();
        items.sort_by(|a, b| a.0.cmp(b.0));
        for (item, a) in items {
            let p = m.shard.posterior(spec, seg, item, now, exam.as_deref());
            rows.push((p.mean(), seg.as_str(), item.as_str(), p, a));
        }
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)).then(a.2.cmp(b.2)));
    let _ = writeln!(
        out,
        "  {:<8} {:<12} {:>8} {:>19} {:>7} {:>6} {:>5} {:>5} {:>5} {:>10}",
        "segment", "item", "mean", "95% interval", "impr", "click", "cart", "buy", "ret", "reward"
    );
    for (mean, seg, item, p, a) in rows.iter().take(top) {
        let (lo, hi) = p.interval95();
        let _ = writeln!(
            out,
            "  {:<8} {:<12} {:>8.4} [{:>7.4}, {:>7.4}] {:>7} {:>6} {:>5} {:>5} {:>5} {:>10.3}",
            seg,
            item,
            mean,
            lo,
            hi,
            a.impressions,
            a.feedback[0],
            a.feedback[1],
            a.feedback[2],
            a.feedback[3],
            a.reward_micros as f64 / 1e6
        );
    }
}

pub fn summary(config: &Config, run: &ReplayRun, top: usize) -> anyhow::Result<String> {
    let mut out = String::new();
    let records: u64 = run.partitions.values().map(|p| p.records).sum();
    let invalid: u64 = run.partitions.values().map(PartitionState::invalid_total).sum();
    let other: u64 = run.other_topics.values().sum();
    let _ = writeln!(
        out,
        "records {records} (invalid {invalid}, redelivered {}, other topics {other}, unreadable lines {})",
        run.redelivered,
        run.bad_lines.len()
    );
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>8} {:>11} {:>8}  watermark",
        "partition", "records", "invalid", "buffered", "held"
    );
    for (p, st) in &run.partitions {
        let wm = st.watermark_ms(&config.core).map_or("-".to_string(), format_time);
        let _ = writeln!(
            out,
            "{:<10} {:>9} {:>8} {:>11} {:>8}  {wm}",
            p,
            st.records,
            st.invalid_total(),
            st.join.buffered_impressions(),
            st.join.pending_feedback()
        );
    }
    let _ = writeln!(out, "\n{:<26} {:>9}", "outcome", "count");
    for (name, v) in run.counters().rows() {
        let _ = writeln!(out, "{name:<26} {v:>9}");
    }
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    for st in run.partitions.values() {
        for (k, v) in &st.invalid {
            *reasons.entry(k).or_default() += v;
        }
    }
    if !reasons.is_empty() {
        let _ = writeln!(out, "\n{:<26} {:>9}", "invalid reason", "count");
        for (k, v) in reasons {
            let _ = writeln!(out, "{k:<26} {v:>9}");
        }
    }
    for e in run.bad_lines.iter().take(5) {
        let _ = writeln!(out, "unreadable: {e}");
    }
    for m in merged_models(config, run)? {
        out.push('\n');
        describe_model(&mut out, &m, top);
    }
    Ok(out)
}
