//! Serving: nodes that follow the snapshot topic and rank with the newest merged model.
//!
//! - [`subscriber`]: reads the snapshot topic (read_committed), reassembles chunked values,
//!   merges the newest shard of every partition and swaps the result in atomically.
//! - [`node`]: validates rank and feedback requests, ranks (treatment or holdout), and logs
//!   impressions and feedback to the input topics before answering.
//! - [`http`]: the axum API of `banditflow serve`.

pub mod http;
pub mod node;
pub mod subscriber;

use std::sync::Arc;

use anyhow::Context as _;
use rdkafka::producer::FutureProducer;

use crate::config::Config;

/// The producer a node logs impressions and feedback with: idempotent (a retried send is
/// written once), acknowledged by all in-sync replicas, with a short linger so concurrent
/// requests share batches.
pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    let mut c = crate::kafka::producer_config(&config.kafka);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", config.serving.produce_timeout_ms.to_string());
    // Defaults that `[kafka.properties]` may override.
    for (name, value) in [("linger.ms", "1")] {
        if config.kafka.producer_property(name).is_none() {
            c.set(name, value);
        }
    }
    c.create().context("creating the impression producer")
}

/// Runs `banditflow serve` until `shutdown` resolves: subscriber, producer and HTTP server.
pub async fn serve(
    config: Arc<Config>,
    metrics: Option<Arc<crate::telemetry::Exporter>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let max = config.core.limits.max_id_bytes;
    if max < node::IMPRESSION_ID_BYTES {
        anyhow::bail!(
            "config field `limits.max_id_bytes`: {max} is shorter than the impression ids a node makes ({} bytes); \
             the processor would dead-letter every impression this node logs",
            node::IMPRESSION_ID_BYTES
        );
    }
    let written = Arc::new(subscriber::WrittenRecords::default());
    let subscriber = Arc::new(subscriber::Subscriber::start_with(
        crate::kafka::consumer_config(&config.kafka),
        if config.serving.read_merged { &config.kafka.merged_topic } else { &config.kafka.snapshot_topic },
        None,
        Some(Arc::clone(&written)),
    )?);
    let node = Arc::new(
        node::Node::new(Arc::clone(&config), subscriber.catalog(), Some(producer(&config)?))
            .with_written(written),
    );
    crate::telemetry::serving::Started { config: &config, topics: &node.topics() }.emit();
    let listener = tokio::net::TcpListener::bind(config.serving.listen)
        .await
        .with_context(|| format!("listening on {}", config.serving.listen))?;
    let state = http::AppState { node, metrics, subscriber: Some(Arc::clone(&subscriber)) };
    // Readiness as a metric (and a log line when it changes), whether or not anyone probes.
    let watched = state.clone();
    let watcher = tokio::spawn(async move {
        let mut last: Option<bool> = None;
        let mut running = true;
        loop {
            let alive = watched.subscriber.as_ref().is_none_or(|s| s.alive());
            if alive != running {
                crate::telemetry::serving::SubscriberRunning { running: alive }.emit();
                running = alive;
            }
            let r = http::readiness(&watched);
            if last != Some(r.ready) {
                crate::telemetry::serving::ServingReadiness {
                    ready: r.ready,
                    reason: r.reason.as_deref().unwrap_or(""),
                    was_ready: last,
                }
                .emit();
                last = Some(r.ready);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server")?;
    watcher.abort();
    drop(subscriber);
    Ok(())
}
