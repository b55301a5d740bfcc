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

/// A partition's state for offline use (replay, evaluation): the config's inputs declared, and
/// no changelog bookkeeping, since nothing is persisted record by record.
pub fn offline_state(config: &Config, partition: i32) -> PartitionState {
    let mut state = PartitionState::new(&config.core, partition);
    state.join.changes.untracked = true;
    state.join.buffer.untracked = true;
    state.declare_inputs(config.topics.iter().map(|t| t.name.as_str()));
    state
}

/// Applies one record to its partition's state; what the Kafka path does per record too.
pub fn apply_record(config: &Config, run: &mut ReplayRun, record: Record) {
    let Some(topic) = config.topic(&record.topic) else {
        *run.other_topics.entry(record.topic).or_default() += 1;
        return;
    };
    let state =
        run.partitions.entry(record.partition).or_insert_with(|| offline_state(config, record.partition));
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
                legacy: None,
                arm_log: None,
                merged_from: None,
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
                legacy: None,
                arm_log: None,
                merged_from: None,
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

/// Milliseconds since the epoch from `2026-01-01T00:00:00Z` (seconds, optionally with a
/// fraction, then `Z`) or from a bare integer of milliseconds: the inverse of [`format_time`].
pub fn parse_time(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    let t = text.strip_suffix('Z')?;
    let (date, clock) = t.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) =
        (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut c = hms.splitn(3, ':');
    let (hh, mm, ss): (i64, i64, i64) =
        (c.next()?.parse().ok()?, c.next()?.parse().ok()?, c.next()?.parse().ok()?);
    // Years 0–9999 keep every product below i64's range.
    let bounded = |v: i64, hi: i64| (0..=hi).contains(&v);
    if !bounded(y, 9999) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    if !bounded(hh, 23) || !bounded(mm, 59) || !bounded(ss, 60) {
        return None;
    }
    let millis: i64 = if frac.is_empty() {
        0
    } else {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{frac:0<3}")[..3].parse().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000).checked_add(millis)
}

/// What a model says about one arm, read at one time.
#[derive(Debug, Clone)]
pub struct ArmView<'a> {
    pub segment: &'a str,
    pub item: &'a str,
    /// Beta models: the posterior mean; linear models: θ̂·x for a context without features
    /// (the intercept θ̂₀).
    pub mean: f64,
    /// 95 % interval: the Beta posterior's, or θ̂·x ± 1.96 sd (the normal LinTS draws from).
    pub low: f64,
    pub high: f64,
    /// Linear models: the arm's posterior mean coefficients θ̂ (intercept first).
    pub coefficients: Vec<f64>,
    pub stats: &'a model::ArmStats,
}

/// A model read at one time: the view `inspect` prints as text or JSON.
pub struct ModelView<'a> {
    pub snapshot: &'a DecodedSnapshot,
    pub read_ms: i64,
    /// "newest impression" or "--at".
    pub read_source: &'static str,
    /// Examination per position (index 0 = position 1): configured, estimated, or none
    /// (cascade).
    pub examination: Option<(&'static str, Vec<f64>)>,
    /// Every arm, best first (ties by segment and item).
    pub arms: Vec<ArmView<'a>>,
    /// The prior in force per segment at the reading time.
    pub priors: crate::core::prior::FittedPriors,
}

/// Reads `m` at `at` (default: its newest learned impression; see `ModelShard::read_time`).
pub fn view_model(m: &DecodedSnapshot, at: Option<i64>) -> ModelView<'_> {
    let spec = &m.spec;
    let (read_ms, read_source) = match at {
        Some(t) => (t, "--at"),
        None => (m.shard.read_time(m.meta.watermark_ms), "newest impression"),
    };
    let estimated = m.shard.estimated_examination();
    let examination = match &spec.position {
        PositionModel::Pbm(Examination::Fixed(w)) => Some(("configured", w.clone())),
        PositionModel::Pbm(Examination::Estimated) => {
            // Every position that has data (the tracked curve beyond it is 1 by construction).
            let deepest = m.shard.positions.keys().max().copied().unwrap_or(1) as usize;
            Some(("estimated", estimated.iter().take(deepest.max(1)).copied().collect()))
        }
        PositionModel::Cascade => None,
    };
    let exam_for_posterior = match spec.position {
        PositionModel::Pbm(Examination::Estimated) => Some(estimated.as_slice()),
        _ => None,
    };
    let f = m.shard.read_factor(spec, read_ms);
    let priors = m.shard.fit_priors(spec, read_ms);
    let mut arms = Vec::new();
    // A context without features.
    let mut x = Vec::new();
    if let Some(space) = spec.feature_space() {
        space.vector(&[], &mut x);
    }
    for (seg, items) in &m.shard.arms {
        for (item, a) in items {
            let prior = priors.for_segment(seg);
            let (mean, low, high, coefficients) = match spec.algorithm {
                Algorithm::Linear { .. } => match m.shard.linear_posterior(spec, prior, seg, item, f) {
                    Some(post) => {
                        let (score, sd) = post.mean_sd(&x);
                        let w = 1.959_963_984_540_054 * sd;
                        (score, score - w, score + w, post.mean)
                    }
                    None => (0.0, 0.0, 0.0, Vec::new()),
                },
                Algorithm::BetaBernoulli => {
                    let p = m.shard.posterior_with(spec, prior, seg, item, read_ms, exam_for_posterior);
                    let (lo, hi) = p.interval95();
                    (p.mean(), lo, hi, Vec::new())
                }
            };
            arms.push(ArmView { segment: seg, item, mean, low, high, coefficients, stats: a });
        }
    }
    arms.sort_by(|a, b| b.mean.total_cmp(&a.mean).then(a.segment.cmp(b.segment)).then(a.item.cmp(b.item)));
    ModelView { snapshot: m, read_ms, read_source, examination, arms, priors }
}

