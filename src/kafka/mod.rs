//! The Kafka edge: the consumer-group service (`run`), topic checks, restoring partitions from
//! the snapshot topic, and moving recordings to and from topics. Learning itself stays in
//! `crate::core`; this module only moves records in and snapshots out.

pub mod admin;
pub mod aggregate;
pub mod driver;
mod inputs;
pub mod isolation;
pub mod probes;
// The one module allowed `unsafe`: librdkafka's batch read of a split partition queue, which
// rust-rdkafka does not offer (see its docs).
#[allow(unsafe_code)]
mod queue;
pub mod reader;
mod session;
pub mod store;
mod task;
pub mod transfer;
mod txn;

use rdkafka::config::ClientConfig;

use crate::config::KafkaSpec;

/// Properties every client shares: the bootstrap list and the pass-through librdkafka
/// properties (TLS, SASL, tuning). Role-specific settings are added by the caller and win.
pub fn client_config(k: &KafkaSpec) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    for (name, value) in &k.properties {
        c.set(name, value);
    }
    c
}

/// A consumer's properties: the common ones, then `kafka.consumer_properties`.
pub fn consumer_config(k: &KafkaSpec) -> ClientConfig {
    let mut c = client_config(k);
    for (name, value) in &k.consumer_properties {
        c.set(name, value);
    }
    c
}

/// A producer's properties: the common ones, then `kafka.producer_properties`.
pub fn producer_config(k: &KafkaSpec) -> ClientConfig {
    let mut c = client_config(k);
    for (name, value) in &k.producer_properties {
        c.set(name, value);
    }
    c
}

/// A transactional producer with the id `transactional_id`, transactions initialised (which
/// fences an earlier producer of the same id): the processor's and the aggregator's.
pub(crate) fn transactional_producer(
    k: &KafkaSpec,
    transactional_id: &str,
) -> anyhow::Result<rdkafka::producer::BaseProducer> {
    use anyhow::Context as _;
    use rdkafka::producer::Producer as _;
    let mut pc = producer_config(k);
    pc.set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", k.transaction_timeout_ms.to_string())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", (k.max_record_bytes + 64 * 1024).to_string())
        .set("linger.ms", "2");
    let producer: rdkafka::producer::BaseProducer =
        pc.create().with_context(|| format!("creating the transactional producer `{transactional_id}`"))?;
    producer
        .init_transactions(std::time::Duration::from_millis(k.transaction_timeout_ms as u64 * 2))
        .with_context(|| format!("initialising transactions of `{transactional_id}` (fences an earlier instance with the same id)"))?;
    Ok(producer)
}

/// Commits `producer`'s transaction, draining its deliveries first: librdkafka's
/// `commit_transaction` alone waits for them in 100 ms steps (every transaction took ≥ 100 ms).
/// rust-rdkafka's `poll(d)` turns until `d` has passed, asking librdkafka for events with the
/// remaining time in whole milliseconds, so a 1 ms poll never blocks: it spun for the whole drain
/// (4 % of the processor's CPU at 700 k events/s). Each turn serves what is there and waits
/// 200 µs when nothing was.
pub(crate) fn commit_transaction(
    producer: &rdkafka::producer::BaseProducer,
    timeout: std::time::Duration,
) -> rdkafka::error::KafkaResult<()> {
    use rdkafka::producer::Producer as _;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let in_flight = producer.in_flight_count();
        if in_flight == 0 || std::time::Instant::now() >= deadline {
            break;
        }
        producer.poll(std::time::Duration::ZERO);
        if producer.in_flight_count() == in_flight {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    producer.commit_transaction(timeout)
}

/// Hands `rec` to `producer`, serving deliveries while librdkafka's queue is full.
pub(crate) fn send_waiting(
    producer: &rdkafka::producer::BaseProducer,
    mut rec: rdkafka::producer::BaseRecord<'_, [u8], [u8]>,
) -> anyhow::Result<()> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                producer.poll(std::time::Duration::from_millis(10));
            }
            Err((e, r)) => return Err(anyhow::anyhow!("producing to `{}`: {e}", r.topic)),
        }
    }
}

/// A plain client config for tools and tests that only know a bootstrap address.
pub fn bootstrap_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Milliseconds since the epoch, for the edges that need the wall clock (metrics, freshness).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
