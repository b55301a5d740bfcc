//! Two input topics read at very different speeds, on a real broker (the setup of `kafka.rs`).
//!
//! The feedback topic is written in large batches and the impressions topic one record per
//! batch, and the consumer fetches at most one batch per partition at a time: feedback arrives
//! far ahead of its impressions, as when a processor catches up on a backlog. A partition task
//! must not apply that feedback before the impressions still on the broker (it would move the
//! event-time watermark past them and orphan the feedback); it pauses the feedback partition
//! instead. Oracles: the generator's ground truth (every attributable feedback learned), and
//! the offline replay of the same records (integer statistics and the join outcomes that do
//! not depend on where the watermark stands), also across a SIGTERM in the middle and a
//! successor that restores.

use std::time::Duration;

use banditflow::generate::{self, ShopSpec};
use banditflow::kafka::{store, transfer};
use banditflow::recording::Record;
use banditflow::replay;

use crate::kafka::{bootstrap, edit_config, model_ids, wait_until, Setup};

#[test]
fn feedback_fetched_far_ahead_of_its_impressions_waits_for_them() {
    let b = bootstrap();
    let s = Setup::new("align", &b, 2);
    let fb = s.use_two_topics("align");
    // A small queue per partition task: holding the feedback must pause its partitions. One
    // record batch per partition per fetch: impressions come a record at a time, feedback
    // thousands at a time.
    edit_config(&s, "restore_timeout = \"60s\"", "restore_timeout = \"60s\"\npartition_queue_records = 64");
    edit_config(
        &s,
        "\"heartbeat.interval.ms\" = \"500\"",
        "\"heartbeat.interval.ms\" = \"500\"\n\"max.partition.fetch.bytes\" = \"1\"",
    );
    let config = s.config();
    let shop = generate::generate(&ShopSpec {
        seed: 31,
        impressions: 3000,
        partitions: 2,
        malformed_share: 0.0,
        impressions_topic: s.input.clone(),
        feedback_topic: fb.clone(),
        model_ids: model_ids(),
        ..ShopSpec::default()
    });
    let (impressions, feedback): (Vec<Record>, Vec<Record>) =
        shop.records.iter().cloned().partition(|r| r.topic == s.input);
    assert!(!impressions.is_empty() && !feedback.is_empty());
    // Feedback first, in large batches; then impressions, one record per batch.
    transfer::produce_recording(banditflow::kafka::bootstrap_config(&b), feedback.into_iter())
        .expect("produce feedback");
    let mut one_per_batch = banditflow::kafka::bootstrap_config(&b);
    one_per_batch.set("batch.num.messages", "1");
    transfer::produce_recording(one_per_batch, impressions.into_iter()).expect("produce impressions");
    let ends = s.end_offsets_of(&[s.input.clone(), fb.clone()]);
    let done = || s.committed_offsets_of(&[s.input.clone(), fb.clone()]) == ends;

    // First processor: stopped by SIGTERM once it has paused feedback (or finished).
    let filter = "info,banditflow::kafka=debug,banditflow::telemetry=debug";
    let mut first = s.start_logging("0", filter);
    wait_until("a feedback partition paused (or everything committed)", Duration::from_secs(120), || {
        first.log_text().contains("paused: the partition task waits") || done()
    });
    let paused = first.log_text().contains("paused: the partition task waits");
    let (st, _) = first.terminate();
    assert!(st.success(), "SIGTERM while partitions are paused must exit cleanly: {st:?}");
    assert!(paused, "the feedback ran ahead and must have been paused");

    // A successor restores from the committed snapshots and finishes.
    let _second = s.start_logging("0", filter);
    wait_until("both topics committed to their end", Duration::from_secs(180), done);
    s.assert_equivalent_to_offline(&shop.records);
    s.assert_totals_match_truth(&shop.events);
    let mut run = replay::ReplayRun::default();
    for r in shop.records.clone() {
        replay::apply_record(&config, &mut run, r);
    }
    let read = |topic: &str| s.read_state(topic);
    let (stores, changelog) = (read(&s.snapshots), read(&s.changelog()));
    // Outcomes that do not depend on where the watermark stands when a record arrives. The
    // others (expired, held, orphaned, released) may differ: the processor found the
    // feedback topic idle once it had delivered it all (`kafka.max_idle`) and let the
    // watermark follow the impressions; the replay has no clock and never does.
    let fixed = |rows: [(&'static str, u64); 19]| -> Vec<(&'static str, u64)> {
        rows.into_iter()
            .filter(|(n, _)| {
                !matches!(
                    *n,
                    "impressions_expired"
                        | "feedback_held"
                        | "feedback_orphaned"
                        | "feedback_released"
                        | "feedback_opted_out"
                )
            })
            .collect()
    };
    for p in [0, 1] {
        let restored = store::restore_partition(&config, p, &stores[&p], &changelog[&p]).expect("restores");
        assert_eq!(
            fixed(restored.join.counters.rows()),
            fixed(run.partitions[&p].join.counters.rows()),
            "partition {p}: join outcomes differ from the offline replay"
        );
    }
}

#[test]
fn both_topics_written_before_the_start_are_never_lost_to_each_other() {
    // The report's setup: both topics fully written before the processor starts (4 partitions,
    // ~55 k impressions, ~45 k feedback records, feedback strictly after its impression in
    // time), fetches of ~32 KB so librdkafka serves partitions one after another, the default
    // `max_idle` (200 ms) and `partition_queue_records` (20,000); and SIGKILLs in the first
    // seconds, so partitions are restored from their first checkpoints while the other topic
    // is still far behind. The learned totals must equal the generator's truth. Two lines of
    // defence hold it: an input whose end lies past the consumer's start is behind until
    // delivered (the aligner waits for it), and the join's watermark is the oldest of the
    // inputs' clocks (feedback applied early waits as held feedback).
    let b = bootstrap();
    let s = Setup::new("prewritten", &b, 4);
    let fb = s.use_two_topics("prewritten");
    edit_config(
        &s,
        "\"heartbeat.interval.ms\" = \"500\"",
        "\"heartbeat.interval.ms\" = \"500\"\n\"fetch.max.bytes\" = \"32768\"\n\"message.max.bytes\" = \"32768\"\n\"max.partition.fetch.bytes\" = \"32768\"",
    );
    let config = s.config();
    assert_eq!((config.kafka.max_idle_ms, config.kafka.partition_queue_records), (200, 20_000));
    let shop = generate::generate(&ShopSpec {
        seed: 5,
        impressions: 55_000,
        partitions: 4,
        malformed_share: 0.0,
        impressions_topic: s.input.clone(),
        feedback_topic: fb.clone(),
        model_ids: model_ids(),
        ..ShopSpec::default()
    });
    s.produce(shop.records.clone());
    let topics = [s.input.clone(), fb.clone()];
    let ends = s.end_offsets_of(&topics);
    eprintln!("prewritten: end offsets {ends:?}");
    // Two processors killed in their first seconds: the first once it has committed anything,
    // the second 1.5 s after its partitions were assigned.
    let mut first = s.start("0");
    wait_until("a first commit", Duration::from_secs(120), || s.committed_total() > 0);
    first.kill9();
    let mut second = s.start_logging("0", "info");
    wait_until("partitions assigned", Duration::from_secs(120), || {
        second.log_text().contains("partition assigned")
    });
    std::thread::sleep(Duration::from_millis(1500));
    second.kill9();
    let killed_at = s.committed_total();
    let _last = s.start("0");
    wait_until("both topics committed to their end", Duration::from_secs(300), || {
        s.committed_offsets_of(&topics) == ends
    });
    eprintln!("prewritten: killed at committed totals >0 and {killed_at}");
    s.assert_totals_match_truth(&shop.events);
}
