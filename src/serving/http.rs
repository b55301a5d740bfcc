//! The HTTP API of `banditflow serve` (axum): `POST /v1/rank`, `POST /v1/feedback`,
//! `/healthz`, `/readyz`, `/metrics` and `/openapi.json` (the checked-in `api/openapi.json`).
//! Every error is an RFC 9457 problem (`application/problem+json`) naming the field.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use super::node::{FeedbackRequest, Node, Problem, RankRequest};
use super::subscriber::Subscriber;
use crate::kafka::now_ms;
use crate::telemetry::serving::RequestServed;
use crate::telemetry::Exporter;

/// The OpenAPI document of this API, as checked in.
pub const OPENAPI: &str = include_str!("../../api/openapi.json");

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    /// Renders `/metrics` (None: the endpoint answers 404).
    pub metrics: Option<Arc<Exporter>>,
    /// The snapshot subscriber feeding `node` (None: a catalog filled by hand, as in tests).
    pub subscriber: Option<Arc<Subscriber>>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.node.config().serving.max_body_bytes;
    Router::new()
        .route("/v1/rank", post(rank))
        .route("/v1/feedback", post(feedback))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .fallback(|| async {
            problem(Problem::new(404, "not-found", "No such endpoint", "see /openapi.json for the endpoints"))
        })
        .method_not_allowed_fallback(|| async {
            problem(Problem::new(405, "method-not-allowed", "Method not allowed", "see /openapi.json"))
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn problem(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, serde_json::to_string(&p).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut r = (status, serde_json::to_string(body).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Reads a JSON body into `T`, or the problem that says why not.
fn parse<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Problem> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
        return Err(Problem::new(
            415,
            "unsupported-media-type",
            "The body must be JSON",
            format!("Content-Type is `{ct}`; send application/json"),
        ));
    }
    let body = body.map_err(|r| {
        let status = r.status().as_u16();
        if status == 413 {
            Problem::new(413, "body-too-large", "The body is too large", r.body_text())
        } else {
            Problem::new(status, "unreadable-body", "The body could not be read", r.body_text())
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let mut p = match inner.classify() {
            serde_json::error::Category::Data => Problem::new(
                422,
                "invalid-request",
                "The request breaks a rule of the API",
                inner.to_string(),
            ),
            _ => Problem::new(400, "malformed-json", "The body is not valid JSON", inner.to_string()),
        };
        if path != "." && !path.is_empty() {
            p.field = Some(path);
        } else if let Some(f) = inner.to_string().split('`').nth(1) {
            // "missing field `x`" / "unknown field `x`" are reported at the enclosing object.
            p.field = Some(f.to_string());
        }
        p
    })?;
    Ok(value)
}

async fn rank(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let start = std::time::Instant::now();
    let out = match parse::<RankRequest>(&headers, body) {
        Ok(req) => s.node.rank(&req, now_ms()).await,
        Err(p) => Err(p),
    };
    answer("rank", start, StatusCode::OK, out)
}

async fn feedback(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let start = std::time::Instant::now();
    let out = match parse::<FeedbackRequest>(&headers, body) {
        Ok(req) => s.node.feedback(&req, now_ms()).await,
        Err(p) => Err(p),
    };
    answer("feedback", start, StatusCode::ACCEPTED, out)
}

/// The response to an API call, with its latency and status counted.
fn answer<T: Serialize>(
    endpoint: &'static str,
    start: std::time::Instant,
    ok: StatusCode,
    out: Result<T, Problem>,
) -> Response {
    let status = match &out {
        Ok(_) => ok.as_u16(),
        Err(p) => p.status,
    };
    RequestServed { endpoint, status, elapsed: start.elapsed() }.emit();
    match out {
        Ok(r) => json(ok, &r),
        Err(p) => problem(p),
    }
}

#[derive(Serialize)]
struct ModelReadiness {
    model: String,
    loaded: bool,
    model_version: u64,
    staleness_ms: Option<i64>,
    /// Partition shards merged.
    partitions: usize,
    /// Partitions holding state that the model does not cover yet.
    missing_partitions: Vec<i32>,
    /// "configured" or "empirical" (fitted per segment at each model version).
    prior: &'static str,
    /// The prior in force per segment of the loaded version, and for any other segment.
    #[serde(skip_serializing_if = "Option::is_none")]
    priors: Option<PriorsInForce>,
}

#[derive(Serialize)]
struct PriorInForce {
    alpha: f64,
    beta: f64,
    source: &'static str,
}

#[derive(Serialize)]
struct PriorsInForce {
    by_segment: std::collections::BTreeMap<String, PriorInForce>,
    other_segments: PriorInForce,
}

#[derive(Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    models: Vec<ModelReadiness>,
}

/// Ready when the producer works, the subscriber runs and has read every snapshot partition
/// to the end it saw at start, and every model covers every partition that holds state (or
/// `serving.cold_start` lets models be missing). A node that restarts does not rank with a
/// merge of some of the partitions.
pub fn readiness(s: &AppState) -> Readiness {
    let catalog = s.node.catalog().load();
    let config = s.node.config();
    let now = now_ms();
    let mut reason = s.node.producer_fatal().map(|e| format!("the impression producer failed fatally: {e}"));
    let mut required = std::collections::BTreeSet::new();
    if let Some(sub) = &s.subscriber {
        let status = sub.status().load();
        if !sub.alive() {
            reason = reason.or_else(|| Some("the snapshot subscriber stopped".into()));
        } else if !status.listed {
            reason = reason.or_else(|| {
                Some("the snapshot topic's partitions are not known yet (Kafka unreachable?)".into())
            });
        } else if !status.caught_up() {
            reason = reason.or_else(|| {
                Some(format!(
                    "reading the snapshot topic: {} of {} partitions read to their end",
                    status.caught_up.intersection(&status.partitions).count(),
                    status.partitions.len()
                ))
            });
        }
        required = status.checkpointed.clone();
    }
    let models: Vec<ModelReadiness> = config
        .core
        .models
        .iter()
        .map(|m| match catalog.models.get(&m.id) {
            Some(sm) => {
                let show = |(p, src): &(crate::core::params::Prior, crate::core::prior::PriorSource)| {
                    PriorInForce { alpha: p.alpha, beta: p.beta, source: src.as_str() }
                };
                ModelReadiness {
                    model: m.id.clone(),
                    loaded: true,
                    model_version: sm.version,
                    staleness_ms: sm.staleness_ms(now),
                    partitions: sm.partitions.len(),
                    missing_partitions: required.difference(&sm.partitions).copied().collect(),
                    prior: if m.empirical_prior { "empirical" } else { "configured" },
                    priors: Some(PriorsInForce {
                        by_segment: sm.priors.by_segment.iter().map(|(s, p)| (s.clone(), show(p))).collect(),
                        other_segments: show(&sm.priors.other),
                    }),
                }
            }
            None => ModelReadiness {
                model: m.id.clone(),
                loaded: false,
                model_version: 0,
                staleness_ms: None,
                partitions: 0,
                missing_partitions: required.iter().copied().collect(),
                prior: if m.empirical_prior { "empirical" } else { "configured" },
                priors: None,
            },
        })
        .collect();
    if !config.serving.cold_start {
        if let Some(m) = models.iter().find(|m| !m.loaded || !m.missing_partitions.is_empty()) {
            reason = reason.or_else(|| {
                Some(if m.loaded {
                    format!("model `{}` does not cover partitions {:?} yet", m.model, m.missing_partitions)
                } else {
                    format!("no snapshot of model `{}` loaded yet", m.model)
                })
            });
        }
    }
    Readiness { ready: reason.is_none(), reason, models }
}

async fn readyz(State(s): State<AppState>) -> Response {
    let r = readiness(&s);
    let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &r)
}

async fn render_metrics(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(h) => {
            let mut r = h.render().into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        None => {
            problem(Problem::new(404, "not-found", "Metrics are not enabled", "this node records no metrics"))
        }
    }
}
