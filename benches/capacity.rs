//! Checks the capacity model (docs/capacity.md) against measurements: a month of a shop's
//! traffic in event time, at three impression rates, through the core with the default
//! configuration (funnel, windows, late retention) — no Kafka, so a month takes seconds.
//!
//! The stream: an impression (6-item slate over 20,000 items, three segments) every 1/R s of
//! event time; a click on one of its items with probability `c`, 0–10 min later; of clicked
//! impressions, a purchase with probability `p / c`, 0–3 days after the impression; of
//! purchases, a return with probability `q`, 0–20 days after. Events are applied in event-time
//! order. After 31 days (the longest retention, 30 d + 1 h, has passed: steady state) it
//! reports, next to the model's prediction:
//!
//! - retained impressions (model: R × [(1 − c)·T₀ + (c − p)·T₁ + p·T₂]);
//! - heap bytes per retained impression (counting allocator around the join);
//! - changelog bytes per input event (a save, i.e. a segment, every 10,000 records: what
//!   `banditflow run` saves each second at 10,000 events/s per partition);
//! - restore time of the retained set from its live segments.
//!
//! Run: `cargo bench --bench capacity` (env CAPACITY_RATES, impressions/s of event time,
//! default "1,2,4"; CAPACITY_DAYS, default 31).

#![allow(unsafe_code)] // the counting allocator below

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use banditflow::core::checkpoint;
use banditflow::core::event::{Event, Feedback, FeedbackKind, Impression, SlateEntry, Variant};
use banditflow::core::params::CoreSpec;
use banditflow::core::partition::PartitionState;

#[path = "support/counting.rs"]
mod counting;
use counting::{Counting, COUNTING, LIVE};

#[global_allocator]
static GLOBAL: Counting = Counting;

const T0: i64 = 1_767_225_600_000;
const MIN: i64 = 60_000;
const DAY: i64 = 86_400_000;
const SAVE_EVERY: u64 = 10_000;
const CLICK: f64 = 0.03;
const PURCHASE: f64 = 0.005;
const RETURN: f64 = 0.2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn impression(i: u64, t: i64) -> Impression {
    Impression {
        impression_id: format!("{:016x}-{i}", 0xcafe_u64),
        time_ms: t,
        model_id: "home".into(),
        model_version: 1,
        variant: Variant::Treatment,
        segment: ["women", "men", "kids"][(i % 3) as usize].into(),
        features: Vec::new(),
        slate: (0..6u64)
            .map(|k| SlateEntry {
                item_id: format!("sku-{:06}", (i * 7 + k * 13) % 20_000),
                position: k as u32 + 1,
                propensity: 0.2,
                score: 0.0,
            })
            .collect(),
        opted_out: false,
    }
}

fn feedback(i: u64, kind: FeedbackKind, slot: u32, t: i64) -> Feedback {
    Feedback {
        impression_id: format!("{:016x}-{i}", 0xcafe_u64),
        item_id: format!("sku-{:06}", (i * 7 + u64::from(slot) * 13) % 20_000),
        position: slot + 1,
        kind,
        value: 0.0,
        time_ms: t,
    }
}

/// Retention per state with the configured windows: (unclicked, clicked, purchased), ms.
fn horizons(spec: &CoreSpec) -> (i64, i64, i64) {
    let w = |k: FeedbackKind| spec.rewards.of(k).window_ms;
    let late = spec.join.late_retention_ms;
    let clicked = w(FeedbackKind::Click).max(w(FeedbackKind::AddToCart)).max(w(FeedbackKind::Purchase));
    (w(FeedbackKind::Click) + late, clicked + late, clicked.max(w(FeedbackKind::Return)) + late)
}

