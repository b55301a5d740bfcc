//! Start-up checks of the topics: inputs exist and are co-partitioned; the snapshot and
//! changelog topics are compacted with a partition per input partition (created if missing and
//! allowed); the dead-letter topic exists (created if missing and allowed). Every refusal says
//! what to fix.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;

/// A start-up check that may pass later without anyone changing the configuration: Kafka is
/// unreachable, or a topic does not exist yet. `run` retries these; any other refusal (topics
/// that are not co-partitioned, a snapshot topic that is not compacted or has too few
/// partitions) ends it, since waiting cannot fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotYet(pub String);

/// Whether `e` is worth retrying (see [`NotYet`]).
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<NotYet>().is_some())
}

/// Partition counts of the topics that exist, by name.
pub fn partition_counts(config: &Config) -> anyhow::Result<BTreeMap<String, i32>> {
    let consumer: BaseConsumer =
        super::client_config(&config.kafka).create().context("creating a metadata client")?;
    let md = consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| {
        anyhow::Error::new(NotYet(format!("cannot reach Kafka at {}: {e}", config.kafka.bootstrap_servers)))
    })?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Checks (and where allowed creates) every topic; returns the number of input partitions.
pub fn prepare_topics(config: &Config) -> anyhow::Result<i32> {
    let counts = partition_counts(config)?;
    let mut input = None;
    let mut described = Vec::new();
    for t in &config.topics {
        let Some(n) = counts.get(&t.name) else {
            return Err(NotYet(format!(
                "input topic `{}` does not exist on {}",
                t.name, config.kafka.bootstrap_servers
            ))
            .into());
        };
        described.push(format!("{} has {n}", t.name));
        match input {
            None => input = Some(*n),
            Some(m) if m != *n => bail!(
                "input topics are not co-partitioned ({}): impressions and their feedback must be keyed by impression id \
                 into topics with the same number of partitions",
                described.join(", ")
            ),
            _ => {}
        }
    }
    let n = input.unwrap_or(1);
    let k = &config.kafka;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(k).create().context("creating an admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut to_create = Vec::new();
    for (role, topic) in [("snapshot", &k.snapshot_topic), ("changelog", &k.changelog_topic)] {
        match counts.get(topic) {
            Some(m) if *m < n => bail!(
                "{role} topic `{topic}` has {m} partitions but the inputs have {n}; it needs one per input \
                 partition: add partitions (kafka-topics.sh --alter --topic {topic} --partitions {n}); \
                 deleting it deletes the state it holds"
            ),
            Some(_) => {
                let res = runtime
                    .block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts))
                    .map_err(|e| NotYet(format!("describing the {role} topic: {e}")))?;
                let policy = res
                    .into_iter()
                    .filter_map(Result::ok)
                    .flat_map(|r| r.entries)
                    .find(|e| e.name == "cleanup.policy")
                    .and_then(|e| e.value)
                    .unwrap_or_default();
                if !compacted_only(&policy) {
                    bail!(
                        "{role} topic `{topic}` has cleanup.policy={policy}; it must be `compact` alone: with \
                         `delete`, segments older than retention.ms are deleted, and with them state that must \
                         outlive them (the default funnel keeps purchased impressions 30 days; a model or a \
                         checkpoint that did not change recently), so partitions would be restored without it. \
                         Set it with: kafka-configs.sh --alter --entity-type topics --entity-name {topic} \
                         --add-config cleanup.policy=compact"
                    );
                }
            }
            None if k.create_topics => to_create.push((topic.clone(), n, true)),
            None => {
                return Err(NotYet(format!(
                    "{role} topic `{topic}` does not exist and kafka.create_topics is false"
                ))
                .into())
            }
        }
    }
    if !counts.contains_key(&k.dead_letter_topic) {
        if k.create_topics {
            to_create.push((k.dead_letter_topic.clone(), n, false));
        } else {
            return Err(NotYet(format!(
                "dead-letter topic `{}` does not exist and kafka.create_topics is false",
                k.dead_letter_topic
            ))
            .into());
        }
    }
    if !to_create.is_empty() {
        let max_bytes = (k.max_record_bytes + 64 * 1024).to_string();
        let topics: Vec<NewTopic> = to_create
            .iter()
            .map(|(name, parts, compact)| {
                let t = NewTopic::new(name, *parts, TopicReplication::Fixed(k.replication_factor))
                    .set("max.message.bytes", &max_bytes);
                if *compact {
                    t.set("cleanup.policy", "compact")
                        .set("min.cleanable.dirty.ratio", "0.1")
                        .set("segment.ms", "600000")
                } else {
                    t
                }
            })
            .collect();
        let created = runtime
            .block_on(admin.create_topics(&topics, &opts))
            .map_err(|e| NotYet(format!("creating topics: {e}")))?;
        for r in created {
            match r {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                // Another instance created it first.
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, e)) => return Err(NotYet(format!("cannot create topic `{name}`: {e}")).into()),
            }
        }
    }
    Ok(n)
}

