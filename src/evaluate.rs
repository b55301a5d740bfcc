//! `banditflow evaluate`: off-policy evaluation of the policy a config would run, on a
//! recording of logged impressions and feedback.
//!
//! The evaluated policy is the config's `[policy]` ranking with the config's models, learning
//! as it would in production: the recording is applied in its order as one stream (every
//! partition's records, offsets renumbered per topic), and each impression is evaluated with
//! the model learned from the records before it, read at the impression's time — so the
//! policy never sees the outcome it is judged on, and neither does the direct-method model
//! (the same model's expected reward), which keeps the doubly robust estimate unbiased.
//! Simplification: the model is updated record by record, not once per snapshot interval.
//!
//! Every logged placement of a treatment, holdout or experiment impression is a round (opted-out
//! impressions are not logged decisions). Its candidates are the model's catalogue: every item
//! the recording shows for that model, sorted by id. Its reward is the sum of the config's
//! rewards of the feedback for that (impression, item, position), each kind counted once and only
//! within its attribution window, read from the recording directly (not through the join).
//!
//! Impressions without a valid propensity cannot be evaluated: they are left out and named
//! when they are at most `max_refused_share` of the impressions (a few malformed records, which
//! the processor dead-letters too), and the evaluation is refused otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use xxhash_rust::xxh3::xxh3_64;

use crate::config::Config;
use crate::core::event::{self, Event, Impression, InvalidEvent};
use crate::core::ope::{self, Report, Round};
use crate::core::params::{Examination, PositionModel};
use crate::core::partition::InputRecord;
use crate::core::policy::{self, RankRequest};
use crate::recording::Record;

/// Impressions between refits of an empirical prior (per model and segment).
const PRIOR_REFIT: u64 = 1000;

/// Monte Carlo rankings per impression for Thompson sampling's placement probabilities.
pub const DEFAULT_SAMPLES: u32 = 1000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    #[error(
        "{} of {impressions} impressions have no valid propensity (first: topic `{}` offset {}: {}); \
         off-policy evaluation needs the probability with which the logging policy placed each \
         item, and leaving out more than {max_share} of the impressions would bias it",
        refused.count, refused.topic, refused.offset, refused.reason
    )]
    NoPropensity { refused: Refused, impressions: u64, max_share: f64 },
    #[error("the recording holds no impression of a configured model")]
    NoRounds,
}

/// One round as the cross-check needs it: the logged item's index in the catalogue, and the
/// evaluation policy's and the model's view of every candidate at the logged position.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDetail {
    pub reward: f64,
    pub action: usize,
    /// 1-based.
    pub position: u32,
    pub pscore: f64,
    pub pi: Vec<f64>,
    pub q: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelEvaluation {
    pub model: String,
    pub catalog: Vec<String>,
    pub report: Option<Report>,
    pub details: Vec<RoundDetail>,
}

/// Impressions refused for want of a valid propensity.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub count: u64,
    /// The first one's topic, offset and reason.
    pub topic: String,
    pub offset: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Impressions without a valid propensity: not evaluated (at most `max_refused_share`).
    pub refused: Option<Refused>,
    pub models: Vec<ModelEvaluation>,
    /// Records skipped: not of an input topic, or invalid for another reason than a propensity.
    pub skipped_records: u64,
    pub opted_out: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub samples: u32,
    /// Keep every round's detail (catalogue-sized vectors: for the cross-check).
    pub details: bool,
    /// Largest share of impressions without a valid propensity that is left out rather than
    /// refusing the evaluation.
    pub max_refused_share: f64,
}

