//! Failure isolation on a real broker (the setup of `kafka.rs`): a partition that cannot be
//! restored stays alone — paused and retried while the others go on, without rebalancing the
//! group in a loop — and input partitions added while running get their snapshot-topic
//! partitions. Oracle: the generator's ground truth.

use std::time::Duration;

use banditflow::generate::ShopSpec;
use banditflow::kafka::admin;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::kafka::{bootstrap, edit_config, wait_until, Setup};

/// Writes `value` (`None`: a tombstone) under `key` to `partition` of `topic`, outside any
/// transaction.
fn put(bootstrap: &str, topic: &str, partition: i32, key: &str, value: Option<&[u8]>) {
    let producer: BaseProducer = banditflow::kafka::bootstrap_config(bootstrap).create().expect("producer");
    let mut record = BaseRecord::<str, [u8]>::to(topic).partition(partition).key(key);
    if let Some(v) = value {
        record = record.payload(v);
    }
    producer.send(record).map_err(|(e, _)| e).expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
}

#[test]
fn an_undecodable_snapshot_value_stops_only_its_partition() {
    let b = bootstrap();
    let s = Setup::new("isolate", &b, 2);
    let shop =
        s.shop_with(ShopSpec { seed: 61, impressions: 4000, malformed_share: 0.0, ..ShopSpec::default() });
    admin::create_topics(&b, &[(&s.snapshots, 2, true)]).expect("snapshot topic");
    // Partition 1's checkpoint is a value banditflow never wrote.
    put(&b, &s.snapshots, 1, "checkpoint/1", Some(b"not a banditflow value"));
    s.produce(shop.records.clone());
    let ends = s.end_offsets();
    let mut p = s.start_logging("0", "info");
    wait_until("partition 0 committed to its end", Duration::from_secs(120), || {
        s.committed_offsets()[0] == ends[0]
    });
    wait_until("partition 1 reported failed", Duration::from_secs(60), || {
        p.log_text().contains("partition failed to restore")
    });
    let log = p.log_text();
    let failed = log.lines().find(|l| l.contains("partition failed to restore")).expect("logged");
    assert!(failed.contains("partition=1") && failed.contains("reason=\"undecodable\""), "{failed}");
    assert!(failed.contains("checkpoint/1"), "the error names the key: {failed}");
    assert!(s.committed_offsets()[1] <= 0, "nothing of the failed partition is committed");
    // One assignment, no session restart: the group did not rebalance in a loop.
    assert_eq!(log.matches("rebalance kind=\"assign\"").count(), 1, "{log}");
    eprintln!("isolation: {failed}");
    assert!(!log.contains("session state is no longer stored safely"), "{log}");

    // An operator deletes the bad key: the next retry restores the partition from its inputs.
    put(&b, &s.snapshots, 1, "checkpoint/1", None);
    wait_until("both partitions committed to their end", Duration::from_secs(180), || {
        s.committed_offsets() == ends
    });
    assert!(p.log_text().contains("failed partition restored"));
    let (st, _) = p.terminate();
    assert!(st.success());
    s.assert_totals_match_truth(&shop.events);
}

#[test]
fn input_partitions_added_while_running_get_their_snapshot_partitions() {
    let b = bootstrap();
    let mut s = Setup::new("grow", &b, 2);
    // Metadata refreshed every second, so the added partitions are noticed at once.
    edit_config(
        &s,
        "\"heartbeat.interval.ms\" = \"500\"",
        "\"heartbeat.interval.ms\" = \"500\"\n\"topic.metadata.refresh.interval.ms\" = \"1000\"",
    );
    let config = s.config();
    s.partitions = 4;
    let shop =
        s.shop_with(ShopSpec { seed: 62, impressions: 4000, malformed_share: 0.0, ..ShopSpec::default() });
    let (old, new): (Vec<_>, Vec<_>) = shop.records.iter().cloned().partition(|r| r.partition < 2);
    s.partitions = 2;
    s.produce(old);
    let mut p = s.start_logging("0", "info");
    s.wait_caught_up(Duration::from_secs(120));
    admin::add_partitions(&config, &s.input, 4).expect("input partitions added");
    s.partitions = 4;
    s.produce(new);
    s.wait_caught_up(Duration::from_secs(180));
    let counts = admin::partition_counts(&config).expect("metadata");
    assert_eq!(counts[&s.snapshots], 4, "the snapshot topic grew with its inputs");
    assert_eq!(counts[&s.changelog()], 4, "the changelog topic grew with its inputs");
    let log = p.log_text();
    assert!(log.contains("added partitions for new input partitions"), "{log}");
    assert!(!log.contains("partition failed to restore"), "{log}");
    let (st, _) = p.terminate();
    assert!(st.success());
    s.assert_totals_match_truth(&shop.events);
}
