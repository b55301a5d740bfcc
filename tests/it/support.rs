//! Shared helpers: a core spec for table tests and tolerant state comparison.

use std::collections::BTreeMap;

use banditflow::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use banditflow::core::model::ModelShard;
use banditflow::core::params::{
    Algorithm, CoreSpec, Examination, JoinSpec, KindReward, Limits, ModelSpec, PositionModel, Prior, Rewards,
};
use banditflow::core::partition::{Applied, InputRecord, PartitionState};

pub const T0: i64 = 1_767_225_600_000;
pub const MIN: i64 = 60_000;
pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 86_400_000;

pub fn rewards() -> Rewards {
    let k = |reward, window_ms| KindReward { reward, value_weight: 0.0, window_ms };
    Rewards { kinds: [k(1.0, HOUR), k(2.0, DAY), k(5.0, 7 * DAY), k(-5.0, 30 * DAY)], scale: 8.0 }
}

pub fn model(id: &str, algorithm: Algorithm, position: PositionModel, half_life_ms: i64) -> ModelSpec {
    ModelSpec {
        id: id.into(),
        algorithm,
        position,
        half_life_ms,
        prior: Prior { alpha: 1.0, beta: 9.0 },
        segment_priors: BTreeMap::new(),
        empirical_prior: false,
        rewards: rewards(),
        linear_features: Vec::new(),
    }
}

/// Three models covering the three learning paths: Beta + configured PBM, linear + cascade,
/// Beta + estimated examination.
pub fn spec_with_join(join: JoinSpec) -> CoreSpec {
    CoreSpec {
        models: vec![
            model(
                "pbm",
                Algorithm::BetaBernoulli,
                PositionModel::Pbm(Examination::Fixed(vec![1.0, 0.7, 0.5])),
                DAY,
            ),
            model(
                "lin",
                Algorithm::Linear { dim: 8, lambda: 1.0, hash_seed: 3 },
                PositionModel::Cascade,
                2 * DAY,
            ),
            model("est", Algorithm::BetaBernoulli, PositionModel::Pbm(Examination::Estimated), 0),
        ],
        rewards: rewards(),
        join,
        limits: Limits::default(),
    }
}

/// Windows and caps so generous that no attribution decision depends on arrival order.
pub fn unbounded_spec() -> CoreSpec {
    spec_with_join(JoinSpec {
        watermark_delay_ms: 0,
        grace_ms: 1_000 * DAY,
        late_retention_ms: 1_000 * DAY,
        learn_late: true,
        max_impressions: 1_000_000,
        max_pending_feedback: 1_000_000,
        funnel: [0; 4],
    })
}

pub fn impression(
    id: &str,
    model: &str,
    t: i64,
    variant: Variant,
    segment: &str,
    items: &[&str],
) -> Impression {
    Impression {
        impression_id: id.into(),
        time_ms: t,
        model_id: model.into(),
        model_version: 1,
        variant,
        segment: segment.into(),
        features: vec![("mobile".into(), 1.0)],
        slate: items
            .iter()
            .enumerate()
            .map(|(i, it)| SlateEntry {
                item_id: (*it).into(),
                position: i as u32 + 1,
                propensity: 0.5,
                score: 0.0,
            })
            .collect(),
        opted_out: false,
    }
}

pub fn feedback(imp: &str, item: &str, position: u32, kind: FeedbackKind, t: i64) -> Feedback {
    Feedback { impression_id: imp.into(), item_id: item.into(), position, kind, value: 0.0, time_ms: t }
}

/// Feeds events through the full record path (protobuf, combined topic) of one partition.
pub struct Feeder {
    pub state: PartitionState,
    next: i64,
}

impl Feeder {
    pub fn new(spec: &CoreSpec, partition: i32) -> Feeder {
        Feeder { state: PartitionState::new(spec, partition), next: 0 }
    }

    pub fn feed(&mut self, spec: &CoreSpec, e: &Event) -> Applied {
        self.next += 1;
        apply_event(&mut self.state, spec, e, self.next - 1, None)
    }
}

/// Applies `e` as the record at `offset` of a combined protobuf topic, with the Kafka record
/// timestamp `timestamp_ms` (none: not bounded in event time).
pub fn apply_event(
    state: &mut PartitionState,
    spec: &CoreSpec,
    e: &Event,
    offset: i64,
    timestamp_ms: Option<i64>,
) -> Applied {
    let payload = event::encode(TopicRole::Combined, Encoding::Protobuf, e);
    let r = InputRecord {
        topic: "events",
        partition: state.partition,
        offset,
        role: TopicRole::Combined,
        encoding: Encoding::Protobuf,
        payload: &payload,
        timestamp_ms,
    };
    state.apply(spec, r)
}

