//! Configuration: one TOML file, layered as embedded defaults → file → environment, then
//! validated into the core's parameters. Every error names the offending field.
//!
//! Environment overrides: `BANDITFLOW__<SECTION>__<FIELD>` (double underscores separate path
//! segments; list elements by index, e.g. `BANDITFLOW__MODELS__0__HALF_LIFE=2d`). Values are read
//! as TOML literals when they parse as such (numbers, booleans, arrays), else as strings.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::core::event::{Encoding, FeedbackKind, TopicRole};
use crate::core::params::{
    Algorithm, CoreSpec, Examination, JoinSpec, KindReward, Limits, ModelSpec, PositionModel, Prior, Rewards,
};
use crate::core::policy::{PolicySpec, Strategy};

/// The configuration the `demo` and tests start from; a file only states what differs.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

pub const ENV_PREFIX: &str = "BANDITFLOW__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message, not a `source`: chained reports would repeat it.
    #[error("config: cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config: {origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("config field `{field}`: {message}")]
    Field { field: String, message: String },
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field { field: field.into(), message: message.into() }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    input: RawInput,
    kafka: RawKafka,
    rewards: RawRewards,
    join: RawJoin,
    limits: RawLimits,
    policy: RawPolicy,
    serving: RawServing,
    models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServing {
    listen: String,
    max_candidates: i64,
    max_slate_size: i64,
    max_body_bytes: i64,
    holdout_share: f64,
    cold_start: bool,
    produce_timeout: String,
}

/// How `banditflow serve` answers rank and feedback requests.
#[derive(Debug, Clone, PartialEq)]
pub struct ServingSpec {
    pub listen: std::net::SocketAddr,
    pub max_candidates: usize,
    pub max_slate_size: usize,
    pub max_body_bytes: usize,
    /// Share of user keys (by hash) that get the non-learning baseline, in [0, 1].
    pub holdout_share: f64,
    /// Rank by the configured prior until a snapshot of the model is loaded (else 503).
    pub cold_start: bool,
    /// How long a rank or feedback request waits for Kafka to acknowledge its record.
    pub produce_timeout_ms: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_event_time_skew: String,
    propensity_floor: f64,
    max_id_bytes: i64,
    max_features: i64,
    max_arms_per_model: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    topics: Vec<RawTopic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    bootstrap_servers: String,
    group_id: String,
    instance_id: toml::Value,
    snapshot_topic: String,
    #[serde(default)]
    changelog_topic: Option<String>,
    dead_letter_topic: String,
    create_topics: bool,
    replication_factor: i64,
    snapshot_interval: String,
    transaction_timeout: String,
    max_record_bytes: i64,
    restore_timeout: String,
    prefetch_kbytes: i64,
    partition_queue_records: i64,
    max_idle: String,
    metrics_address: String,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
    #[serde(default)]
    consumer_properties: BTreeMap<String, toml::Value>,
    #[serde(default)]
    producer_properties: BTreeMap<String, toml::Value>,
}

/// How the service talks to Kafka.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSpec {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub instance_id: String,
    pub snapshot_topic: String,
    /// The attribution changelog's compacted topic (`buf/…`, `held/…`), written in the same
    /// transaction as the snapshot topic, which serving nodes never read. Default
    /// `<snapshot_topic>-changelog`.
    pub changelog_topic: String,
    pub dead_letter_topic: String,
    pub create_topics: bool,
    pub replication_factor: i32,
    pub snapshot_interval_ms: i64,
    pub transaction_timeout_ms: i64,
    pub max_record_bytes: usize,
    pub restore_timeout_ms: i64,
    pub prefetch_kbytes: usize,
    pub partition_queue_records: usize,
    /// With two input topics: how long a partition task holds records of one topic while it has
    /// none of the other, to apply both in timestamp order.
    pub max_idle_ms: i64,
    /// `None` when disabled.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// librdkafka properties passed through as is to every client (TLS, SASL, tuning).
    pub properties: BTreeMap<String, String>,
    /// Passed only to consumers (over `properties`): e.g. `session.timeout.ms`,
    /// `auto.offset.reset`. A consumer-only property given to a producer makes librdkafka warn.
    pub consumer_properties: BTreeMap<String, String>,
    /// Passed only to producers (over `properties`): e.g. `linger.ms`, `compression.type`.
    pub producer_properties: BTreeMap<String, String>,
}

impl KafkaSpec {
    /// A property as consumers see it (their own section first, then the common one).
    pub fn consumer_property(&self, name: &str) -> Option<&str> {
        self.consumer_properties.get(name).or_else(|| self.properties.get(name)).map(String::as_str)
    }