/// The model part of the summary: variants, lift, and the top items by posterior mean, read at
/// the newest learned impression.
pub fn describe_model(out: &mut String, m: &DecodedSnapshot, top: usize) {
    describe_view(out, &view_model(m, None), top);
}

/// [`describe_model`] of a view.
pub fn describe_view(out: &mut String, v: &ModelView<'_>, top: usize) {
    let m = v.snapshot;
    let spec = &m.spec;
    let now = v.read_ms;
    let _ = writeln!(out, "model {} — {}", spec.id, describe(spec));
    let _ = writeln!(
        out,
        "  version {}, watermark {}, read at {} ({}), {} arms",
        m.meta.version,
        if m.meta.watermark_ms > 0 { format_time(m.meta.watermark_ms) } else { "-".into() },
        if now > 0 { format_time(now) } else { "-".into() },
        v.read_source,
        m.shard.arm_count()
    );
    let _ = writeln!(out, "  {:<14} {:>11} {:>14} {:>14}", "variant", "impressions", "reward", "reward/impr");
    for (variant, s) in &m.shard.variants {
        let mean = s.mean_var().map_or(0.0, |(mu, _)| mu);
        let _ = writeln!(
            out,
            "  {:<14} {:>11} {:>14.3} {:>14.5}",
            variant.to_string(),
            s.impressions,
            s.reward_micros as f64 / 1e6,
            mean
        );
    }
    match lift_of(m) {
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
    // A linear model's intercept has the same prior (see `core::linear`).
    let _ = writeln!(out, "  prior in force: {}", describe_priors(spec, &v.priors));
    if let Some(("estimated", e)) = &v.examination {
        let shown: Vec<String> = e.iter().map(|w| format!("{w:.3}")).collect();
        let _ = writeln!(out, "  estimated examination (positions 1-{}): {}", e.len(), shown.join(" "));
    }
    let linear = matches!(spec.algorithm, Algorithm::Linear { .. });
    let _ = writeln!(
        out,
        "  {:<8} {:<12} {:>8} {:>19} {:>7} {:>6} {:>5} {:>5} {:>5} {:>10}",
        "segment",
        "item",
        if linear { "score" } else { "mean" },
        "95% interval",
        "impr",
        "click",
        "cart",
        "buy",
        "ret",
        "reward"
    );
    for a in v.arms.iter().take(top) {
        let s = a.stats;
        let _ = writeln!(
            out,
            "  {:<8} {:<12} {:>8.4} [{:>7.4}, {:>7.4}] {:>7} {:>6} {:>5} {:>5} {:>5} {:>10.3}",
            a.segment,
            a.item,
            a.mean,
            a.low,
            a.high,
            s.impressions,
            s.feedback[0],
            s.feedback[1],
            s.feedback[2],
            s.feedback[3],
            s.reward_micros as f64 / 1e6
        );
    }
}

/// "configured Beta(1, 9); kids Beta(1, 15)" or "empirical: kids Beta(…) (segment), …".
fn describe_priors(spec: &ModelSpec, p: &crate::core::prior::FittedPriors) -> String {
    let beta = |q: &crate::core::params::Prior| format!("Beta({:.3}, {:.3})", q.alpha, q.beta);
    if !spec.empirical_prior {
        let mut parts = vec![format!("configured {}", beta(&spec.prior))];
        parts.extend(spec.segment_priors.iter().map(|(s, q)| format!("{s} {}", beta(q))));
        return parts.join("; ");
    }
    let mut parts: Vec<String> =
        p.by_segment.iter().map(|(s, (q, src))| format!("{s} {} ({})", beta(q), src.as_str())).collect();
    parts.push(format!("other segments {} ({})", beta(&p.other.0), p.other.1.as_str()));
    format!("empirical Bayes, fitted at read time: {}", parts.join("; "))
}

fn lift_of(m: &DecodedSnapshot) -> Option<model::Lift> {
    let empty = Default::default();
    let t = m.shard.variants.get(&Variant::Treatment).unwrap_or(&empty);
    let h = m.shard.variants.get(&Variant::Holdout).unwrap_or(&empty);
    model::lift(t, h)
}

/// A view as JSON, numbers at full precision; `top` arms (all when None).
pub fn view_json(v: &ModelView<'_>, top: Option<usize>) -> serde_json::Value {
    let m = v.snapshot;
    let spec = &m.spec;
    let variants: Vec<serde_json::Value> = m
        .shard
        .variants
        .iter()
        .map(|(variant, s)| {
            serde_json::json!({
                "variant": variant.to_string(),
                "impressions": s.impressions,
                "reward": s.reward_micros as f64 / 1e6,
                "reward_per_impression": s.mean_var().map(|(mu, _)| mu),
            })
        })
        .collect();
    let lift = lift_of(m).map(|l| {
        serde_json::json!({"diff": l.diff, "low": l.diff_low, "high": l.diff_high, "relative": l.relative})
    });
    let arms: Vec<serde_json::Value> = v
        .arms
        .iter()
        .take(top.unwrap_or(usize::MAX))
        .map(|a| {
            let s = a.stats;
            serde_json::json!({
                "segment": a.segment, "item": a.item, "mean": a.mean, "low": a.low, "high": a.high,
                "impressions": s.impressions,
                "feedback": {"click": s.feedback[0], "add_to_cart": s.feedback[1], "purchase": s.feedback[2], "return": s.feedback[3]},
                "reward": s.reward_micros as f64 / 1e6,
                "coefficients": (!a.coefficients.is_empty()).then_some(&a.coefficients),
            })
        })
        .collect();
    let (algorithm, linear) = match spec.algorithm {
        Algorithm::BetaBernoulli => ("beta", None),
        Algorithm::Linear { dim, lambda, hash_seed } => (
            "linear",
            Some(serde_json::json!({
                "dim": dim, "lambda": lambda, "hash_seed": hash_seed,
                "features": spec.linear_features,
                "updates": m.shard.linear_updates,
                "arm_score": "θ̂·x of a context without features (the intercept θ̂₀); interval ± 1.96 sd of the normal LinTS draws from; coefficients: θ̂, intercept first",
            })),
        ),
    };
    serde_json::json!({
        "model": spec.id,
        "algorithm": algorithm,
        "linear": linear,
        "position_model": match spec.position { PositionModel::Cascade => "cascade", _ => "pbm" },
        "examination": v.examination.as_ref().map(|(source, e)| serde_json::json!({"source": source, "by_position": e})),
        "half_life_ms": spec.half_life_ms,
        "prior": {"alpha": spec.prior.alpha, "beta": spec.prior.beta},
        "prior_kind": if spec.empirical_prior { "empirical" } else { "configured" },
        "prior_in_force": {
            "by_segment": v.priors.by_segment.iter().map(|(s, (q, src))| (s.clone(), serde_json::json!({"alpha": q.alpha, "beta": q.beta, "source": src.as_str()}))).collect::<serde_json::Map<_, _>>(),
            "other_segments": {"alpha": v.priors.other.0.alpha, "beta": v.priors.other.0.beta, "source": v.priors.other.1.as_str()},
        },
        "segment_priors": spec.segment_priors.iter().map(|(k, p)| (k.clone(), serde_json::json!({"alpha": p.alpha, "beta": p.beta}))).collect::<serde_json::Map<_, _>>(),
        "version": m.meta.version,
        "source_partition": m.meta.source_partition,
        "watermark_ms": m.meta.watermark_ms,
        "newest_impression_ms": m.shard.newest_impression_ms,
        "read_at_ms": v.read_ms,
        "read_at": format_time(v.read_ms),
        "read_at_source": v.read_source,
        "input_offsets": m.meta.input_offsets.iter().map(|(t, p, o)| serde_json::json!({"topic": t, "partition": p, "next": o})).collect::<Vec<_>>(),
        "arm_count": m.shard.arm_count(),
        "variants": variants,
        "lift": lift,
        "arms": arms,
    })
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
