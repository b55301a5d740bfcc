//! A ranking node: validates rank and feedback requests, ranks with the newest merged model
//! (or the holdout baseline), and logs impressions and feedback to the input topics before it
//! answers. The HTTP layer (`serving::http`) and the demo's simulator both call this.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::config::Config;
use crate::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use crate::core::model::ModelShard;
use crate::core::params::ModelSpec;
use crate::core::policy::{self, RankRequest as PolicyRequest};

use super::subscriber::{Catalog, ServingModel, WrittenRecords};
use crate::core::event::InvalidEvent;
use crate::core::partition;
use crate::telemetry::serving::{
    FeedbackLogged, ImpressionLogged, KafkaAnswered, ModelNotLoaded, ProduceFailed,
};

/// The problem for a record the processor's validator refuses. The request's own fields were
/// checked before, so this names what the node built from them: a field the processor's
/// `[limits]` refuse (422), or the node's own impression id (its configuration: 500).
fn problem_of(e: &InvalidEvent) -> Problem {
    match e {
        InvalidEvent::IdTooLong { field: "impression_id", .. } => Problem::new(
            500,
            "node-misconfigured",
            "This node's impression ids break the processor's limits",
            format!("{e}; raise limits.max_id_bytes"),
        ),
        InvalidEvent::IdTooLong { field, .. } => Problem::invalid(*field, e.to_string()),
        other => Problem::invalid(other.code(), other.to_string()),
    }
}

/// The body of `POST /v1/rank`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RankRequest {
    pub model: String,
    pub candidates: Vec<String>,
    #[serde(default)]
    pub slate_size: Option<u64>,
    #[serde(default)]
    pub segment: Option<String>,
    #[serde(default)]
    pub features: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    pub user_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementOut {
    pub item_id: String,
    pub position: u32,
    pub propensity: f64,
    pub score: f64,
}

/// The answer to `POST /v1/rank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankResponse {
    pub impression_id: String,
    pub model: String,
    /// "treatment" or "holdout".
    pub variant: String,
    pub model_version: u64,
    pub slate: Vec<PlacementOut>,
}

/// The body of `POST /v1/feedback`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    pub impression_id: String,
    pub item_id: String,
    pub position: u64,
    pub kind: String,
    #[serde(default)]
    pub value: Option<f64>,
    #[serde(default)]
    pub event_time_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackAccepted {
    pub impression_id: String,
    pub kind: String,
}

/// An RFC 9457 problem: every 4xx/5xx answer of the node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    pub fn new(status: u16, code: &str, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            type_: format!("/problems/{code}"),
            title: title.to_string(),
            status,
            detail: detail.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(422, "invalid-request", "The request breaks a rule of the API", detail);
        p.field = Some(field.into());
        p
    }

    /// The problem's short code (the last segment of its type).
    pub fn code(&self) -> &str {
        self.type_.rsplit('/').next().unwrap_or("")
    }
}

use crate::core::event::{MAX_ABS_VALUE as MAX_ABS_NUMBER, MIN_EVENT_TIME_MS};

const MAX_POSITION: u64 = 1000;
/// Work of a Thompson request, Monte Carlo rankings × (candidates + 4 × slate size) (a ranking
/// draws every candidate and evaluates two CDFs, each worth about two draws, per placement),
/// above which it is ranked with its worker's other tasks moved away (`block_in_place`): 4,096
/// is ~0.2–0.4 ms of CPU (BENCHMARKS.md), so 100 candidates into 10 places at the default 16
/// rankings rank in place, 500 candidates or a slate of 100 do not.
const LONG_RANK_WORK: u64 = 4096;
/// The longest impression id a node makes: 16 hex digits of prefix, `-`, a 64-bit counter in hex.
pub const IMPRESSION_ID_BYTES: usize = 16 + 1 + 16;
/// Seed of the holdout hash (fixed: the assignment of a user key never changes).
const HOLDOUT_SEED: u64 = 0x686f_6c64_6f75_7421;

/// Where and how one kind of record is written.
#[derive(Debug, Clone)]
struct Sink {
    topic: String,
    role: TopicRole,
    encoding: Encoding,
}