    /// A property as producers see it (their own section first, then the common one).
    pub fn producer_property(&self, name: &str) -> Option<&str> {
        self.producer_properties.get(name).or_else(|| self.properties.get(name)).map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    name: String,
    role: String,
    encoding: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRewards {
    click: RawKind,
    add_to_cart: RawKind,
    purchase: RawKind,
    #[serde(rename = "return")]
    return_: RawKind,
    scale: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    reward: f64,
    #[serde(default)]
    value_weight: f64,
    window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJoin {
    watermark_delay: String,
    grace: String,
    late_retention: String,
    learn_late: bool,
    max_impressions: i64,
    max_pending_feedback: i64,
    funnel: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    strategy: String,
    ucb_c: f64,
    epsilon: f64,
    propensity_samples: i64,
    propensity_rse: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    #[serde(default = "default_position_model")]
    position_model: String,
    #[serde(default)]
    examination: Option<toml::Value>,
    #[serde(default = "default_half_life")]
    half_life: String,
    /// `{ alpha, beta }` or "empirical" (the default).
    #[serde(default)]
    prior: Option<toml::Value>,
    #[serde(default)]
    segment_priors: BTreeMap<String, RawPrior>,
    #[serde(default)]
    linear: Option<RawLinear>,
}

fn default_algorithm() -> String {
    "beta".into()
}
fn default_position_model() -> String {
    "pbm".into()
}
fn default_half_life() -> String {
    "7d".into()
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawPrior {
    alpha: f64,
    beta: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinear {
    #[serde(default)]
    dim: Option<i64>,
    #[serde(default = "default_lambda")]
    lambda: f64,
    #[serde(default)]
    hash_seed: u64,
    #[serde(default)]
    features: Vec<String>,
}

/// Slots of a linear model whose features are not named: the intercept and 7 hashed feature
/// slots, 44 numbers per arm.
fn default_dim() -> i64 {
    8
}
fn default_lambda() -> f64 {
    1.0
}

/// One input topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    pub name: String,
    pub role: TopicRole,
    pub encoding: Encoding,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub topics: Vec<TopicSpec>,
    pub kafka: KafkaSpec,
    pub core: CoreSpec,
    pub policy: PolicySpec,
    pub serving: ServingSpec,
}

impl Config {
    pub fn topic(&self, name: &str) -> Option<&TopicSpec> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// Defaults, then the file (if any), then `env` (pairs of name and value; pass
    /// `std::env::vars()` at the edge, nothing in tests).
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => Some((
                p.display().to_string(),
                std::fs::read_to_string(p)
                    .map_err(|error| ConfigError::Read { path: p.display().to_string(), error })?,
            )),
            None => None,
        };
        Config::from_layers(file.as_ref().map(|(o, t)| (o.as_str(), t.as_str())), env)
    }

    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value = parse_toml("embedded defaults", DEFAULT_TOML)?;
        if let Some((origin, text)) = file {
            let overlay = parse_toml(origin, text)?;
            merge_values(&mut value, overlay);
        }
        for (k, v) in env {
            if let Some(path) = k.strip_prefix(ENV_PREFIX) {
                apply_env(&mut value, path, &v)?;
            }
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(deser_error)?;
        validate(raw)
    }
}

fn parse_toml(origin: &str, text: &str) -> Result<toml::Value, ConfigError> {
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::Syntax { origin: origin.to_string(), message: e.message().to_string() })
}

/// Names the field by its path (`join.grace`, `models[0].half_life`), never by its value.
fn deser_error(e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = e.path().to_string();
    let msg = e.inner().message().to_string();
    let path = if path == "." { String::new() } else { path };
    // "missing field `x`" is reported at the enclosing table ("unknown field" at the field).
    let named = msg.starts_with("missing field").then(|| msg.split('`').nth(1)).flatten();
    let field = match (named, path.is_empty()) {
        (Some(name), true) => name.to_string(),
        (Some(name), false) => format!("{path}.{name}"),
        (None, false) => path,
        (None, true) => msg.split('`').nth(1).unwrap_or("(top level)").to_string(),
    };
    field_err(field, msg)
}

/// Tables merge key by key; everything else (including `models`, a list) is replaced whole.
fn merge_values(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_table() && v.is_table() => merge_values(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn apply_env(root: &mut toml::Value, path: &str, raw: &str) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
    let field = segments.join(".");
    // An environment variable is text: it is read as a TOML value (a number, a boolean, a
    // list, a quoted string), except where the field holds a string and the text is not a
    // quoted string — `GROUP_ID=123` is the group "123", `GRACE=300000` is 300000 ms.
    let literal = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    let value_for = |current: Option<&toml::Value>| match (&literal, current) {
        (Some(v @ toml::Value::String(_)), _) => v.clone(),
        (_, Some(toml::Value::String(_))) | (None, _) => toml::Value::String(raw.to_string()),
        (Some(v), _) => v.clone(),
    };
    let mut cur = root;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    let value = value_for(t.get(seg.as_str()));
                    t.insert(seg.clone(), value);
                    return Ok(());
                }
                t.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx: usize = seg.parse().map_err(|_| {
                    field_err(&field, format!("`{seg}` is not a list index (environment override)"))
                })?;
                let len = a.len();
                let slot = a.get_mut(idx).ok_or_else(|| {
                    field_err(&field, format!("index {idx} is past the {len} configured entries"))
                })?;
                if last {
                    *slot = value_for(Some(slot));
                    return Ok(());
                }
                slot
            }
            _ => return Err(field_err(&field, "environment override goes below a plain value")),
        };
    }
    Ok(())
}

