//! The buffer changelog (`core::checkpoint`): segments written at every save, reclaimed on a
//! compacted topic, compacted when mostly dead; a partition restored from what the topic holds
//! at any save is the partition that was saved. The topic is simulated as "latest value per
//! key" (what compaction keeps), so a reclaimed segment that was still needed would show as a
//! restore that differs.

use std::collections::BTreeMap;

use banditflow::core::checkpoint;
use banditflow::core::event::{Event, FeedbackKind, Variant};
use banditflow::core::params::{CoreSpec, DEFAULT_FUNNEL};
use banditflow::core::partition::PartitionState;
use banditflow::core::snapshot;

use crate::support::*;

/// The default funnel, no watermark delay, one model (Beta, configured examination).
fn one_model_spec(late_ms: i64, cap: usize) -> CoreSpec {
    let mut spec = spec_with_join(banditflow::core::params::JoinSpec {
        watermark_delay_ms: 0,
        grace_ms: 5 * MIN,
        late_retention_ms: late_ms,
        learn_late: true,
        max_impressions: cap,
        max_pending_feedback: 1000,
        funnel: DEFAULT_FUNNEL,
    });
    spec.models.truncate(1);
    spec
}

/// A partition fed event by event and saved to a topic: the small scenarios below.
struct Scenario {
    spec: CoreSpec,
    state: PartitionState,
    topic: Topic,
    offset: i64,
}

impl Scenario {
    fn new(spec: CoreSpec) -> Scenario {
        let state = PartitionState::new(&spec, 0);
        Scenario { spec, state, topic: Topic::default(), offset: 0 }
    }

    fn feed(&mut self, e: Event) {
        apply_event(&mut self.state, &self.spec, &e, self.offset, None);
        self.offset += 1;
    }

    fn imp(&mut self, id: &str, t: i64) {
        self.feed(Event::Impression(impression(id, "pbm", t, Variant::Treatment, "s", &["x", "y"])));
    }

    fn fb(&mut self, id: &str, kind: FeedbackKind, t: i64) {
        self.feed(Event::Feedback(feedback(id, "x", 1, kind, t)));
    }

    fn save(&mut self) {
        self.topic.apply(checkpoint::save_changes(&self.spec, &mut self.state), 0);
    }
}

/// What a compacted topic holds: the newest value of each key.
#[derive(Default)]
struct Topic {
    values: BTreeMap<String, Vec<u8>>,
    /// Bytes of every value ever written to a `buf/` key.
    segment_bytes_written: usize,
}

impl Topic {
    fn apply(&mut self, saved: checkpoint::SavedPartition, p: i32) {
        for (k, v) in saved.puts {
            if k.starts_with("buf/") {
                self.segment_bytes_written += v.len();
            }
            self.values.insert(k, v);
        }
        for k in saved.deletes {
            self.values.remove(&k);
        }
        self.values.insert(checkpoint::header_key(p), saved.header);
        for (m, b) in saved.models {
            self.values.insert(checkpoint::model_key(&m, p), b);
        }
    }

    /// What restore reads: (header, segments in key order, held feedback, model snapshots).
    #[allow(clippy::type_complexity)]
    fn parts(&self, p: i32) -> (&[u8], Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<snapshot::DecodedSnapshot>) {
        let with = |prefix: &str| -> Vec<Vec<u8>> {
            self.values.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect()
        };
        let models = banditflow::core::armlog::assemble(
            p,
            self.values.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        )
        .expect("the shards assemble");
        (&self.values[&checkpoint::header_key(p)], with("buf/"), with("held/"), models)
    }

    fn restore(&self, spec: &CoreSpec, p: i32) -> PartitionState {
        let (header, segments, held, models) = self.parts(p);
        checkpoint::restore(spec, header, &segments, &[], &held, &models).expect("restores").0
    }

    fn segments(&self) -> usize {
        self.values.keys().filter(|k| k.starts_with("buf/")).count()
    }
}