/// A validated rank call, ranked: the impression, its record as the processor will read it
/// (checked by the processor's own validator), and the answer.
pub struct Ranked {
    pub impression: Impression,
    pub payload: Vec<u8>,
    pub response: RankResponse,
}

pub struct Node {
    config: Arc<Config>,
    catalog: Arc<ArcSwap<Catalog>>,
    producer: Option<FutureProducer>,
    impressions: Sink,
    feedback: Sink,
    id_prefix: String,
    counter: AtomicU64,
    /// Where acknowledged records are noted for freshness (event → visible to ranking).
    written: Option<Arc<WrittenRecords>>,
}

impl Node {
    /// A node ranking from `catalog`. `producer` is `None` only for in-process benchmarks
    /// that measure ranking alone; `rank` and `feedback` then fail with 503.
    pub fn new(
        config: Arc<Config>,
        catalog: Arc<ArcSwap<Catalog>>,
        producer: Option<FutureProducer>,
    ) -> Node {
        let sink = |want: TopicRole| {
            let t = config
                .topics
                .iter()
                .find(|t| t.role == want)
                .or_else(|| config.topics.iter().find(|t| t.role == TopicRole::Combined))
                .unwrap_or(&config.topics[0]);
            Sink { topic: t.name.clone(), role: t.role, encoding: t.encoding }
        };
        let impressions = sink(TopicRole::Impressions);
        let feedback = sink(TopicRole::Feedback);
        // Impression ids are `<node prefix>-<counter>`: the prefix is a hash of this process's
        // pid, start time and host, so ids of nodes and restarts do not collide.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let start =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let id_prefix =
            format!("{:016x}", xxh3_64(format!("{}/{start}/{host}", std::process::id()).as_bytes()));
        Node {
            config,
            catalog,
            producer,
            impressions,
            feedback,
            id_prefix,
            counter: AtomicU64::new(0),
            written: None,
        }
    }

    /// Notes every acknowledged record in `written` (the subscriber measures when it becomes
    /// visible to ranking).
    pub fn with_written(mut self, written: Arc<WrittenRecords>) -> Node {
        self.written = Some(written);
        self
    }

    /// The topics this node writes to.
    pub fn topics(&self) -> Vec<&str> {
        let mut t = vec![self.impressions.topic.as_str(), self.feedback.topic.as_str()];
        t.dedup();
        t
    }