/// Parses durations such as `250ms`, `30s`, `5m`, `2h`, `7d` (or a bare number of milliseconds).
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn duration(field: &str, s: &str) -> Result<i64, ConfigError> {
    parse_duration_ms(s)
        .ok_or_else(|| field_err(field, format!("`{s}` is not a duration (e.g. 500ms, 30s, 5m, 2h, 7d)")))
}

/// Largest |reward| and |value_weight| a config may give: far beyond any real reward mix, far
/// enough from overflow that sums of millions of events stay exact integers.
const MAX_CONFIG_REWARD: f64 = 1e6;

fn bounded(field: &str, v: f64, max: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v.abs() <= max {
        Ok(v)
    } else {
        Err(field_err(field, format!("must be a finite number within ±{max:e}, got {v}")))
    }
}

fn positive(field: &str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(field_err(field, format!("must be a positive number, got {v}")))
    }
}

/// `[join.funnel]`: kind → the kinds one of which must come first. Every kind is listed, none
/// needs itself, and each can be reached from a kind that needs nothing.
fn funnel(raw: &std::collections::BTreeMap<String, Vec<String>>) -> Result<[u8; 4], ConfigError> {
    use crate::core::event::FeedbackKind;
    let mut requires = [0u8; 4];
    for (name, before) in raw {
        let field = format!("join.funnel.{name}");
        let kind = FeedbackKind::parse(name).ok_or_else(|| {
            field_err(&field, "unknown feedback kind (click, add_to_cart, purchase or return)")
        })?;
        for b in before {
            let k = FeedbackKind::parse(b)
                .ok_or_else(|| field_err(&field, format!("unknown feedback kind `{b}`")))?;
            if k == kind {
                return Err(field_err(&field, "a kind cannot need itself"));
            }
            requires[kind.index()] |= 1 << k.index();
        }
    }
    for k in FeedbackKind::ALL {
        if !raw.contains_key(k.as_str()) {
            return Err(field_err(
                format!("join.funnel.{}", k.as_str()),
                "missing: list the kinds it needs first ([] for none)",
            ));
        }
    }
    // Reachability: a kind that can never open would release its feedback always.
    let mut open = 0u8;
    loop {
        let next =
            (0..4)
                .fold(open, |o, k| if requires[k] == 0 || requires[k] & open != 0 { o | 1 << k } else { o });
        if next == open {
            break;
        }
        open = next;
    }
    if let Some(k) = FeedbackKind::ALL.into_iter().find(|k| open & (1 << k.index()) == 0) {
        return Err(field_err(
            format!("join.funnel.{}", k.as_str()),
            "can never be reached: none of the kinds it needs can come first",
        ));
    }
    Ok(requires)
}

fn count(field: &str, v: i64) -> Result<usize, ConfigError> {
    if v >= 1 {
        usize::try_from(v).map_err(|_| field_err(field, "too large"))
    } else {
        Err(field_err(field, format!("must be at least 1, got {v}")))
    }
}