/// 240,000 impressions, one a second of event time (unclicked ones are released after 2 h),
/// a tenth clicked and a tenth of those purchased (kept 7 d and 30 d), saved every 500 records,
/// with a buffer cap that evicts: restore from the topic equals the live partition at every
/// 20th save, segments are reclaimed and compacted, and the topic stays bounded.
#[test]
fn restore_from_the_compacted_topic_equals_the_partition_at_every_save() {
    let spec = one_model_spec(HOUR, 20_000);
    let mut state = PartitionState::new(&spec, 0);
    let mut topic = Topic::default();
    let mut due: BTreeMap<(i64, u64), Event> = BTreeMap::new();
    let (mut offset, mut saves, mut checked, mut max_segments) = (0i64, 0, 0, 0);
    let n = 240_000u64;
    for i in 0..n {
        let t = T0 + i as i64 * 1000;
        // Feedback due by now first, in time order.
        while let Some((&(tf, k), _)) = due.first_key_value() {
            if tf > t {
                break;
            }
            let e = due.remove(&(tf, k)).expect("due");
            apply_event(&mut state, &spec, &e, offset, None);
            offset += 1;
        }
        let id = format!("imp-{i}");
        let e = Event::Impression(impression(&id, "pbm", t, Variant::Treatment, "women", &["a", "b", "c"]));
        apply_event(&mut state, &spec, &e, offset, None);
        offset += 1;
        if i % 10 == 0 {
            due.insert((t + MIN, i), Event::Feedback(feedback(&id, "b", 2, FeedbackKind::Click, t + MIN)));
            if i % 100 == 0 {
                let fb = feedback(&id, "b", 2, FeedbackKind::Purchase, t + 2 * DAY);
                due.insert((t + 2 * DAY, i), Event::Feedback(fb));
            }
        }
        if i % 500 == 499 {
            topic.apply(checkpoint::save_changes(&spec, &mut state), 0);
            saves += 1;
            max_segments = max_segments.max(topic.segments());
            if saves % 20 == 0 {
                let restored = topic.restore(&spec, 0);
                assert!(restored.join == state.join, "save {saves}: the restored join differs");
                assert_eq!(restored.models, state.models, "save {saves}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 20);
    eprintln!(
        "saves {saves}, segments peaked at {max_segments}, now {}, copied {}, retained {}, stored {} bytes, written {} bytes",
        topic.segments(),
        state.join.buffer.copied,
        state.join.buffered_impressions(),
        topic.values.iter().filter(|(k, _)| k.starts_with("buf/")).map(|(_, v)| v.len()).sum::<usize>(),
        topic.segment_bytes_written
    );
    let c = &state.join.counters;
    assert!(c.impressions_expired > 100_000, "the funnel released unclicked impressions: {c:?}");
    assert!(c.impressions_evicted > 0, "the cap evicted (delete markers written): {c:?}");
    assert!(c.feedback_attributed > 20_000, "{c:?}");
    // Reclaiming: 480 saves wrote 480 segments; the topic holds a bounded number of them.
    let retained = state.join.buffered_impressions();
    assert!(saves == 480 && max_segments < 300, "segments on the topic peaked at {max_segments} of {saves}");
    // Compaction copied entries out of sparse segments: more was written than one version of
    // each impression and each change, and what is stored stays within about twice the live
    // entries' bytes.
    let stored: usize =
        topic.values.iter().filter(|(k, _)| k.starts_with("buf/")).map(|(_, v)| v.len()).sum();
    assert!(state.join.buffer.copied > 0, "sparse segments were compacted");
    assert!(stored < 100 * retained, "{stored} bytes stored for {retained} retained entries of ~30 bytes");
    assert!(topic.segment_bytes_written > 4 * stored);
}

/// A delete marker outlives the segment it sits in as long as an older segment still holds a
/// version it hides: an impression evicted at the cap must not come back at restore when the
/// segment with its delete marker has nothing live left.
#[test]
fn an_evicted_impression_stays_deleted_after_its_marker_segment_empties() {
    let mut s = Scenario::new(one_model_spec(HOUR, 2));
    // Segment 0: a and b, both clicked (kept 7 days).
    s.imp("a", T0);
    s.imp("b", T0 + 1);
    s.fb("a", FeedbackKind::Click, T0 + 2);
    s.fb("b", FeedbackKind::Click, T0 + 3);
    s.save();
    // Segment 1: c, clicked; the cap evicted a (the first to expire): its delete marker.
    s.imp("c", T0 + 4);
    s.fb("c", FeedbackKind::Click, T0 + 5);
    assert_eq!(s.state.join.counters.impressions_evicted, 1);
    s.save();
    // Segment 2: c again (purchased): segment 1 holds nothing live, segment 0 still holds b.
    s.fb("c", FeedbackKind::Purchase, T0 + 6);
    s.save();
    let restored = s.topic.restore(&s.spec, 0);
    assert_eq!(restored.join.buffered_impressions(), 2, "a stays deleted");
    assert!(restored.join == s.state.join);
    // Segments are applied in sequence order; given in another order, restore refuses.
    let (header, mut segments, held, models) = s.topic.parts(0);
    assert!(segments.len() >= 2);
    segments.reverse();
    let e = checkpoint::restore(&s.spec, header, &segments, &[], &held, &models).expect_err("out of order");
    assert!(e.to_string().contains("sequence order"), "{e}");
}

/// An evicted impression whose older, shorter-lived version still sits in a live segment must
/// not come back when the segments with its newest version and its delete marker are gone.
#[test]
fn an_evicted_impression_does_not_come_back_from_an_older_version() {
    let mut s = Scenario::new(one_model_spec(HOUR, 2));
    // Segment 0: a (unclicked) and b (clicked, kept 7 days: keeps segment 0 alive).
    s.imp("a", T0);
    s.imp("b", T0 + 1);
    s.fb("b", FeedbackKind::Click, T0 + 2);
    s.save();
    // Segment 1: a again (clicked).
    s.fb("a", FeedbackKind::Click, T0 + 3);
    s.save();
    // Segment 2: c; the cap evicts a (the first to expire); segment 1 is empty.
    s.imp("c", T0 + 4);
    assert_eq!(s.state.join.counters.impressions_evicted, 1);
    s.save();
    // Segment 3: c again; segment 2 is empty but its marker still hides a's version in segment 0.
    s.fb("c", FeedbackKind::Click, T0 + 5);
    s.save();
    let restored = s.topic.restore(&s.spec, 0);
    assert_eq!(restored.join.buffered_impressions(), 2, "a stays evicted");
    assert!(restored.join == s.state.join);
}

/// Retention parameters changed between runs: a lengthened retention keeps (and rewrites) what
/// was retained, a shortened one releases at restore what it no longer keeps, and neither
/// change brings anything back at a later restore.
#[test]
fn a_retention_change_at_restore_holds_across_later_restores() {
    let short = one_model_spec(HOUR, 100);
    let long = one_model_spec(DAY, 100);
    let imp =
        |id: &str, t: i64| Event::Impression(impression(id, "pbm", t, Variant::Treatment, "s", &["x", "y"]));
    // Saved under a 1 h late retention: a (unclicked) is retained until T0 + 2 h.
    let mut state = PartitionState::new(&short, 0);
    let mut topic = Topic::default();
    apply_event(&mut state, &short, &imp("a", T0), 0, None);
    apply_event(&mut state, &short, &imp("b", T0 + HOUR), 1, None);
    topic.apply(checkpoint::save_changes(&short, &mut state), 0);
    // Restored under 1 d: a is now retained until T0 + 1 h + 1 d; the next save rewrites it.
    let mut longer = topic.restore(&long, 0);
    assert_eq!(longer.join.buffered_impressions(), 2);
    apply_event(&mut longer, &long, &imp("c", T0 + 3 * HOUR), 2, None);
    topic.apply(checkpoint::save_changes(&long, &mut longer), 0);
    // A later restore, with the watermark past the old end: a is still there.
    let again = topic.restore(&long, 0);
    assert!(again.join == longer.join, "the lengthened retention survives a second restore");
    assert_eq!(again.join.buffered_impressions(), 3);
    // Back to 1 h with the watermark at T0 + 3 h: a and b (ends T0 + 2 h, T0 + 3 h) are
    // released at restore, c stays; and a later restore does not bring them back.
    let shorter = topic.restore(&short, 0);
    assert_eq!(shorter.join.buffered_impressions(), 2, "a released, b (ends at the watermark) kept");
    let mut shorter = shorter;
    apply_event(&mut shorter, &short, &imp("d", T0 + 4 * HOUR), 3, None);
    topic.apply(checkpoint::save_changes(&short, &mut shorter), 0);
    let last = topic.restore(&short, 0);
    assert!(last.join == shorter.join, "nothing comes back");
}

/// Buffer segments are written field by field, not through prost's message types: their bytes
/// must be exactly what prost writes for the message they decode to (prost's encoding is the
/// oracle), over entries that use every field: experiment arms, odd ids, gaps in positions,
/// feedback kinds seen, cascade depth, opted-out impressions, context features (zero, negative
/// zero, negative), an empty segment name, and delete markers from evictions.
#[test]
fn buffer_segments_are_the_bytes_prost_writes_for_them() {
    use banditflow::core::event::{self, Encoding, TopicRole};
    use banditflow::core::partition::{Applied, InputRecord};
    use prost::Message as _;
    let spec = spec_with_join(banditflow::core::params::JoinSpec {
        watermark_delay_ms: 0,
        grace_ms: 5 * MIN,
        late_retention_ms: MIN,
        learn_late: true,
        max_impressions: 300,
        max_pending_feedback: 1000,
        funnel: DEFAULT_FUNNEL,
    });
    let mut feeder = Feeder::new(&spec, 0);
    let t0 = 1_767_225_600_000;
    let models = ["pbm", "lin", "est"];
    let variants =
        [Variant::Treatment, Variant::Holdout, Variant::Arm("exp/a#1".into()), Variant::Arm("b".into())];
    let segments = ["women", "", "men/kids"];
    let features: [&[(&str, f64)]; 5] =
        [&[("mobile", 1.0)], &[("zero", 0.0)], &[("neg", -2.5), ("mobile", 0.25)], &[("negzero", -0.0)], &[]];
    let (mut checked, mut entries, mut deleted) = (0, 0, 0);
    let mut seen = [0usize; 7]; // arms, features, gaps, seen, opted out, depth, -0.0 retained
    for i in 0..900usize {
        let t = t0 + i as i64 * MIN;
        let id = if i % 7 == 0 { format!("imp/{i}#x%") } else { format!("imp-{i}") };
        let items: Vec<String> = (0..(2 + i % 5)).map(|k| format!("sku-{}", (i * 7 + k * 13) % 41)).collect();
        let item_refs: Vec<&str> = items.iter().map(String::as_str).collect();
        let mut imp = impression(&id, models[i % 3], t, variants[i % 4].clone(), segments[i % 3], &item_refs);
        imp.features = features[i % 5].iter().map(|(n, v)| ((*n).to_string(), *v)).collect();
        if i % 6 == 1 {
            for (k, s) in imp.slate.iter_mut().enumerate() {
                s.position = 1 + 2 * k as u32;
            }
        }
        for (k, s) in imp.slate.iter_mut().enumerate() {
            s.propensity = 0.05 + 0.9 * (((i + k) % 10) as f64) / 10.0;
        }
        imp.opted_out = i % 11 == 3;
        let first = imp.slate[0].position;
        // Half of them as JSON, which (unlike protobuf, which omits it) carries a -0.0.
        let e = Event::Impression(imp);
        if i % 2 == 0 {
            feeder.feed(&spec, &e);
        } else {
            let payload = event::encode(TopicRole::Combined, Encoding::Json, &e);
            let r = InputRecord {
                topic: "events-json",
                partition: 0,
                offset: i as i64,
                role: TopicRole::Combined,
                encoding: Encoding::Json,
                payload: &payload,
                timestamp_ms: None,
            };
            assert!(matches!(feeder.state.apply(&spec, r), Applied::Event(_)), "impression {i} applied");
        }
        if i % 3 != 2 {
            let kind = [FeedbackKind::Click, FeedbackKind::AddToCart, FeedbackKind::Purchase][i % 3];
            feeder.feed(&spec, &Event::Feedback(feedback(&id, &items[0], first, kind, t + 1_000)));
        }
        if i % 97 == 96 || i == 899 {
            let negative_zero = (-0.0f64).to_bits();
            seen[6] += feeder
                .state
                .join
                .buffer
                .features
                .values()
                .flatten()
                .filter(|f| f.1.to_bits() == negative_zero)
                .count();
            let saved = checkpoint::save_changes(&spec, &mut feeder.state);
            for (key, value) in saved.puts.iter().filter(|(k, _)| k.starts_with("buf/")) {
                let raw = zstd::stream::decode_all(value.as_slice()).expect("a zstd frame");
                let segment = checkpoint::decode_segment(value).expect("a buffer segment");
                let canonical = segment.encode_to_vec();
                let first_difference = canonical.iter().zip(&raw).position(|(a, b)| a != b);
                assert!(
                    canonical == raw,
                    "{key}: not the bytes prost writes ({} bytes against prost's {}, first difference at {first_difference:?})",
                    raw.len(),
                    canonical.len()
                );
                checked += 1;
                entries += segment.entries.len();
                deleted += segment.deleted.len();
                for e in &segment.entries {
                    seen[0] += usize::from(e.variant_kind == 3);
                    seen[1] += usize::from(!e.features.is_empty());
                    seen[2] += usize::from(!e.positions.is_empty());
                    seen[3] += usize::from(!e.seen.is_empty());
                    seen[4] += usize::from(e.opted_out);
                    seen[5] += usize::from(e.depth > 0);
                }
            }
        }
    }
    assert!(
        checked >= 9 && entries > 500 && deleted > 0,
        "{checked} segments, {entries} entries, {deleted} deleted"
    );
    assert!(seen.iter().all(|n| *n > 0), "every field exercised: {seen:?}");
}
