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
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

pub const ENV_PREFIX: &str = "BANDITFLOW__";

mod validate;
pub use validate::parse_duration_ms;
use validate::validate;

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
    read_merged: bool,
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
    /// Follow the merged-model topic (`kafka.merged_topic`) instead of the snapshot topic.
    pub read_merged: bool,
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
    #[serde(default)]
    merged_topic: Option<String>,
    #[serde(default)]
    groups_topic: Option<String>,
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
    /// The merged-model topic `banditflow aggregate` writes and nodes with
    /// `serving.read_merged` read: one merged model per model id. Default
    /// `<snapshot_topic>-merged`.
    pub merged_topic: String,
    /// The group merges `banditflow aggregate --group K` writes and `--from-groups` merges
    /// into `merged_topic`. Default `<snapshot_topic>-groups`.
    pub groups_topic: String,
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
        let k = &c.kafka;
        assert_eq!(
            [&k.changelog_topic, &k.merged_topic, &k.groups_topic],
            ["banditflow-snapshots-changelog", "banditflow-snapshots-merged", "banditflow-snapshots-groups"],
            "the topics named after the snapshot topic"
        );
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
            ("[kafka]\ngroups_topic = \"banditflow-snapshots-merged\"", &[], "kafka.groups_topic"),
            ("[kafka]\ngroups_topic = \"impressions\"", &[], "kafka.groups_topic"),
            ("[kafka]\ngroups_topic = \"\"", &[], "kafka.groups_topic"),
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