fn prior(field: &str, p: RawPrior) -> Result<Prior, ConfigError> {
    Ok(Prior {
        alpha: positive(&format!("{field}.alpha"), p.alpha)?,
        beta: positive(&format!("{field}.beta"), p.beta)?,
    })
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut topics = Vec::new();
    for (i, t) in raw.input.topics.into_iter().enumerate() {
        let f = |s: &str| format!("input.topics[{i}].{s}");
        if t.name.is_empty() {
            return Err(field_err(f("name"), "must not be empty"));
        }
        if topics.iter().any(|x: &TopicSpec| x.name == t.name) {
            return Err(field_err(f("name"), format!("topic `{}` is listed twice", t.name)));
        }
        let role = match t.role.as_str() {
            "impressions" => TopicRole::Impressions,
            "feedback" => TopicRole::Feedback,
            "combined" => TopicRole::Combined,
            other => {
                return Err(field_err(
                    f("role"),
                    format!("`{other}` is not one of impressions, feedback, combined"),
                ))
            }
        };
        let encoding = match t.encoding.as_str() {
            "protobuf" => Encoding::Protobuf,
            "json" => Encoding::Json,
            other => return Err(field_err(f("encoding"), format!("`{other}` is not one of protobuf, json"))),
        };
        topics.push(TopicSpec { name: t.name, role, encoding });
    }
    if topics.is_empty() {
        return Err(field_err("input.topics", "at least one input topic is needed"));
    }
    let has = |r: TopicRole| topics.iter().any(|t| t.role == r);
    let complete = has(TopicRole::Combined) || (has(TopicRole::Impressions) && has(TopicRole::Feedback));
    if !complete {
        return Err(field_err(
            "input.topics",
            "need a combined topic, or both an impressions and a feedback topic",
        ));
    }

    let r = raw.rewards;
    let mut kinds = [KindReward { reward: 0.0, value_weight: 0.0, window_ms: 0 }; 4];
    for (kind, rk) in [
        (FeedbackKind::Click, &r.click),
        (FeedbackKind::AddToCart, &r.add_to_cart),
        (FeedbackKind::Purchase, &r.purchase),
        (FeedbackKind::Return, &r.return_),
    ] {
        let f = |s: &str| format!("rewards.{}.{s}", kind.as_str());
        let window_ms = duration(&f("window"), &rk.window)?;
        if window_ms <= 0 {
            return Err(field_err(f("window"), "must be positive"));
        }
        kinds[kind.index()] = KindReward {
            reward: bounded(&f("reward"), rk.reward, MAX_CONFIG_REWARD)?,
            value_weight: bounded(&f("value_weight"), rk.value_weight, MAX_CONFIG_REWARD)?,
            window_ms,
        };
    }
    let positive_sum: f64 = kinds.iter().map(|k| k.reward.max(0.0)).sum();
    let scale = match r.scale {
        // Rewards are divided by it: a tiny scale would make decayed sums overflow.
        Some(s) if !(1e-6..=1e12).contains(&s) => {
            return Err(field_err("rewards.scale", format!("must be within [1e-6, 1e12], got {s}")))
        }
        Some(s) => positive("rewards.scale", s)?,
        None if positive_sum > 0.0 => positive_sum,
        None => {
            return Err(field_err("rewards", "no feedback kind has a positive reward; set rewards.scale"))
        }
    };
    let rewards = Rewards { kinds, scale };

    let j = raw.join;
    let join = JoinSpec {
        watermark_delay_ms: duration("join.watermark_delay", &j.watermark_delay)?,
        grace_ms: duration("join.grace", &j.grace)?,
        late_retention_ms: duration("join.late_retention", &j.late_retention)?,
        learn_late: j.learn_late,
        max_impressions: count("join.max_impressions", j.max_impressions)?,
        max_pending_feedback: count("join.max_pending_feedback", j.max_pending_feedback)?,
        funnel: funnel(&j.funnel)?,
    };

    let l = raw.limits;
    let propensity_floor = l.propensity_floor;
    if !(propensity_floor > 0.0 && propensity_floor <= 1.0) {
        return Err(field_err(
            "limits.propensity_floor",
            format!("must be in (0, 1], got {propensity_floor}"),
        ));
    }
    let max_event_time_skew_ms = duration("limits.max_event_time_skew", &l.max_event_time_skew)?;
    if max_event_time_skew_ms <= 0 {
        return Err(field_err("limits.max_event_time_skew", "must be positive"));
    }
    let limits = Limits {
        max_event_time_skew_ms,
        propensity_floor,
        max_id_bytes: count("limits.max_id_bytes", l.max_id_bytes)?,
        max_features: count("limits.max_features", l.max_features)?,
        max_arms_per_model: count("limits.max_arms_per_model", l.max_arms_per_model)?,
    };

    let p = raw.policy;
    let strategy = match p.strategy.as_str() {
        "thompson" => Strategy::Thompson,
        "ucb" => Strategy::Ucb { c: positive("policy.ucb_c", p.ucb_c)? },
        "greedy" => Strategy::Greedy,
        other => {
            return Err(field_err(
                "policy.strategy",
                format!("`{other}` is not one of thompson, ucb, greedy"),
            ))
        }
    };
    if !(0.0..=1.0).contains(&p.epsilon) {
        return Err(field_err("policy.epsilon", format!("must be in [0, 1], got {}", p.epsilon)));
    }
    let policy = PolicySpec {
        strategy,
        epsilon: p.epsilon,
        propensity_samples: u32::try_from(count("policy.propensity_samples", p.propensity_samples)?)
            .map_err(|_| field_err("policy.propensity_samples", "too large"))?,
        propensity_rse: if p.propensity_rse.is_finite() && (0.0..1.0).contains(&p.propensity_rse) {
            p.propensity_rse
        } else {
            return Err(field_err(
                "policy.propensity_rse",
                format!("must be in [0, 1) (0: always draw propensity_samples), got {}", p.propensity_rse),
            ));
        },
    };

    if raw.models.is_empty() {
        return Err(field_err("models", "at least one model is needed"));
    }
    if raw.models.len() > 255 {
        return Err(field_err("models", "at most 255 models"));
    }
    let mut models: Vec<ModelSpec> = Vec::new();
    for (i, m) in raw.models.into_iter().enumerate() {
        let f = |s: &str| format!("models[{i}].{s}");
        if m.id.is_empty() || m.id.contains('/') {
            return Err(field_err(f("id"), "must be a non-empty name without `/`"));
        }
        if models.iter().any(|x| x.id == m.id) {
            return Err(field_err(f("id"), format!("model `{}` is configured twice", m.id)));
        }
        let mut linear_features = Vec::new();
        let algorithm = match m.algorithm.as_str() {
            "beta" => {
                if m.linear.is_some() {
                    return Err(field_err(f("linear"), "only for algorithm = \"linear\""));
                }
                Algorithm::BetaBernoulli
            }
            "linear" => {
                let l = m.linear.unwrap_or(RawLinear {
                    dim: None,
                    lambda: default_lambda(),
                    hash_seed: 0,
                    features: Vec::new(),
                });
                let max = i64::from(crate::core::linear::MAX_DIM);
                for (k, name) in l.features.iter().enumerate() {
                    if name.is_empty() || l.features[..k].contains(name) {
                        return Err(field_err(
                            f("linear.features"),
                            format!("`{name}` is empty or named twice: every feature once"),
                        ));
                    }
                }
                let named = l.features.len() as i64 + 1;
                if !l.features.is_empty() && named > max {
                    return Err(field_err(
                        f("linear.features"),
                        format!("at most {} features, got {}", max - 1, l.features.len()),
                    ));
                }
                let dim = match l.dim {
                    Some(d) if !l.features.is_empty() && d != named => {
                        return Err(field_err(
                            f("linear.dim"),
                            format!("is {named} with {} named features (the intercept and one slot each), got {d}; leave it out", l.features.len()),
                        ));
                    }
                    Some(d) if !(1..=max).contains(&d) => {
                        return Err(field_err(f("linear.dim"), format!("must be in 1..={max}, got {d}")));
                    }
                    Some(d) => d,
                    None if l.features.is_empty() => default_dim(),
                    None => named,
                };
                linear_features = l.features;
                Algorithm::Linear {
                    dim: dim as u32,
                    lambda: positive(&f("linear.lambda"), l.lambda)?,
                    hash_seed: l.hash_seed,
                }
            }
            other => return Err(field_err(f("algorithm"), format!("`{other}` is not one of beta, linear"))),
        };
        let position = match m.position_model.as_str() {
            "pbm" => {
                match m.examination {
                    None => PositionModel::Pbm(Examination::Fixed(vec![1.0])),
                    Some(toml::Value::String(s)) if s == "estimated" => {
                        if matches!(algorithm, Algorithm::Linear { .. }) {
                            return Err(field_err(f("examination"), "estimated examination is only supported for algorithm = \"beta\"; give weights"));
                        }
                        PositionModel::Pbm(Examination::Estimated)
                    }
                    Some(toml::Value::Array(a)) => {
                        let mut w = Vec::new();
                        for (k, v) in a.iter().enumerate() {
                            let x = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
                            match x {
                                Some(x) if x > 0.0 && x <= 1.0 => w.push(x),
                                _ => {
                                    return Err(field_err(
                                        format!("models[{i}].examination[{k}]"),
                                        "must be a number in (0, 1]",
                                    ))
                                }
                            }
                        }
                        if w.is_empty() {
                            return Err(field_err(f("examination"), "needs at least one weight"));
                        }
                        PositionModel::Pbm(Examination::Fixed(w))
                    }
                    Some(_) => {
                        return Err(field_err(f("examination"), "must be a list of weights or \"estimated\""))
                    }
                }
            }
            "cascade" => {
                if m.examination.is_some() {
                    return Err(field_err(f("examination"), "only for position_model = \"pbm\""));
                }
                PositionModel::Cascade
            }
            other => {
                return Err(field_err(f("position_model"), format!("`{other}` is not one of pbm, cascade")))
            }
        };
        let half_life_ms = duration(&f("half_life"), &m.half_life)?;
        // Without a configured prior a segment gets one fitted from the model's own arms
        // (empirical Bayes); Beta(1, 1) is then only the fallback for too little data.
        let (prior_v, empirical_prior) = match m.prior {
            None => (Prior { alpha: 1.0, beta: 1.0 }, true),
            Some(toml::Value::String(s)) if s == "empirical" => (Prior { alpha: 1.0, beta: 1.0 }, true),
            Some(v @ toml::Value::Table(_)) => {
                let raw: RawPrior = v.try_into().map_err(|e: toml::de::Error| {
                    field_err(f("prior"), format!("{}; expected {{ alpha = …, beta = … }}", e.message()))
                })?;
                (prior(&f("prior"), raw)?, false)
            }
            Some(other) => {
                return Err(field_err(
                    f("prior"),
                    format!("`{other}` is neither \"empirical\" nor {{ alpha = …, beta = … }}"),
                ))
            }
        };
        let mut segment_priors = BTreeMap::new();
        for (seg, p) in m.segment_priors {
            let pv = prior(&f(&format!("segment_priors.{seg}")), p)?;
            segment_priors.insert(seg, pv);
        }
        models.push(ModelSpec {
            id: m.id,
            algorithm,
            position,
            half_life_ms,
            prior: prior_v,
            segment_priors,
            empirical_prior,
            rewards: rewards.clone(),
            linear_features,
        });
    }
    let kafka = validate_kafka(raw.kafka, &topics)?;
    let serving = validate_serving(raw.serving)?;
    Ok(Config { topics, kafka, core: CoreSpec { models, rewards, join, limits }, policy, serving })
}