    /// A fatal error of the producer (idempotence broken, fenced): the node can no longer log
    /// impressions and must not be ready.
    pub fn producer_fatal(&self) -> Option<String> {
        use rdkafka::producer::Producer as _;
        self.producer
            .as_ref()
            .and_then(|p| p.client().fatal_error())
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The topic feedback is written to.
    pub fn feedback_topic(&self) -> &str {
        &self.feedback.topic
    }

    pub fn catalog(&self) -> &ArcSwap<Catalog> {
        &self.catalog
    }

    fn spec(&self, model: &str) -> Option<&ModelSpec> {
        self.config.core.models.iter().find(|m| m.id == model)
    }

    /// A new impression id, unique per node: at most [`IMPRESSION_ID_BYTES`] bytes.
    pub fn next_impression_id(&self) -> String {
        format!("{}-{:x}", self.id_prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// True when `key` falls into the holdout share (by hash, so a user stays in one variant).
    pub fn is_holdout(&self, key: &str) -> bool {
        let share = self.config.serving.holdout_share;
        let u = (xxh3_64_with_seed(key.as_bytes(), HOLDOUT_SEED) >> 11) as f64 / (1u64 << 53) as f64;
        u < share
    }

    /// Validates and ranks, without writing anything. `now_ms` is the impression's time.
    pub fn rank_only(
        &self,
        req: &RankRequest,
        impression_id: String,
        now_ms: i64,
    ) -> Result<Ranked, Problem> {
        let limits = &self.config.core.limits;
        let serving = &self.config.serving;
        let id_ok = |field: &str, s: &str| -> Result<(), Problem> {
            if s.is_empty() {
                return Err(Problem::invalid(field, format!("`{field}` must not be empty")));
            }
            if s.len() > limits.max_id_bytes {
                return Err(Problem::invalid(
                    field,
                    format!("`{field}` is {} bytes; at most {} are allowed", s.len(), limits.max_id_bytes),
                ));
            }
            Ok(())
        };
        id_ok("model", &req.model)?;
        let Some(spec) = self.spec(&req.model) else {
            let mut p = Problem::new(
                404,
                "unknown-model",
                "Unknown model",
                format!(
                    "model `{}` is not configured on this node (configured: {})",
                    req.model,
                    self.config.core.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            );
            p.field = Some("model".into());
            return Err(p);
        };
        if req.candidates.is_empty() {
            return Err(Problem::invalid("candidates", "at least one candidate is needed"));
        }
        if req.candidates.len() > serving.max_candidates {
            return Err(Problem::invalid(
                "candidates",
                format!(
                    "{} candidates; this node ranks at most {}",
                    req.candidates.len(),
                    serving.max_candidates
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(req.candidates.len());
        for (i, c) in req.candidates.iter().enumerate() {
            id_ok(&format!("candidates[{i}]"), c)?;
            if !seen.insert(c.as_str()) {
                return Err(Problem::invalid(
                    format!("candidates[{i}]"),
                    format!("candidate `{c}` is listed twice; every candidate id must be unique"),
                ));
            }
        }
        let slate_size = match req.slate_size {
            None => 10.min(serving.max_slate_size),
            Some(0) => return Err(Problem::invalid("slate_size", "must be at least 1")),
            Some(s) if s > serving.max_slate_size as u64 => {
                return Err(Problem::invalid(
                    "slate_size",
                    format!("{s} is more than this node's maximum slate of {}", serving.max_slate_size),
                ))
            }
            Some(s) => s as usize,
        };
        let segment = req.segment.as_deref().unwrap_or("");
        if segment.len() > limits.max_id_bytes {
            return Err(Problem::invalid("segment", format!("at most {} bytes", limits.max_id_bytes)));
        }
        let mut features = Vec::new();
        if let Some(f) = &req.features {
            if f.len() > limits.max_features {
                return Err(Problem::invalid(
                    "features",
                    format!("{} features; at most {} are allowed", f.len(), limits.max_features),
                ));
            }
            for (name, v) in f {
                id_ok(&format!("features.{name}"), name)?;
                if !v.is_finite() || v.abs() > MAX_ABS_NUMBER {
                    return Err(Problem::invalid(
                        format!("features.{name}"),
                        format!("must be a finite number within ±1e12, got {v}"),
                    ));
                }
                features.push((name.clone(), *v));
            }
        }
        if let Some(u) = &req.user_key {
            id_ok("user_key", u)?;
        }
        let holdout = self.is_holdout(req.user_key.as_deref().unwrap_or(&impression_id));
        let catalog = self.catalog.load();
        let loaded: Option<&Arc<ServingModel>> = catalog.models.get(&req.model);
        let empty;
        let (model, version, model_spec, prior, linear, examination) = match loaded {
            Some(m) => (
                &m.merged.shard,
                m.version,
                &m.merged.spec,
                Some(m.priors.for_segment(segment)),
                m.linear_posterior(now_ms),
                m.examination.as_deref(),
            ),
            None if serving.cold_start => {
                empty = ModelShard::new(spec);
                (&empty, 0, spec, None, None, None)
            }
            None => {
                ModelNotLoaded { model: &req.model }.emit();
                return Err(Problem::new(
                    503,
                    "model-not-loaded",
                    "No snapshot of the model has been loaded yet",
                    format!(
                        "no snapshot of model `{}` has been read from the snapshot topic yet, and serving.cold_start is off; retry shortly",
                        req.model
                    ),
                ));
            }
        };
        let placements: Vec<PlacementOut> = if holdout {
            // The non-learning baseline: the candidates in the order the request gives them.
            req.candidates
                .iter()
                .take(slate_size)
                .enumerate()
                .map(|(i, c)| PlacementOut {
                    item_id: c.clone(),
                    position: i as u32 + 1,
                    propensity: 1.0,
                    score: 0.0,
                })
                .collect()
        } else {
            let preq = PolicyRequest {
                segment,
                features: &features,
                candidates: &req.candidates,
                slate_size,
                // The node's own clock: a model that stopped learning decays towards its prior.
                now_ms,
                seed: xxh3_64(impression_id.as_bytes()),
                prior,
                linear: linear.as_ref().map(|c| &c.table),
                examination,
            };
            policy::rank(model_spec, model, &self.config.policy, &preq)
                .into_iter()
                .map(|p| PlacementOut {
                    item_id: p.item_id,
                    position: p.position,
                    propensity: p.propensity,
                    score: p.score,
                })
                .collect()
        };
        let variant = if holdout { Variant::Holdout } else { Variant::Treatment };
        let impression = Impression {
            impression_id: impression_id.clone(),
            time_ms: now_ms,
            model_id: req.model.clone(),
            model_version: version,
            variant: variant.clone(),
            segment: segment.to_string(),
            features,
            slate: placements
                .iter()
                .map(|p| SlateEntry {
                    item_id: p.item_id.clone(),
                    position: p.position,
                    propensity: p.propensity,
                    score: p.score,
                })
                .collect(),
            opted_out: false,
        };
        let payload = self.checked(&self.impressions, Event::Impression(impression.clone()), now_ms)?;
        Ok(Ranked {
            impression,
            payload,
            response: RankResponse {
                impression_id,
                model: req.model.clone(),
                variant: variant.to_string(),
                model_version: version,
                slate: placements,
            },
        })
    }

    /// Ranks and writes the impression; answers only once Kafka has acknowledged it.
    pub async fn rank(&self, req: &RankRequest, now_ms: i64) -> Result<RankResponse, Problem> {
        let id = self.next_impression_id();
        // Thompson sampling of many candidates with many Monte Carlo rankings can spend a
        // millisecond of CPU: on a multi-threaded runtime such a request runs with the worker's
        // other tasks moved away, so health checks and other requests are not held up behind it.
        // Handing the worker over costs tens of µs, more than a request of the default size
        // (16 rankings) takes, so smaller requests rank in place.
        let on_workers = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let n = req.candidates.len() as u64;
        let slate = req.slate_size.unwrap_or(10).min(n);
        let long = matches!(self.config.policy.strategy, policy::Strategy::Thompson)
            && u64::from(self.config.policy.propensity_samples).saturating_mul(n.saturating_add(4 * slate))
                > LONG_RANK_WORK;
        let ranked = if on_workers && long {
            tokio::task::block_in_place(|| self.rank_only(req, id, now_ms))?
        } else {
            self.rank_only(req, id, now_ms)?
        };
        self.write(&self.impressions, &ranked.impression.impression_id, &ranked.payload).await?;
        ImpressionLogged { model: &ranked.response.model, variant: &ranked.response.variant }.emit();
        Ok(ranked.response)
    }

    /// Validates a feedback request into the event the processor will read.
    pub fn feedback_event(&self, req: &FeedbackRequest, now_ms: i64) -> Result<Feedback, Problem> {
        let max = self.config.core.limits.max_id_bytes;
        for (field, s) in [("impression_id", &req.impression_id), ("item_id", &req.item_id)] {
            if s.is_empty() || s.len() > max {
                return Err(Problem::invalid(
                    field,
                    format!("`{field}` must have 1 to {max} bytes, got {}", s.len()),
                ));
            }
        }
        if req.position == 0 || req.position > MAX_POSITION {
            return Err(Problem::invalid(
                "position",
                format!("must be within 1..={MAX_POSITION}, got {}", req.position),
            ));
        }
        let Some(kind) = FeedbackKind::parse(&req.kind) else {
            return Err(Problem::invalid(
                "kind",
                format!("`{}` is not one of click, add_to_cart, purchase, return", req.kind),
            ));
        };
        let value = req.value.unwrap_or(0.0);
        if !value.is_finite() || value.abs() > MAX_ABS_NUMBER {
            return Err(Problem::invalid(
                "value",
                format!("must be a finite number within ±1e12, got {value}"),
            ));
        }
        let time_ms = req.event_time_ms.unwrap_or(now_ms);
        if time_ms < MIN_EVENT_TIME_MS {
            return Err(Problem::invalid(
                "event_time_ms",
                format!("{time_ms} is before 2000-01-01: send Unix milliseconds, not seconds"),
            ));
        }
        let skew = self.config.core.limits.max_event_time_skew_ms;
        if time_ms > now_ms.saturating_add(skew) {
            return Err(Problem::invalid(
                "event_time_ms",
                format!(
                    "{time_ms} is more than {} s ahead of this node's clock (microseconds?)",
                    skew / 1000
                ),
            ));
        }
        Ok(Feedback {
            impression_id: req.impression_id.clone(),
            item_id: req.item_id.clone(),
            position: req.position as u32,
            kind,
            value,
            time_ms,
        })
    }

    /// Validates and writes one feedback event.
    pub async fn feedback(&self, req: &FeedbackRequest, now_ms: i64) -> Result<FeedbackAccepted, Problem> {
        let f = self.feedback_event(req, now_ms)?;
        let kind = f.kind;
        let id = f.impression_id.clone();
        let payload = self.checked(&self.feedback, Event::Feedback(f), now_ms)?;
        self.write(&self.feedback, &id, &payload).await?;
        FeedbackLogged { kind }.emit();
        Ok(FeedbackAccepted { impression_id: id, kind: kind.as_str().to_string() })
    }

    /// Writes one event keyed by impression id (so feedback lands on its impression's
    /// partition) and waits for the acknowledgement. Returns (partition, offset).
    pub async fn write_event(&self, event: &Event) -> Result<(i32, i64), Problem> {
        let (sink, key) = match event {
            Event::Impression(i) => (&self.impressions, i.impression_id.as_str()),
            Event::Feedback(f) => (&self.feedback, f.impression_id.as_str()),
        };
        self.write(sink, key, &event::encode(sink.role, sink.encoding, event)).await
    }

    /// The record of `event` as `sink` carries it, checked by the processor's own decoder and
    /// validator against the same `[limits]`, so a node never logs (and answers for) a record
    /// the processor would dead-letter.
    fn checked(&self, sink: &Sink, event: Event, now_ms: i64) -> Result<Vec<u8>, Problem> {
        let payload = event::encode(sink.role, sink.encoding, &event);
        let checked = event::with_view(sink.role, sink.encoding, &payload, |e| {
            e.and_then(|e| partition::check_bounds(&self.config.core, Some(now_ms), e)).map(drop)
        });
        match checked {
            Ok(()) => Ok(payload),
            Err(e) => Err(problem_of(&e)),
        }
    }

    async fn write(&self, sink: &Sink, key: &str, payload: &[u8]) -> Result<(i32, i64), Problem> {
        let unavailable = |detail: String| {
            ProduceFailed { topic: &sink.topic, error: &detail }.emit();
            Problem::new(503, "kafka-unavailable", "The record could not be written to Kafka", detail)
        };
        let Some(producer) = &self.producer else {
            return Err(unavailable("this node has no Kafka producer".into()));
        };
        let timeout = Duration::from_millis(self.config.serving.produce_timeout_ms as u64);
        // The record timestamp is when the node wrote it (Kafka's CreateTime), not the event
        // time: the processor bounds event times by it.
        let written_ms = crate::kafka::now_ms();
        let record = FutureRecord::to(&sink.topic).key(key).payload(payload).timestamp(written_ms);
        let sent = std::time::Instant::now();
        // librdkafka times out queued records after `message.timeout.ms`, but a request already
        // sent waits for its response up to `request.timeout.ms` (30 s): on a network that
        // swallows packets the answer would wait for that. The request's own deadline is the
        // produce timeout; a record still in flight then may be written later (an impression
        // nobody saw, never an answer for an impression not written).
        let answer = tokio::time::timeout(timeout, producer.send(record, timeout)).await;
        KafkaAnswered { topic: &sink.topic, elapsed: sent.elapsed() }.emit();
        match answer {
            Ok(Ok(delivery)) => {
                if let Some(w) = &self.written {
                    w.written(&sink.topic, delivery.partition, delivery.offset, written_ms);
                }
                Ok((delivery.partition, delivery.offset))
            }
            Ok(Err((e, _))) => Err(unavailable(format!("writing to `{}` failed: {e}", sink.topic))),
            Err(_) => Err(unavailable(format!(
                "Kafka did not acknowledge the record on `{}` within serving.produce_timeout ({timeout:?})",
                sink.topic
            ))),
        }
    }
}