/// Evaluates the config's policy on `records` (in recording order).
pub fn evaluate(config: &Config, records: &[Record], options: Options) -> Result<Evaluation, EvalError> {
    // Pass 1: decode; the catalogue per model, the first occurrence of each impression, and
    // each placement's reward.
    let mut decoded: Vec<Option<Event>> = Vec::with_capacity(records.len());
    let mut refused: Option<Refused> = None;
    let mut impression_records = 0u64;
    let mut skipped = 0u64;
    for r in records {
        let Some(topic) = config.topic(&r.topic) else {
            skipped += 1;
            decoded.push(None);
            continue;
        };
        match event::decode(topic.role, topic.encoding, &r.payload) {
            Ok(e) => {
                impression_records += u64::from(matches!(e, Event::Impression(_)));
                decoded.push(Some(e));
            }
            Err(e @ (InvalidEvent::BadPropensity { .. } | InvalidEvent::NonFinite("slate.propensity"))) => {
                impression_records += 1;
                let first = refused.get_or_insert_with(|| Refused {
                    count: 0,
                    topic: r.topic.clone(),
                    offset: r.offset,
                    reason: e.to_string(),
                });
                first.count += 1;
                decoded.push(None);
            }
            Err(_) => {
                skipped += 1;
                decoded.push(None);
            }
        }
    }
    if let Some(r) = &refused {
        if r.count as f64 > options.max_refused_share * impression_records as f64 {
            return Err(EvalError::NoPropensity {
                refused: r.clone(),
                impressions: impression_records,
                max_share: options.max_refused_share,
            });
        }
    }
    let models = &config.core.models;
    let mut catalogs: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); models.len()];
    let mut impressions: HashMap<&str, (usize, &Impression)> = HashMap::new();
    let mut opted_out = 0u64;
    for (i, e) in decoded.iter().enumerate() {
        let Some(Event::Impression(imp)) = e else { continue };
        let Some(m) = models.iter().position(|s| s.id == imp.model_id) else { continue };
        if imp.opted_out {
            opted_out += 1;
            continue;
        }
        if impressions.contains_key(imp.impression_id.as_str()) {
            continue;
        }
        impressions.insert(&imp.impression_id, (i, imp));
        catalogs[m].extend(imp.slate.iter().map(|s| s.item_id.as_str()));
    }
    let mut rewards: HashMap<(&str, &str, u32), (f64, u8)> = HashMap::new();
    for e in decoded.iter().flatten() {
        let Event::Feedback(f) = e else { continue };
        let Some((_, imp)) = impressions.get(f.impression_id.as_str()) else { continue };
        let Some(spec) = config.core.model(&imp.model_id) else { continue };
        if !imp.slate.iter().any(|s| s.item_id == f.item_id && s.position == f.position) {
            continue;
        }
        let kind = spec.rewards.of(f.kind);
        if f.time_ms.saturating_sub(imp.time_ms) > kind.window_ms {
            continue;
        }
        let entry = rewards.entry((&imp.impression_id, &f.item_id, f.position)).or_default();
        let bit = 1u8 << f.kind.index();
        if entry.1 & bit == 0 {
            entry.1 |= bit;
            entry.0 += spec.rewards.micros(f.kind, f.value) as f64 / 1e6;
        }
    }
    let catalogs: Vec<Vec<String>> =
        catalogs.into_iter().map(|c| c.into_iter().map(str::to_string).collect()).collect();
    let index: Vec<BTreeMap<&str, usize>> =
        catalogs.iter().map(|c| c.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect()).collect();

    // Pass 2: one stream; each first impression is evaluated with the model learned so far.
    let mut state = crate::replay::offline_state(config, 0);
    let mut next_offset: BTreeMap<&str, i64> = BTreeMap::new();
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); models.len()];
    let mut details: Vec<Vec<RoundDetail>> = vec![Vec::new(); models.len()];
    // Empirical priors are refitted per (model, segment) every PRIOR_REFIT impressions, as a
    // serving node refits them once per model version rather than per request.
    let mut priors: BTreeMap<(usize, String), (crate::core::params::Prior, u64)> = BTreeMap::new();
    // So is an estimated examination curve, per model.
    let mut exams: BTreeMap<usize, (Vec<f64>, u64)> = BTreeMap::new();
    let mut evaluated = 0u64;
    for (i, (r, e)) in records.iter().zip(&decoded).enumerate() {
        let Some(topic) = config.topic(&r.topic) else { continue };
        if let Some(Event::Impression(imp)) = e {
            let first = impressions.get(imp.impression_id.as_str()).is_some_and(|(at, _)| *at == i);
            if let (true, Some(m)) = (first, models.iter().position(|s| s.id == imp.model_id)) {
                let spec = &models[m];
                let positions = imp.slate.iter().map(|s| s.position as usize).max().unwrap_or(0);
                let model = &state.models[m];
                evaluated += 1;
                if matches!(spec.position, PositionModel::Pbm(Examination::Estimated))
                    && exams.get(&m).is_none_or(|(_, at)| evaluated - at >= PRIOR_REFIT)
                {
                    exams.insert(m, (model.estimated_examination(), evaluated));
                }
                let exam = exams.get(&m).map(|(e, _)| e.as_slice());
                let key = (m, imp.segment.clone());
                let prior = match priors.get(&key) {
                    Some(&(p, at)) if evaluated - at < PRIOR_REFIT => p,
                    _ => {
                        let p = model.prior_in_force(spec, &imp.segment, imp.time_ms, exam).0;
                        priors.insert(key, (p, evaluated));
                        p
                    }
                };
                let req = RankRequest {
                    segment: &imp.segment,
                    features: &imp.features,
                    candidates: &catalogs[m],
                    slate_size: positions,
                    now_ms: imp.time_ms,
                    seed: xxh3_64(imp.impression_id.as_bytes()),
                    prior: Some(prior),
                    linear: None,
                    examination: exam,
                };
                let pi = policy::placement_probabilities(
                    spec,
                    model,
                    &config.policy,
                    &req,
                    positions,
                    options.samples,
                );
                let q = policy::expected_rewards(spec, model, &req, positions);
                for s in &imp.slate {
                    let Some(&a) = index[m].get(s.item_id.as_str()) else { continue };
                    let p = s.position as usize - 1;
                    let mass: f64 = pi.iter().map(|row| row[p]).sum();
                    let dm = if mass > 0.0 {
                        pi.iter().zip(&q).map(|(pr, qr)| pr[p] * qr[p]).sum::<f64>() / mass
                    } else {
                        0.0
                    };
                    let reward = rewards
                        .get(&(imp.impression_id.as_str(), s.item_id.as_str(), s.position))
                        .map_or(0.0, |e| e.0);
                    rounds[m].push(Round { reward, pscore: s.propensity, pi: pi[a][p], dm, q: q[a][p] });
                    if options.details {
                        details[m].push(RoundDetail {
                            reward,
                            action: a,
                            position: s.position,
                            pscore: s.propensity,
                            pi: pi.iter().map(|row| row[p]).collect(),
                            q: q.iter().map(|row| row[p]).collect(),
                        });
                    }
                }
            }
        }
        let offset = next_offset.entry(&r.topic).or_insert(0);
        let input = InputRecord {
            topic: &r.topic,
            partition: 0,
            offset: *offset,
            role: topic.role,
            encoding: topic.encoding,
            payload: &r.payload,
            timestamp_ms: r.timestamp_ms,
        };
        *offset += 1;
        state.apply(&config.core, input);
    }
    if rounds.iter().all(Vec::is_empty) {
        return Err(EvalError::NoRounds);
    }
    let models = models
        .iter()
        .zip(catalogs)
        .zip(rounds.iter().zip(details))
        .map(|((spec, catalog), (rounds, details))| ModelEvaluation {
            model: spec.id.clone(),
            catalog,
            report: ope::estimate(rounds),
            details,
        })
        .collect();
    Ok(Evaluation { refused, models, skipped_records: skipped, opted_out })
}