/// Integer statistics must match exactly; decayed floating-point sums within 1e-9 (relative,
/// or absolute when near zero), read at `now_ms`: they are equal up to the order of
/// floating-point additions. Raw sums are relative to the decay landmark, where an event's
/// weight can reach 2^64, so a difference is judged in units of one event read at `now_ms`.
pub fn assert_shards_equivalent(a: &ModelShard, b: &ModelShard, spec: &ModelSpec, now_ms: i64, what: &str) {
    assert_eq!(a.landmark_ms, b.landmark_ms, "{what}: landmark");
    let f = a.read_factor(spec, now_ms);
    let close = |x: f64, y: f64| {
        let (x, y) = (x * f, y * f);
        (x - y).abs() <= 1e-9 * (1.0 + x.abs() + y.abs())
    };
    assert_eq!(a.variants, b.variants, "{what}: variant statistics");
    let keys = |m: &ModelShard| {
        let mut k: Vec<(String, String)> =
            m.arms.iter().flat_map(|(s, items)| items.keys().map(move |i| (s.clone(), i.clone()))).collect();
        k.sort();
        k
    };
    assert_eq!(keys(a), keys(b), "{what}: arms");
    for (seg, items) in &a.arms {
        for (item, x) in items {
            let y = &b.arms[seg][item];
            assert_eq!(
                (x.impressions, x.feedback, x.reward_micros),
                (y.impressions, y.feedback, y.reward_micros),
                "{what}: counters of {seg}/{item}"
            );
            assert!(
                close(x.exposure, y.exposure),
                "{what}: exposure of {seg}/{item}: {} vs {}",
                x.exposure,
                y.exposure
            );
            assert!(
                close(x.success, y.success),
                "{what}: success of {seg}/{item}: {} vs {}",
                x.success,
                y.success
            );
            let n = x.position_exposure.len().max(y.position_exposure.len());
            for i in 0..n {
                let (p, q) = (
                    x.position_exposure.get(i).copied().unwrap_or(0.0),
                    y.position_exposure.get(i).copied().unwrap_or(0.0),
                );
                assert!(close(p, q), "{what}: position exposure {i} of {seg}/{item}");
            }
            assert_eq!(x.linear.len(), y.linear.len(), "{what}: linear statistics of {seg}/{item}");
            for (p, q) in x.linear.iter().zip(&y.linear) {
                assert!(close(*p, *q), "{what}: linear statistics of {seg}/{item}: {p} vs {q}");
            }
        }
    }
    assert_eq!(
        a.positions.keys().collect::<Vec<_>>(),
        b.positions.keys().collect::<Vec<_>>(),
        "{what}: positions"
    );
    for (pos, p) in &a.positions {
        let q = &b.positions[pos];
        assert_eq!((p.impressions, p.clicks), (q.impressions, q.clicks), "{what}: position {pos} counters");
        assert!(
            close(p.ips_impressions, q.ips_impressions) && close(p.ips_clicks, q.ips_clicks),
            "{what}: position {pos} ips"
        );
    }
    assert_eq!(a.linear_updates, b.linear_updates, "{what}: linear updates");
}

/// Totals a model must hold: per (segment, item) impressions, feedback per kind and reward;
/// per variant impressions and reward.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub arms: BTreeMap<(String, String), (u64, [u64; 4], i64)>,
    pub variants: BTreeMap<Variant, (u64, i64)>,
}

impl Totals {
    pub fn of(shard: &ModelShard) -> Totals {
        let mut t = Totals::default();
        for (seg, items) in &shard.arms {
            for (it, a) in items {
                t.arms.insert((seg.clone(), it.clone()), (a.impressions, a.feedback, a.reward_micros));
            }
        }
        t.variants =
            shard.variants.iter().map(|(v, s)| (v.clone(), (s.impressions, s.reward_micros))).collect();
        t
    }
}

/// Ground truth from a generator's own events, per configured model, counted without the
/// join: the first copy of each impression, opted-out impressions and their feedback excluded,
/// feedback for never-logged impressions excluded, repeated (impression, item, kind) counted
/// once. Valid when no window, grace or cap is crossed (the test shops stay well inside).
pub fn truth(config: &banditflow::config::Config, events: &[Event]) -> BTreeMap<String, Totals> {
    type Shown = (String, Variant, String, bool, Vec<String>);
    let mut shown: std::collections::HashMap<String, Shown> = std::collections::HashMap::new();
    for e in events {
        if let Event::Impression(i) = e {
            shown.entry(i.impression_id.clone()).or_insert((
                i.model_id.clone(),
                i.variant.clone(),
                i.segment.clone(),
                i.opted_out,
                i.slate.iter().map(|s| s.item_id.clone()).collect(),
            ));
        }
    }
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for (model, variant, seg, opted, items) in shown.values() {
        if *opted || config.core.model(model).is_none() {
            continue;
        }
        let t = out.entry(model.clone()).or_default();
        t.variants.entry(variant.clone()).or_default().0 += 1;
        for it in items {
            t.arms.entry((seg.clone(), it.clone())).or_default().0 += 1;
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for e in events {
        if let Event::Feedback(f) = e {
            let Some((model, variant, seg, opted, _)) = shown.get(&f.impression_id) else { continue };
            if *opted
                || config.core.model(model).is_none()
                || !seen.insert((f.impression_id.clone(), f.item_id.clone(), f.kind))
            {
                continue;
            }
            let reward = config.core.rewards.micros(f.kind, f.value);
            let t = out.entry(model.clone()).or_default();
            let a = t.arms.entry((seg.clone(), f.item_id.clone())).or_default();
            a.1[f.kind.index()] += 1;
            a.2 += reward;
            t.variants.entry(variant.clone()).or_default().1 += reward;
        }
    }
    out
}