fn validate_serving(s: RawServing) -> Result<ServingSpec, ConfigError> {
    let listen = s.listen.parse().map_err(|_| {
        field_err("serving.listen", format!("`{}` is not an address such as 127.0.0.1:8080", s.listen))
    })?;
    if !(0.0..=1.0).contains(&s.holdout_share) {
        return Err(field_err(
            "serving.holdout_share",
            format!("must be in [0, 1], got {}", s.holdout_share),
        ));
    }
    let produce_timeout_ms = duration("serving.produce_timeout", &s.produce_timeout)?;
    // librdkafka's message.timeout.ms: above linger.ms, within an i32.
    if !(10..=i64::from(i32::MAX)).contains(&produce_timeout_ms) {
        return Err(field_err(
            "serving.produce_timeout",
            format!("must be between 10ms and {}ms, got {produce_timeout_ms}ms", i32::MAX),
        ));
    }
    let max_candidates = count("serving.max_candidates", s.max_candidates)?;
    if max_candidates > 100_000 {
        return Err(field_err("serving.max_candidates", format!("at most 100000, got {max_candidates}")));
    }
    let max_slate_size = count("serving.max_slate_size", s.max_slate_size)?;
    // The processor dead-letters longer slates (`bad_slate`): a node must not log them.
    let longest = crate::core::event::MAX_SLATE_LEN;
    if max_slate_size > longest {
        return Err(field_err(
            "serving.max_slate_size",
            format!("at most {longest} (the longest slate the processor accepts), got {max_slate_size}"),
        ));
    }
    let max_body_bytes = count("serving.max_body_bytes", s.max_body_bytes)?;
    if max_body_bytes < 1024 {
        return Err(field_err("serving.max_body_bytes", format!("at least 1024, got {max_body_bytes}")));
    }
    Ok(ServingSpec {
        listen,
        max_candidates,
        max_slate_size,
        max_body_bytes,
        holdout_share: s.holdout_share,
        cold_start: s.cold_start,
        produce_timeout_ms,
    })
}

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT_MS: i64 = 45_000;

