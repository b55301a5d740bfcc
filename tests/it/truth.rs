//! Exact totals against the ground truth: what the synthetic shop produced, counted
//! independently of the join, must equal what replay learned — exposures and rewards per item,
//! per variant — and the learned ranking must find the items the shop made attractive.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use banditflow::config::Config;
use banditflow::core::event::{Event, Variant};
use banditflow::generate::{self, ShopSpec};
use banditflow::replay;

#[test]
fn learned_totals_equal_what_was_produced() {
    let spec = ShopSpec {
        seed: 99,
        impressions: 3000,
        partitions: 3,
        model_ids: vec!["home".into()],
        ..ShopSpec::default()
    };
    let shop = generate::generate(&spec);
    let config = Config::from_layers(None, Vec::new()).expect("defaults");
    let mut run = replay::ReplayRun::default();
    for r in shop.records.clone() {
        replay::apply_record(&config, &mut run, r);
    }
    assert_eq!(run.dead_letters.len(), shop.malformed);

    // Ground truth from the generator's own events: first copy of each impression, opted-out
    // impressions and feedback for unknown impressions excluded, duplicates counted once.
    let mut shown: HashMap<String, (Variant, String, bool, Vec<String>)> = HashMap::new();
    for e in &shop.events {
        if let Event::Impression(i) = e {
            shown.entry(i.impression_id.clone()).or_insert((
                i.variant.clone(),
                i.segment.clone(),
                i.opted_out,
                i.slate.iter().map(|s| s.item_id.clone()).collect(),
            ));
        }
    }
    let mut expect_arm: BTreeMap<(String, String), (u64, [u64; 4], i64)> = BTreeMap::new();
    let mut expect_variant: BTreeMap<Variant, (u64, i64)> = BTreeMap::new();
    for (variant, seg, opted, items) in shown.values() {
        if *opted {
            continue;
        }
        expect_variant.entry(variant.clone()).or_default().0 += 1;
        for it in items {
            expect_arm.entry((seg.clone(), it.clone())).or_default().0 += 1;
        }
    }
    let mut seen = BTreeSet::new();
    for e in &shop.events {
        if let Event::Feedback(f) = e {
            let Some((variant, seg, opted, _)) = shown.get(&f.impression_id) else { continue };
            if *opted || !seen.insert((f.impression_id.clone(), f.item_id.clone(), f.kind)) {
                continue;
            }
            let reward = config.core.rewards.micros(f.kind, f.value);
            let a = expect_arm.entry((seg.clone(), f.item_id.clone())).or_default();
            a.1[f.kind.index()] += 1;
            a.2 += reward;
            expect_variant.entry(variant.clone()).or_default().1 += reward;
        }
    }

    let merged = replay::merged_models(&config, &run).expect("merges");
    let m = &merged[0].shard;
    let mut got_arm = BTreeMap::new();
    for (seg, items) in &m.arms {
        for (it, a) in items {
            got_arm.insert((seg.clone(), it.clone()), (a.impressions, a.feedback, a.reward_micros));
        }
    }
    assert_eq!(got_arm, expect_arm);
    let got_variant: BTreeMap<Variant, (u64, i64)> =
        m.variants.iter().map(|(v, s)| (v.clone(), (s.impressions, s.reward_micros))).collect();
    assert_eq!(got_variant, expect_variant);
    let c = run.counters();
    assert!(c.feedback_held > 0, "the shop logs some impressions after their feedback");
    assert!(c.feedback_duplicate > 0 && c.impressions_duplicate > 0 && c.feedback_orphaned > 0);

    // The shop's most attractive item per segment is in the learned top three.
    for (s, seg) in generate::SEGMENTS.iter().enumerate() {
        let truth = &shop.attractiveness[s];
        let best = (0..truth.len()).max_by(|&a, &b| truth[a].total_cmp(&truth[b])).expect("items");
        let mut learned: Vec<(f64, String)> = m.arms[*seg]
            .keys()
            .map(|it| {
                (
                    m.posterior(&config.core.models[0], seg, it, merged[0].meta.watermark_ms, None).mean(),
                    it.clone(),
                )
            })
            .collect();
        learned.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top: Vec<&String> = learned.iter().take(3).map(|x| &x.1).collect();
        assert!(
            top.contains(&&generate::item_id(best)),
            "{seg}: best {} not in learned top 3 {top:?}",
            generate::item_id(best)
        );
    }
}

/// The join's second line of defence with two input topics: a partition that applies every
/// feedback record of its partition before any of its impressions (what the Kafka edge did
/// when its aligner gave up waiting for an input, or what a recording sorted by topic holds)
/// must still learn exactly the generator's truth. The watermark is the oldest of the inputs'
/// clocks, so the feedback waits as held feedback instead of moving the watermark past the
/// impressions it belongs to. A state that does not know the impressions input exists yet (one
/// clock for the partition, as before per-input clocks) loses most of that feedback: the
/// check that this test can fail.
#[test]
fn feedback_applied_before_all_its_impressions_is_still_learned_exactly() {
    let spec = ShopSpec {
        seed: 41,
        impressions: 6000,
        partitions: 2,
        malformed_share: 0.0,
        model_ids: vec!["home".into()],
        ..ShopSpec::default()
    };
    let shop = generate::generate(&spec);
    let config = Config::from_layers(None, Vec::new()).expect("defaults");
    let (impressions, feedback): (Vec<_>, Vec<_>) =
        shop.records.iter().cloned().partition(|r| r.topic == config.topics[0].name);
    assert!(!impressions.is_empty() && feedback.len() > 1000);
    let totals = |run: &replay::ReplayRun| {
        let merged = replay::merged_models(&config, run).expect("merges");
        crate::support::Totals::of(&merged[0].shard)
    };
    let truth = crate::support::truth(&config, &shop.events);
    let mut run = replay::ReplayRun::default();
    for r in feedback.iter().chain(&impressions).cloned() {
        replay::apply_record(&config, &mut run, r);
    }
    let held: u64 = run.partitions.values().map(|p| p.join.counters.feedback_held).sum();
    assert!(held > 1000, "the feedback came first and was held ({held})");
    assert!(totals(&run) == truth["home"], "learned totals differ from the generator's truth");

    // One clock per partition: the feedback moves the watermark, the impressions expire.
    let mut one_clock = replay::ReplayRun::default();
    for r in feedback.iter().chain(&impressions).cloned() {
        let p = r.partition;
        one_clock.partitions.entry(p).or_insert_with(|| {
            let mut st = banditflow::core::partition::PartitionState::new(&config.core, p);
            st.join.changes.untracked = true;
            st.join.buffer.untracked = true;
            st
        });
        replay::apply_record(&config, &mut one_clock, r);
    }
    let clicks = |t: &crate::support::Totals| t.arms.values().map(|a| a.1[0]).sum::<u64>();
    assert!(
        clicks(&totals(&one_clock)) < clicks(&truth["home"]) / 2,
        "with one clock most clicks are lost: {} of {}",
        clicks(&totals(&one_clock)),
        clicks(&truth["home"])
    );
}