/// Grows `topic` to `partitions` partitions (input partitions were added while running).
/// Another instance doing the same first is no error.
pub fn add_partitions(config: &Config, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(&config.kafka).create().context("creating an admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let wanted = usize::try_from(partitions).context("partition count")?;
    let grown = runtime
        .block_on(admin.create_partitions(&[NewPartitions::new(topic, wanted)], &opts))
        .with_context(|| format!("adding partitions to `{topic}`"))?;
    for r in grown {
        match r {
            Ok(_) => {}
            // Already that many (another instance was first).
            Err((_, rdkafka::types::RDKafkaErrorCode::InvalidPartitions)) => {}
            Err((name, e)) => bail!("cannot add partitions to `{name}`: {e}"),
        }
    }
    Ok(())
}

/// Whether a `cleanup.policy` value is compaction only (`compact`; `compact,delete` is not).
pub fn compacted_only(policy: &str) -> bool {
    let parts: Vec<&str> = policy.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    parts == ["compact"]
}

/// Creates topics with the configured client properties and `kafka.replication_factor`;
/// existing ones are left alone.
pub fn create_topics_with(config: &Config, topics: &[(&str, i32, bool)]) -> anyhow::Result<()> {
    create_with(super::client_config(&config.kafka), topics, config.kafka.replication_factor)
}

/// Creates topics (for tests and tools), one replica each; existing ones are left alone.
pub fn create_topics(bootstrap: &str, topics: &[(&str, i32, bool)]) -> anyhow::Result<()> {
    create_replicated_topics(bootstrap, topics, 1)
}

/// [`create_topics`] with `replication` replicas per partition.
pub fn create_replicated_topics(
    bootstrap: &str,
    topics: &[(&str, i32, bool)],
    replication: i32,
) -> anyhow::Result<()> {
    create_with(super::bootstrap_config(bootstrap), topics, replication)
}

fn create_with(
    client: rdkafka::config::ClientConfig,
    topics: &[(&str, i32, bool)],
    replication: i32,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin: AdminClient<DefaultClientContext> = client.create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, parts, compact)| {
            let t = NewTopic::new(name, *parts, TopicReplication::Fixed(replication));
            if *compact {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    for r in runtime.block_on(admin.create_topics(&new, &opts))? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => bail!("cannot create topic `{name}`: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_compaction_alone_keeps_the_snapshot_topic_whole() {
        // Regression: `contains("compact")` accepted compact,delete, under which retention
        // deletes state that must outlive it.
        for (policy, ok) in [
            ("compact", true),
            (" compact ", true),
            ("compact,delete", false),
            ("delete,compact", false),
            ("delete", false),
            ("", false),
        ] {
            assert_eq!(super::compacted_only(policy), ok, "{policy:?}");
        }
    }
}