fn validate_kafka(k: RawKafka, topics: &[TopicSpec]) -> Result<KafkaSpec, ConfigError> {
    let non_empty = |field: &str, v: String| {
        if v.trim().is_empty() {
            Err(field_err(field, "must not be empty"))
        } else {
            Ok(v)
        }
    };
    let instance_id = match k.instance_id {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        other => {
            return Err(field_err("kafka.instance_id", format!("must be a name or number, got {other}")))
        }
    };
    let snapshot_topic = non_empty("kafka.snapshot_topic", k.snapshot_topic)?;
    let dead_letter_topic = non_empty("kafka.dead_letter_topic", k.dead_letter_topic)?;
    let changelog_topic = match k.changelog_topic {
        None => format!("{snapshot_topic}-changelog"),
        Some(t) => non_empty("kafka.changelog_topic", t)?,
    };
    let outputs = [
        ("kafka.snapshot_topic", &snapshot_topic),
        ("kafka.dead_letter_topic", &dead_letter_topic),
        ("kafka.changelog_topic", &changelog_topic),
    ];
    for (i, (field, t)) in outputs.iter().enumerate() {
        if topics.iter().any(|input| &input.name == *t) {
            return Err(field_err(*field, format!("`{t}` is also an input topic")));
        }
        if let Some((other, _)) = outputs[..i].iter().find(|(_, o)| o == t) {
            return Err(field_err(*field, format!("`{t}` is also {other}")));
        }
    }
    let positive_ms = |field: &str, s: &str| {
        let v = duration(field, s)?;
        if v > 0 {
            Ok(v)
        } else {
            Err(field_err(field, "must be positive"))
        }
    };
    let max_record_bytes = count("kafka.max_record_bytes", k.max_record_bytes)?;
    if max_record_bytes < 1024 {
        return Err(field_err("kafka.max_record_bytes", "must be at least 1024"));
    }
    let metrics_address = if k.metrics_address.trim().is_empty() {
        None
    } else {
        Some(k.metrics_address.parse().map_err(|_| {
            field_err(
                "kafka.metrics_address",
                format!("`{}` is not an address such as 127.0.0.1:9464", k.metrics_address),
            )
        })?)
    };
    let properties = librdkafka_properties("kafka.properties", k.properties)?;
    let consumer_properties = librdkafka_properties("kafka.consumer_properties", k.consumer_properties)?;
    let producer_properties = librdkafka_properties("kafka.producer_properties", k.producer_properties)?;
    let transaction_timeout_ms = positive_ms("kafka.transaction_timeout", &k.transaction_timeout)?;
    // Restore hands explicit offsets to the assignment. That is safe against a zombie (an old
    // owner whose transaction is still open) only if the broker aborts that transaction before
    // the group can give the partition to someone else, i.e. before the zombie's session
    // expires: the transaction timeout must be the shorter one.
    let (section, session_timeout) = match consumer_properties.get("session.timeout.ms") {
        Some(v) => ("kafka.consumer_properties", Some(v)),
        None => ("kafka.properties", properties.get("session.timeout.ms")),
    };
    let session_timeout_ms = match session_timeout {
        None => DEFAULT_SESSION_TIMEOUT_MS,
        Some(v) => v.trim().parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
            field_err(
                format!("{section}.session.timeout.ms"),
                format!("`{v}` is not a positive number of ms"),
            )
        })?,
    };
    if transaction_timeout_ms >= session_timeout_ms {
        return Err(field_err(
            "kafka.transaction_timeout",
            format!(
                "{transaction_timeout_ms} ms must be shorter than the consumer's session timeout \
                 ({section}.\"session.timeout.ms\" = {session_timeout_ms} ms): otherwise a \
                 partition can move to a new owner while the old owner's transaction is still open"
            ),
        ));
    }
    Ok(KafkaSpec {
        bootstrap_servers: non_empty("kafka.bootstrap_servers", k.bootstrap_servers)?,
        group_id: non_empty("kafka.group_id", k.group_id)?,
        instance_id: non_empty("kafka.instance_id", instance_id)?,
        snapshot_topic,
        changelog_topic,
        dead_letter_topic,
        create_topics: k.create_topics,
        replication_factor: i32::try_from(count("kafka.replication_factor", k.replication_factor)?)
            .map_err(|_| field_err("kafka.replication_factor", "too large"))?,
        snapshot_interval_ms: positive_ms("kafka.snapshot_interval", &k.snapshot_interval)?,
        transaction_timeout_ms,
        max_record_bytes,
        restore_timeout_ms: positive_ms("kafka.restore_timeout", &k.restore_timeout)?,
        prefetch_kbytes: count("kafka.prefetch_kbytes", k.prefetch_kbytes)?,
        partition_queue_records: count("kafka.partition_queue_records", k.partition_queue_records)?,
        max_idle_ms: duration("kafka.max_idle", &k.max_idle)?,
        metrics_address,
        properties,
        consumer_properties,
        producer_properties,
    })
}