fn estimate_json(e: &ope::Estimate) -> serde_json::Value {
    serde_json::json!({"value": e.value, "std_error": e.std_error, "low": e.low, "high": e.high})
}

/// The evaluation as JSON (full precision).
pub fn to_json(e: &Evaluation) -> serde_json::Value {
    let models: Vec<serde_json::Value> = e
        .models
        .iter()
        .map(|m| {
            let report = m.report.as_ref().map(|r| {
                serde_json::json!({
                    "rounds": r.rounds,
                    "logged": estimate_json(&r.logged),
                    "ipw": estimate_json(&r.ipw),
                    "snipw": r.snipw.as_ref().map(estimate_json),
                    "dm": estimate_json(&r.dm),
                    "dr": estimate_json(&r.dr),
                    "effective_sample_size": r.effective_sample_size,
                    "max_weight": r.max_weight,
                })
            });
            serde_json::json!({"model": m.model, "catalog_size": m.catalog.len(), "report": report})
        })
        .collect();
    let refused = e.refused.as_ref().map(|r| {
        serde_json::json!({"count": r.count, "first": {"topic": r.topic, "offset": r.offset, "reason": r.reason}})
    });
    serde_json::json!({
        "models": models,
        "refused_impressions": refused,
        "skipped_records": e.skipped_records,
        "opted_out_impressions": e.opted_out,
    })
}

/// The evaluation as a table.
pub fn to_text(e: &Evaluation) -> String {
    let mut out = String::new();
    let row = |out: &mut String, name: &str, est: &ope::Estimate| {
        out.push_str(&format!("  {name:<7} {:>10.6}   [{:.6}, {:.6}]\n", est.value, est.low, est.high));
    };
    for m in &e.models {
        let Some(r) = &m.report else {
            out.push_str(&format!("model {}: no rounds\n", m.model));
            continue;
        };
        out.push_str(&format!(
            "model {}: {} rounds, {} candidates; effective sample size {:.1}, largest weight {:.3}\n",
            m.model,
            r.rounds,
            m.catalog.len(),
            r.effective_sample_size,
            r.max_weight
        ));
        out.push_str("  estimate  value (reward per placement)   95 % interval\n");
        row(&mut out, "logged", &r.logged);
        row(&mut out, "ipw", &r.ipw);
        match &r.snipw {
            Some(s) => row(&mut out, "snipw", s),
            None => out.push_str("  snipw   undefined (every weight is 0)\n"),
        }
        row(&mut out, "dm", &r.dm);
        row(&mut out, "dr", &r.dr);
    }
    if let Some(r) = &e.refused {
        out.push_str(&format!(
            "refused: {} impressions without a valid propensity (first: topic `{}` offset {}: {})\n",
            r.count, r.topic, r.offset, r.reason
        ));
    }
    if e.skipped_records > 0 || e.opted_out > 0 {
        out.push_str(&format!(
            "skipped: {} records not of an input topic or invalid, {} opted-out impressions\n",
            e.skipped_records, e.opted_out
        ));
    }
    out
}

/// Every round's detail as JSON lines, after a first line with the catalogue of each model.
pub fn details_jsonl(e: &Evaluation) -> String {
    let mut out = String::new();
    for m in &e.models {
        out.push_str(&serde_json::json!({"model": m.model, "catalog": m.catalog}).to_string());
        out.push('\n');
        for d in &m.details {
            out.push_str(
                &serde_json::json!({
                    "model": m.model, "reward": d.reward, "action": d.action, "position": d.position,
                    "pscore": d.pscore, "pi": d.pi, "q": d.q,
                })
                .to_string(),
            );
            out.push('\n');
        }
    }
    out
}
