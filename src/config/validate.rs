//! Validation: the raw, deserialized configuration into the core's parameters, each rule
//! refusing a value with an error that names its field.

use super::*;

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

pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
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
        read_merged: s.read_merged,
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
    let merged_topic = match k.merged_topic {
        None => format!("{snapshot_topic}-merged"),
        Some(t) => non_empty("kafka.merged_topic", t)?,
    };
    let groups_topic = match k.groups_topic {
        None => format!("{snapshot_topic}-groups"),
        Some(t) => non_empty("kafka.groups_topic", t)?,
    };
    let outputs = [
        ("kafka.snapshot_topic", &snapshot_topic),
        ("kafka.dead_letter_topic", &dead_letter_topic),
        ("kafka.changelog_topic", &changelog_topic),
        ("kafka.merged_topic", &merged_topic),
        ("kafka.groups_topic", &groups_topic),
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
        merged_topic,
        groups_topic,
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