fn run(spec: &CoreSpec, rate: f64, days: i64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut state = PartitionState::new(spec, 0);
    let (t_unclicked, t_clicked, t_purchased) = horizons(spec);
    let end = T0 + days * DAY;
    let step_ms = 1000.0 / rate;
    // Feedback due later, by event time.
    let mut due: BinaryHeap<Reverse<(i64, u64, u8, u32)>> = BinaryHeap::new();
    let mut offset = 0i64;
    let mut next_save = SAVE_EVERY;
    let (mut changelog_bytes, mut events) = (0usize, 0u64);
    let mut stored: std::collections::BTreeMap<String, Vec<u8>> = std::collections::BTreeMap::new();
    let mut last_header = Vec::new();
    let mut last_models: Vec<(String, Vec<u8>)> = Vec::new();
    let started = Instant::now();
    // A save as the processor makes it, applied to a compacted topic (newest value per key).
    let save = |state: &mut PartitionState,
                stored: &mut std::collections::BTreeMap<String, Vec<u8>>,
                bytes: &mut usize,
                header: &mut Vec<u8>,
                models: &mut Vec<(String, Vec<u8>)>| {
        let saved = checkpoint::save_changes(spec, state);
        for (k, v) in saved.puts {
            *bytes += k.len() + v.len();
            stored.insert(k, v);
        }
        for k in saved.deletes {
            stored.remove(&k);
        }
        *header = saved.header;
        *models = saved.models;
    };
    let mut i = 0u64;
    loop {
        let t_imp = T0 + (i as f64 * step_ms) as i64;
        let next_fb = due.peek().map(|Reverse(d)| d.0);
        let (t, ev) = match next_fb {
            Some(tf) if tf <= t_imp => {
                let Some(Reverse((tf, id, kind, slot))) = due.pop() else { break };
                (tf, Event::Feedback(feedback(id, FeedbackKind::ALL[usize::from(kind)], slot, tf)))
            }
            _ => {
                let slot = rng.random_range(0..6u32);
                if rng.random_bool(CLICK) {
                    due.push(Reverse((t_imp + rng.random_range(0..10 * MIN), i, 0, slot)));
                    if rng.random_bool(PURCHASE / CLICK) {
                        due.push(Reverse((t_imp + 10 * MIN + rng.random_range(0..3 * DAY), i, 2, slot)));
                        if rng.random_bool(RETURN) {
                            due.push(Reverse((t_imp + 3 * DAY + rng.random_range(0..20 * DAY), i, 3, slot)));
                        }
                    }
                }
                i += 1;
                (t_imp, Event::Impression(impression(i - 1, t_imp)))
            }
        };
        if t > end {
            break;
        }
        let payload = banditflow::core::event::encode(
            banditflow::core::event::TopicRole::Combined,
            banditflow::core::event::Encoding::Protobuf,
            &ev,
        );
        state.apply(
            spec,
            banditflow::core::partition::InputRecord {
                topic: "events",
                partition: 0,
                offset,
                role: banditflow::core::event::TopicRole::Combined,
                encoding: banditflow::core::event::Encoding::Protobuf,
                payload: &payload,
                timestamp_ms: Some(t),
            },
        );
        offset += 1;
        events += 1;
        if events >= next_save {
            // A save every SAVE_EVERY records: what `banditflow run` saves each second at
            // 10,000 events/s per partition.
            next_save = events + SAVE_EVERY;
            save(&mut state, &mut stored, &mut changelog_bytes, &mut last_header, &mut last_models);
        }
    }
    save(&mut state, &mut stored, &mut changelog_bytes, &mut last_header, &mut last_models);
    // The join's heap, counted on a copy of it (the models are not part of it; their size per
    // arm is reported by `benches/core.rs`).
    COUNTING.store(true, Ordering::Relaxed);
    let before = LIVE.load(Ordering::Relaxed);
    let copy = state.join.clone();
    let heap = LIVE.load(Ordering::Relaxed) - before;
    COUNTING.store(false, Ordering::Relaxed);
    drop(copy);
    let retained = state.join.buffered_impressions();
    let r = rate;
    let predicted = r
        * ((1.0 - CLICK) * t_unclicked as f64
            + (CLICK - PURCHASE) * t_clicked as f64
            + PURCHASE * t_purchased as f64)
        / 1000.0;
    let no_funnel = r * t_purchased as f64 / 1000.0;
    let segments: Vec<Vec<u8>> =
        stored.iter().filter(|(k, _)| k.starts_with("buf/")).map(|(_, v)| v.clone()).collect();
    let held: Vec<Vec<u8>> =
        stored.iter().filter(|(k, _)| k.starts_with("held/")).map(|(_, v)| v.clone()).collect();
    let topic_bytes: usize = segments.iter().map(Vec::len).sum();
    let models: Vec<_> = last_models
        .iter()
        .map(|(_, b)| banditflow::core::snapshot::decode(b).expect("snapshot decodes"))
        .collect();
    let t = Instant::now();
    let (restored, _) =
        checkpoint::restore(spec, &last_header, &segments, &[], &held, &models).expect("restores");
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(restored.join.buffered_impressions(), retained, "restore keeps the retained set");
    let c = &state.join.counters;
    println!(
        "rate {rate} impressions/s for {days} d of event time ({i} impressions, {events} events, {:.0} s to run):",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  retained {retained} (model {predicted:.0}, {:+.1} %; without a funnel {no_funnel:.0}: {:.0}× more)",
        (retained as f64 / predicted - 1.0) * 100.0,
        no_funnel / retained as f64
    );
    println!(
        "  attribution state {:.1} heap bytes per retained impression (held feedback, interned names and changelog bookkeeping included)",
        heap as f64 / retained as f64
    );
    println!(
        "  changelog written {:.1} bytes per input event; live segments on the topic {:.1} MB ({:.1} bytes per retained impression)",
        changelog_bytes as f64 / events as f64,
        topic_bytes as f64 / 1e6,
        topic_bytes as f64 / retained as f64
    );
    println!(
        "  restore {restore_s:.2} s ({:.2} s per million retained); attributed {}, late {}, released {}, orphaned {}, evicted {}",
        restore_s / retained as f64 * 1e6,
        c.feedback_attributed,
        c.feedback_late_learned + c.feedback_late_ignored,
        c.feedback_released,
        c.feedback_orphaned,
        c.impressions_evicted
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let config = banditflow::config::Config::from_layers(None, Vec::new()).expect("defaults are valid");
    let spec = config.core;
    let days: i64 = env_or("CAPACITY_DAYS", 31);
    let rates: Vec<f64> = std::env::var("CAPACITY_RATES")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    for rate in rates {
        run(&spec, rate, days);
    }
}
