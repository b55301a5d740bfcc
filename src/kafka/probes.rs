//! The processor's HTTP endpoints on `kafka.metrics_address`: `/metrics`, `/healthz` and
//! `/readyz`, answered from [`Health`], which the driver updates.
//!
//! - `/healthz` (liveness) is 200 while the driver's loop turns: the poll loop, the start-up
//!   retries and the session restarts all count as progress, so a broker that is down never
//!   fails it (a pod must not be restarted because Kafka is). It is 503 only when the loop has
//!   not turned for `stall_limit`, longer than anything the loop may legitimately block on
//!   (a restore, a transaction, initialising the producer).
//! - `/readyz` (readiness) is 200 once the group is joined and every assigned partition is
//!   restored, 503 otherwise, with the reason in the body.
//!
//! Must never: touch Kafka. It reports what the driver last said.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::telemetry::processor::Readiness;
use crate::telemetry::Exporter;

/// What the probes answer, updated by the driver.
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the loop's last turn.
    last_progress_ms: AtomicU64,
    stall_limit: Duration,
    ready: AtomicBool,
    reason: Mutex<String>,
    /// Logged when the instance becomes ready.
    ready_message: &'static str,
}

impl Health {
    pub fn new(stall_limit: Duration) -> Arc<Health> {
        Health::with_ready_message(stall_limit, "ready: group joined and every assigned partition restored")
    }

    /// [`Health::new`] for a component whose readiness means something else.
    pub fn with_ready_message(stall_limit: Duration, ready_message: &'static str) -> Arc<Health> {
        Arc::new(Health {
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            stall_limit,
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".into()),
            ready_message,
        })
    }

    /// The loop turned.
    pub fn progress(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    /// Sets readiness with the reason shown while not ready (logged and exported on change).
    pub fn set_ready(&self, ready: bool, reason: &str) {
        let mut r = self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = self.ready.swap(ready, Ordering::SeqCst) != ready || (!ready && *r != reason);
        if changed {
            *r = if ready { String::new() } else { reason.to_string() };
            Readiness { ready }.emit();
            if ready {
                tracing::info!("{}", self.ready_message);
            } else {
                tracing::info!(reason, "not ready");
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Time since the loop last turned.
    pub fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn alive(&self) -> bool {
        self.since_progress() <= self.stall_limit
    }

    fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

#[derive(Clone)]
struct State {
    health: Arc<Health>,
    exporter: Option<Arc<Exporter>>,
}

/// `/metrics`, `/healthz`, `/readyz`; every other path is 404.
pub fn router(health: Arc<Health>, exporter: Option<Arc<Exporter>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: /metrics, /healthz, /readyz\n") })
        .with_state(State { health, exporter })
}

async fn healthz(axum::extract::State(s): axum::extract::State<State>) -> Response {
    let since = s.health.since_progress();
    if s.health.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let body = format!("stalled: the processing loop has not turned for {:.0} s\n", since.as_secs_f64());
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn readyz(axum::extract::State(s): axum::extract::State<State>) -> Response {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", s.health.reason())).into_response()
    }
}

async fn metrics(axum::extract::State(s): axum::extract::State<State>) -> Response {
    match &s.exporter {
        Some(e) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], e.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics are recorded by another component of this process\n")
            .into_response(),
    }
}

/// Binds `addr` now (a taken port fails the start) and serves the probes on a thread of their
/// own, so they answer whatever the consumer thread is doing.
pub fn serve(
    addr: std::net::SocketAddr,
    health: Arc<Health>,
    exporter: Option<Arc<Exporter>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("banditflow-probes".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    if let Err(e) = axum::serve(l, router(health, exporter)).await {
                        tracing::error!(error = %e, "probe server stopped");
                    }
                }
                Err(e) => tracing::error!(error = %e, "probe server could not start"),
            }
        });
    })?;
    tracing::info!(address = %local, "metrics at http://{local}/metrics, probes at /healthz and /readyz");
    Ok(local)
}
