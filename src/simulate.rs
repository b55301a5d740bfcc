//! Simulated traffic for learning measurements: Thompson sampling ranks, a shopper clicks by
//! the true rates, and the core learns through its own record path (the same
//! `PartitionState::apply` as the processor). Seeded; used by the suite's regret test and by
//! `cargo bench --bench priors`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use crate::core::params::CoreSpec;
use crate::core::partition::{InputRecord, PartitionState};
use crate::core::policy::{self, PolicySpec, RankRequest, Strategy};

/// Cumulative expected regret (best rate − chosen rate) after each of `rounds` single-slot
/// impressions of model 0 of `spec`, whose items `item-<k>` click with `rates[k]` when shown;
/// Thompson sampling without exploration floor; events at 1 ms apart from 2026-01-01.
pub fn thompson_regret_curve(spec: &CoreSpec, rates: &[f64], rounds: usize, seed: u64) -> Vec<f64> {
    let model = &spec.models[0];
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x2545_f491_4f6c_dd1d);
    let best = rates.iter().copied().fold(0.0, f64::max);
    let names: Vec<String> = (0..rates.len()).map(|k| format!("item-{k}")).collect();
    let policy =
        PolicySpec { strategy: Strategy::Thompson, epsilon: 0.0, propensity_samples: 1, propensity_rse: 0.0 };
    let mut state = PartitionState::new(spec, 0);
    state.join.changes.untracked = true;
    state.join.buffer.untracked = true;
    let mut offset = 0;
    let mut feed = |state: &mut PartitionState, e: Event| {
        let payload = event::encode(TopicRole::Combined, Encoding::Protobuf, &e);
        let r = InputRecord {
            topic: "events",
            partition: 0,
            offset,
            role: TopicRole::Combined,
            encoding: Encoding::Protobuf,
            payload: &payload,
            timestamp_ms: None,
        };
        offset += 1;
        state.apply(spec, r);
    };
    let t0 = 1_767_225_600_000i64;
    let mut total = 0.0;
    let mut curve = Vec::with_capacity(rounds);
    for t in 0..rounds {
        let now = t0 + t as i64;
        let req = RankRequest {
            segment: "s",
            features: &[],
            candidates: &names,
            slate_size: 1,
            now_ms: now,
            seed: seed.wrapping_mul(1_000_003).wrapping_add(t as u64),
            prior: None,
            linear: None,
        };
        let Some(chosen) = policy::rank(model, &state.models[0], &policy, &req).into_iter().next() else {
            break;
        };
        let k = names.iter().position(|n| *n == chosen.item_id).unwrap_or(0);
        total += best - rates[k];
        curve.push(total);
        let id = format!("i{t}");
        let slate =
            vec![SlateEntry { item_id: chosen.item_id.clone(), position: 1, propensity: 1.0, score: 0.0 }];
        feed(
            &mut state,
            Event::Impression(Impression {
                impression_id: id.clone(),
                time_ms: now,
                model_id: model.id.clone(),
                model_version: 1,
                variant: Variant::Treatment,
                segment: "s".into(),
                features: Vec::new(),
                slate,
                opted_out: false,
            }),
        );
        if rng.random::<f64>() < rates[k] {
            feed(
                &mut state,
                Event::Feedback(Feedback {
                    impression_id: id,
                    item_id: chosen.item_id,
                    position: 1,
                    kind: FeedbackKind::Click,
                    value: 0.0,
                    time_ms: now,
                }),
            );
        }
    }
    curve
}