/// A section of librdkafka properties as text (librdkafka takes every value as a string).
/// Nested tables are dotted names: `security.protocol = "SSL"` without quotes is a table in
/// TOML, and `BANDITFLOW__KAFKA__PROPERTIES__SASL__PASSWORD` arrives as one.
fn librdkafka_properties(
    section: &str,
    raw: BTreeMap<String, toml::Value>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    fn walk(
        section: &str,
        prefix: &str,
        raw: impl IntoIterator<Item = (String, toml::Value)>,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), ConfigError> {
        for (name, v) in raw {
            let name = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Table(t) => {
                    walk(section, &name, t, out)?;
                    continue;
                }
                _ => {
                    return Err(field_err(format!("{section}.{name}"), "must be a string, number or boolean"))
                }
            };
            out.insert(name, text);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(section, "", raw, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_layers(
            Some(("test.toml", file)),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn a_missing_config_file_is_named_once_with_its_cause_once() {
        let e = Config::load(Some(std::path::Path::new("/nonexistent/my.toml")), Vec::new())
            .expect_err("no file");
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert!(chain.starts_with("config: cannot read /nonexistent/my.toml: "), "{chain}");
        assert_eq!(chain.matches("os error 2").count(), 1, "{chain}");
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = load("", &[]).expect("defaults validate");
        assert!(!c.core.models.is_empty());
        assert_eq!(c.core.join.funnel, crate::core::params::DEFAULT_FUNNEL, "the documented funnel");
        let none = load("[join.funnel]\nadd_to_cart = []\npurchase = []\nreturn = []", &[]).expect("valid");
        assert_eq!(none.core.join.funnel, [0; 4], "no funnel: every kind open");
    }

    #[test]
    fn bad_fields_are_named() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[join]\ngrace = \"soon\"", &[], "join.grace"),
            ("[join.funnel]\nclick = [\"view\"]", &[], "join.funnel.click"),
            ("[join.funnel]\nbuy = []", &[], "join.funnel.buy"),
            ("[join.funnel]\nreturn = [\"return\"]", &[], "join.funnel.return"),
            ("[join.funnel]\nclick = [\"return\"]", &[], "join.funnel.click"),
            ("[join]\nmax_impressions = 0", &[], "join.max_impressions"),
            ("[policy]\nepsilon = 2.0", &[], "policy.epsilon"),
            ("[policy]\nstrategy = \"random\"", &[], "policy.strategy"),
            ("[[models]]\nid = \"m\"\nhalf_life = \"x\"", &[], "models[0].half_life"),
            ("[[models]]\nid = \"m\"\nexamination = [1.0, 1.5]", &[], "models[0].examination[1]"),
            ("[[models]]\nid = \"m\"\nprior = { alpha = -1, beta = 1 }", &[], "models[0].prior.alpha"),
            (
                "[[models]]\nid = \"m\"\nalgorithm = \"linear\"\nexamination = \"estimated\"",
                &[],
                "models[0].examination",
            ),
            ("[join]\ngrase = \"1m\"", &[], "join.grase"),
            ("grase = 1", &[], "grase"),
            ("[[models]]\nid = \"m\"\nhalf_life = 7", &[], "models[0].half_life"),
            ("[[models]]\nid = \"m\"\nalgorithm = \"linear\"\nlinear = { dim = 33 }", &[], "models[0].linear.dim"),
            ("[[models]]\nid = \"m\"\nalgorithm = \"linear\"\nlinear = { dim = 3, features = [\"a\"] }", &[], "models[0].linear.dim"),
            ("[[models]]\nid = \"m\"\nalgorithm = \"linear\"\nlinear = { features = [\"a\", \"a\"] }", &[], "models[0].linear.features"),
            ("[[models]]\nid = \"m\"\nalgorithm = \"linear\"\nlinear = { features = [\"\"] }", &[], "models[0].linear.features"),
            ("", &[("BANDITFLOW__JOIN__GRACE", "later")], "join.grace"),
            ("", &[("BANDITFLOW__MODELS__5__HALF_LIFE", "1d")], "models.5.half_life"),
            ("[rewards.click]\nreward = 1\nwindow = \"-1s\"", &[], "rewards.click.window"),
            ("[kafka]\nsnapshot_interval = \"0s\"", &[], "kafka.snapshot_interval"),
            ("[kafka]\nmetrics_address = \"localhost\"", &[], "kafka.metrics_address"),
            ("[serving]\nlisten = \"localhost\"", &[], "serving.listen"),
            ("[serving]\nholdout_share = 1.5", &[], "serving.holdout_share"),
            ("[serving]\nmax_candidates = 0", &[], "serving.max_candidates"),
            ("[serving]\nproduce_timeout = \"soon\"", &[], "serving.produce_timeout"),
            ("[policy]\npropensity_rse = 1.0", &[], "policy.propensity_rse"),
            ("[kafka]\nsnapshot_topic = \"feedback\"", &[], "kafka.snapshot_topic"),
            ("[kafka]\nchangelog_topic = \"banditflow-snapshots\"", &[], "kafka.changelog_topic"),
            ("[kafka]\nchangelog_topic = \"banditflow-dead-letters\"", &[], "kafka.changelog_topic"),
            ("[kafka]\nchangelog_topic = \"\"", &[], "kafka.changelog_topic"),
            ("", &[("BANDITFLOW__KAFKA__GROUP_ID", "\"\"")], "kafka.group_id"),
            (
                "[kafka]\ntransaction_timeout = \"10s\"\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"",
                &[],
                "kafka.transaction_timeout",
            ),
            ("[kafka]\ntransaction_timeout = \"50s\"", &[], "kafka.transaction_timeout"),
            ("[limits]\npropensity_floor = 0.0", &[], "limits.propensity_floor"),
            ("[rewards]\nscale = 1e-310", &[], "rewards.scale"),
            ("[limits]\nmax_event_time_skew = \"0s\"", &[], "limits.max_event_time_skew"),
            ("[limits]\nmax_arms_per_model = 0", &[], "limits.max_arms_per_model"),
            ("[rewards.purchase]\nreward = 5\nvalue_weight = 1e300\nwindow = \"7d\"", &[], "rewards.purchase.value_weight"),
            ("[rewards.click]\nreward = -1e9\nwindow = \"1h\"", &[], "rewards.click.reward"),
        ];
        for (file, env, field) in cases {
            match load(file, env) {
                Err(ConfigError::Field { field: f, message }) => {
                    assert_eq!(&f, field, "for {file:?} {env:?}: {message}")
                }
                other => panic!("expected error naming {field} for {file:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_environment_accepts_what_the_file_accepts() {
        // Regression: a bare number for a string field was refused as "invalid type: integer
        // `300000`", naming the value instead of the field.
        let c = load(
            "",
            &[
                ("BANDITFLOW__JOIN__GRACE", "300000"),
                ("BANDITFLOW__KAFKA__GROUP_ID", "123"),
                ("BANDITFLOW__KAFKA__INSTANCE_ID", "7"),
                ("BANDITFLOW__MODELS__0__ID", "2026"),
                ("BANDITFLOW__SERVING__HOLDOUT_SHARE", "0.1"),
                ("BANDITFLOW__SERVING__COLD_START", "true"),
                ("BANDITFLOW__KAFKA__PROPERTIES__LINGER__MS", "5"),
            ],
        )
        .expect("valid");
        assert_eq!(c.core.join.grace_ms, 300_000);
        assert_eq!(c.kafka.group_id, "123");
        assert_eq!(c.kafka.instance_id, "7");
        assert_eq!(c.core.models[0].id, "2026");
        assert_eq!(c.serving.holdout_share, 0.1);
        assert!(c.serving.cold_start);
        assert_eq!(
            c.kafka.properties.get("linger.ms").map(String::as_str),
            Some("5"),
            "dotted names from the environment"
        );
        // A number where a number belongs is still checked as one, and named by its path.
        match load("", &[("BANDITFLOW__SERVING__HOLDOUT_SHARE", "lots")]) {
            Err(ConfigError::Field { field, message }) => {
                assert_eq!(field, "serving.holdout_share", "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn environment_overrides_file() {
        let c = load(
            "[join]\ngrace = \"1m\"",
            &[("BANDITFLOW__JOIN__GRACE", "2m"), ("BANDITFLOW__MODELS__0__HALF_LIFE", "1d")],
        )
        .expect("valid");
        assert_eq!(c.core.join.grace_ms, 120_000);
        assert_eq!(c.core.models[0].half_life_ms, 86_400_000);
        let c = load(
            "[kafka.properties]\n\"security.protocol\" = \"SSL\"",
            &[
                ("BANDITFLOW__KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1234"),
                ("BANDITFLOW__KAFKA__INSTANCE_ID", "7"),
            ],
        )
        .expect("valid");
        assert_eq!(c.kafka.bootstrap_servers, "127.0.0.1:1234");
        assert_eq!(c.kafka.instance_id, "7");
        assert_eq!(c.kafka.properties.get("security.protocol").map(String::as_str), Some("SSL"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
        assert_eq!(parse_duration_ms("1500"), Some(1500));
        assert_eq!(parse_duration_ms("1w"), None);
        assert_eq!(parse_duration_ms(""), None);
    }
}
