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
    let mut c = crate::kafka::client_config(&config.kafka);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", config.serving.produce_timeout_ms.to_string());
    // Defaults that `[kafka.properties]` may override.
    for (name, value) in [("linger.ms", "1")] {
        if !config.kafka.properties.contains_key(name) {
            c.set(name, value);
        }
    }
    c.create().context("creating the impression producer")
}

/// Runs `banditflow serve` until `shutdown` resolves: subscriber, producer and HTTP server.
pub async fn serve(
    config: Arc<Config>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let subscriber = subscriber::Subscriber::start(
        crate::kafka::client_config(&config.kafka),
        &config.kafka.snapshot_topic,
        None,
    )?;
    let node = Arc::new(node::Node::new(Arc::clone(&config), subscriber.catalog(), Some(producer(&config)?)));
    let listener = tokio::net::TcpListener::bind(config.serving.listen)
        .await
        .with_context(|| format!("listening on {}", config.serving.listen))?;
    tracing::info!(address = %config.serving.listen, snapshot_topic = %config.kafka.snapshot_topic, "serving");
    axum::serve(listener, http::router(http::AppState { node, metrics }))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server")?;
    subscriber.stop();
    Ok(())
}
