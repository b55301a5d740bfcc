//! A seeded synthetic shop that writes recordings: items with hidden attractiveness per
//! segment, a position examination curve, a treatment policy that mostly shows the best items,
//! a random holdout, feedback of every kind with realistic delays, impressions that reach the
//! log late (so their feedback comes first), duplicates, orphans, opted-out shoppers and a share
//! of malformed records. The same seed always gives the same recording, byte for byte.
//!
//! The ground truth comes back with the records, so tests can check what the processor learned.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Exp};
use xxhash_rust::xxh3::xxh3_64;

use crate::core::event::{
    self, Encoding, Event, Feedback, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use crate::core::pb;
use crate::recording::Record;

#[derive(Debug, Clone)]
pub struct ShopSpec {
    pub seed: u64,
    pub impressions: usize,
    pub partitions: i32,
    pub items: usize,
    pub slate_size: usize,
    pub holdout_share: f64,
    pub malformed_share: f64,
    /// Each impression belongs to one of these models, chosen at random.
    pub model_ids: Vec<String>,
    pub impressions_topic: String,
    pub feedback_topic: String,
    pub impressions_encoding: Encoding,
    pub feedback_encoding: Encoding,
    /// Write both kinds to this one topic (as `banditflow.v1.Event`, in the impressions
    /// encoding) instead of two topics.
    pub combined_topic: Option<String>,
    /// Event time of the first impression (ms since the Unix epoch).
    pub start_ms: i64,
    /// Impression and item ids with the characters that separate or escape snapshot-topic
    /// keys (`/`, `#`, `%`), as real ids may (e.g. `women/shoes#42`).
    pub odd_ids: bool,
    /// Mean event-time gap between impressions (ms, exponential). Longer gaps make a run of a
    /// given size cover more event time (a soak that passes the funnel's 30-day window).
    pub mean_gap_ms: f64,
}

impl Default for ShopSpec {
    fn default() -> ShopSpec {
        ShopSpec {
            seed: 7,
            impressions: 2_000,
            partitions: 2,
            items: 40,
            slate_size: 6,
            holdout_share: 0.1,
            malformed_share: 0.01,
            model_ids: vec!["home".into()],
            impressions_topic: "impressions".into(),
            feedback_topic: "feedback".into(),
            impressions_encoding: Encoding::Protobuf,
            feedback_encoding: Encoding::Json,
            combined_topic: None,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            odd_ids: false,
            mean_gap_ms: 250.0,
        }
    }
}

pub const SEGMENTS: [&str; 3] = ["women", "men", "kids"];

/// Examination probability of a position in the synthetic shop.
pub fn examination(position: u32) -> f64 {
    1.0 / (1.0 + 0.3 * f64::from(position.saturating_sub(1)))
}

#[derive(Debug, Clone)]
pub struct Shop {
    /// Hidden click probability given examination, `[segment][item]`.
    pub attractiveness: Vec<Vec<f64>>,
    pub records: Vec<Record>,
    /// Valid events, as produced (the ground truth for totals).
    pub events: Vec<Event>,
    pub malformed: usize,
}

pub fn item_id(i: usize) -> String {
    format!("sku-{i:04}")
}

/// The id of item `i` under `spec` (see [`ShopSpec::odd_ids`]).
pub fn item_id_for(spec: &ShopSpec, i: usize) -> String {
    if spec.odd_ids {
        format!("cat/sku#{i:04}%")
    } else {
        item_id(i)
    }
}

/// The partition an impression id maps to (both topics use it, so they are co-partitioned).
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    (xxh3_64(key.as_bytes()) % partitions.max(1) as u64) as i32
}

struct Pending {
    arrival_ms: i64,
    seq: u64,
    topic: String,
    key: String,
    payload: Vec<u8>,
}

pub fn generate(spec: &ShopSpec) -> Shop {
    let spec = &match &spec.combined_topic {
        Some(t) => ShopSpec {
            impressions_topic: t.clone(),
            feedback_topic: t.clone(),
            feedback_encoding: spec.impressions_encoding,
            ..spec.clone()
        },
        None => spec.clone(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let n = spec.items.max(1);
    let k = spec.slate_size.clamp(1, n);
    let beta = Beta::new(1.5, 12.0).ok();
    let base: Vec<f64> = (0..n).map(|_| beta.as_ref().map_or(0.1, |b| b.sample(&mut rng))).collect();
    let attractiveness: Vec<Vec<f64>> = SEGMENTS
        .iter()
        .map(|_| base.iter().map(|a| (a * rng.random_range(0.5..1.5)).min(0.95)).collect())
        .collect();
    let best_by_segment: Vec<Vec<usize>> = attractiveness
        .iter()
        .map(|a| {
            let mut best: Vec<usize> = (0..n).collect();
            best.sort_by(|&x, &y| a[y].total_cmp(&a[x]).then(x.cmp(&y)));
            best
        })
        .collect();
    let gap = Exp::new(1.0 / spec.mean_gap_ms).ok();
    let delay = |rng: &mut ChaCha8Rng, mean_ms: f64| -> i64 {
        Exp::new(1.0 / mean_ms).map_or(mean_ms, |d| d.sample(rng)) as i64 + 1
    };

    let mut out: Vec<Pending> = Vec::new();
    let mut events = Vec::new();
    let mut seq = 0u64;
    let mut push = |out: &mut Vec<Pending>, arrival_ms: i64, topic: &str, key: &str, payload: Vec<u8>| {
        out.push(Pending { arrival_ms, seq, topic: topic.to_string(), key: key.to_string(), payload });
        seq += 1;
    };
    let mut t = spec.start_ms;
    for i in 0..spec.impressions {
        t += gap.as_ref().map_or(spec.mean_gap_ms, |g| g.sample(&mut rng)) as i64 + 1;
        let id = if spec.odd_ids {
            format!("imp/{:x}#{i}%2F", spec.seed)
        } else {
            format!("imp-{:x}-{i}", spec.seed)
        };
        let seg = rng.random_range(0..SEGMENTS.len());
        let holdout = rng.random::<f64>() < spec.holdout_share;
        let explore = rng.random::<f64>() < 0.2;
        // Treatment: the k most attractive items for the segment (80 %) or a random slate (20 %);
        // holdout: a random slate. Propensities follow exactly from that.
        let best = &best_by_segment[seg];
        let shown: Vec<usize> = if !holdout && !explore {
            best[..k].to_vec()
        } else {
            // The first k of a uniformly random permutation (partial Fisher–Yates).
            let mut order: Vec<usize> = (0..n).collect();
            for j in 0..k {
                let r = rng.random_range(j..n);
                order.swap(j, r);
            }
            order.truncate(k);
            order
        };
        let slate: Vec<SlateEntry> = shown
            .iter()
            .enumerate()
            .map(|(p, &it)| {
                let propensity = if holdout {
                    1.0 / n as f64
                } else {
                    0.8 * f64::from(u8::from(best[p] == it)) + 0.2 / n as f64
                };
                SlateEntry { item_id: item_id_for(spec, it), position: p as u32 + 1, propensity, score: 0.0 }
            })
            .collect();
        let opted_out = rng.random::<f64>() < 0.02;
        let pick = rng.random_range(0..spec.model_ids.len().max(1));
        let model_id = spec.model_ids.get(pick).cloned().unwrap_or_else(|| "home".into());
        let imp = Impression {
            impression_id: id.clone(),
            time_ms: t,
            model_id,
            model_version: 1,
            variant: if holdout { Variant::Holdout } else { Variant::Treatment },
            segment: SEGMENTS[seg].to_string(),
            features: vec![("mobile".into(), f64::from(u8::from(rng.random::<bool>())))],
            slate,
            opted_out,
        };
        // Most impressions reach the log within 50 ms; 3 % are logged up to 2 minutes late.
        let log_delay = if rng.random::<f64>() < 0.03 {
            rng.random_range(10_000..120_000)
        } else {
            rng.random_range(1..50)
        };
        let imp_event = Event::Impression(imp.clone());
        let payload =
            event::encode(role(spec, TopicRole::Impressions), spec.impressions_encoding, &imp_event);
        push(&mut out, t + log_delay, &spec.impressions_topic, &id, payload.clone());
        if rng.random::<f64>() < 0.003 {
            push(&mut out, t + log_delay + 5, &spec.impressions_topic, &id, payload);
        }
        events.push(imp_event);

        for entry in &imp.slate {
            let it = shown[entry.position as usize - 1];
            if rng.random::<f64>() >= examination(entry.position)
                || rng.random::<f64>() >= attractiveness[seg][it]
            {
                continue;
            }
            let mut ft = t + delay(&mut rng, 20_000.0);
            let mut emit = |rng: &mut ChaCha8Rng, kind: FeedbackKind, ft: i64, value: f64| {
                let fb = Event::Feedback(Feedback {
                    impression_id: id.clone(),
                    item_id: entry.item_id.clone(),
                    position: entry.position,
                    kind,
                    value,
                    time_ms: ft,
                });
                let payload = event::encode(role(spec, TopicRole::Feedback), spec.feedback_encoding, &fb);
                let arrival = ft + rng.random_range(1..50);
                if rng.random::<f64>() < 0.005 {
                    push(&mut out, arrival + 3, &spec.feedback_topic, &id, payload.clone());
                }
                push(&mut out, arrival, &spec.feedback_topic, &id, payload);
                events.push(fb);
            };
            emit(&mut rng, FeedbackKind::Click, ft, 0.0);
            if rng.random::<f64>() < 0.3 {
                ft += delay(&mut rng, 120_000.0);
                emit(&mut rng, FeedbackKind::AddToCart, ft, 0.0);
                if rng.random::<f64>() < 0.4 {
                    ft += delay(&mut rng, 1_200_000.0);
                    let value = (rng.random_range(2_000..20_000) as f64) / 100.0;
                    emit(&mut rng, FeedbackKind::Purchase, ft, value);
                    if rng.random::<f64>() < 0.2 {
                        ft += delay(&mut rng, 2.0 * 86_400_000.0);
                        emit(&mut rng, FeedbackKind::Return, ft, value);
                    }
                }
            }
        }
        // Feedback for an impression that was never logged.
        if rng.random::<f64>() < 0.003 {
            let ghost = format!("ghost-{:x}-{i}", spec.seed);
            let fb = Event::Feedback(Feedback {
                impression_id: ghost.clone(),
                item_id: item_id_for(spec, 0),
                position: 1,
                kind: FeedbackKind::Click,
                value: 0.0,
                time_ms: t,
            });
            let payload = event::encode(role(spec, TopicRole::Feedback), spec.feedback_encoding, &fb);
            push(&mut out, t + 10, &spec.feedback_topic, &ghost, payload);
            events.push(fb);
        }
        if rng.random::<f64>() < spec.malformed_share {
            let (topic, payload) = malformed(&mut rng, spec, &id, t);
            push(&mut out, t + 20, &topic, &id, payload);
        }
    }
    let malformed = out.len() - count_valid(&out, spec);
    out.sort_by_key(|p| (p.arrival_ms, p.seq));
    let mut next_offset = std::collections::BTreeMap::<(String, i32), i64>::new();
    let records = out
        .into_iter()
        .map(|p| {
            let partition = partition_for(&p.key, spec.partitions);
            let off = next_offset.entry((p.topic.clone(), partition)).or_insert(0);
            let offset = *off;
            *off += 1;
            Record {
                topic: p.topic,
                partition,
                offset,
                timestamp_ms: Some(p.arrival_ms),
                key: Some(p.key.into_bytes()),
                headers: vec![("producer".into(), b"synthetic-shop".to_vec())],
                payload: p.payload,
            }
        })
        .collect();
    Shop { attractiveness, records, events, malformed }
}

fn role(spec: &ShopSpec, natural: TopicRole) -> TopicRole {
    if spec.combined_topic.is_some() {
        TopicRole::Combined
    } else {
        natural
    }
}

fn count_valid(out: &[Pending], spec: &ShopSpec) -> usize {
    out.iter()
        .filter(|p| {
            let (natural, enc) = if p.topic == spec.impressions_topic && spec.combined_topic.is_none() {
                (TopicRole::Impressions, spec.impressions_encoding)
            } else if spec.combined_topic.is_some() {
                (TopicRole::Combined, spec.impressions_encoding)
            } else {
                (TopicRole::Feedback, spec.feedback_encoding)
            };
            event::decode(natural, enc, &p.payload).is_ok()
        })
        .count()
}

/// One malformed record of a kind chosen at random, on the topic where it would occur.
fn malformed(rng: &mut ChaCha8Rng, spec: &ShopSpec, id: &str, t: i64) -> (String, Vec<u8>) {
    let fb_json = |body: &str| (spec.feedback_topic.clone(), body.as_bytes().to_vec());
    match rng.random_range(0..7) {
        // Not protobuf at all.
        0 => (spec.impressions_topic.clone(), vec![0xff, 0xfe, 0x01, 0x80, 0x80]),
        // Truncated JSON.
        1 => fb_json(&format!("{{\"impression_id\":\"{id}\",\"item_id\":\"sku-0")),
        // Missing impression id.
        2 => fb_json(&format!(
            "{{\"item_id\":\"sku-0001\",\"position\":1,\"kind\":\"click\",\"value\":0,\"event_time_ms\":{t}}}"
        )),
        // Negative position.
        3 => fb_json(&format!(
            "{{\"impression_id\":\"{id}\",\"item_id\":\"sku-0001\",\"position\":-2,\"kind\":\"click\",\"value\":0,\"event_time_ms\":{t}}}"
        )),
        // Unknown feedback kind.
        4 => fb_json(&format!(
            "{{\"impression_id\":\"{id}\",\"item_id\":\"sku-0001\",\"position\":1,\"kind\":\"wishlist\",\"value\":0,\"event_time_ms\":{t}}}"
        )),
        // NaN propensity in a protobuf impression.
        5 => {
            use prost::Message;
            let m = pb::Impression {
                impression_id: format!("{id}-nan"),
                event_time_ms: t,
                model_id: spec.model_ids.first().cloned().unwrap_or_default(),
                slate: vec![pb::SlateItem { item_id: item_id(1), position: 1, propensity: f64::NAN, score: 0.0 }],
                ..Default::default()
            };
            (spec.impressions_topic.clone(), m.encode_to_vec())
        }
        // Truncated protobuf impression.
        _ => {
            use prost::Message;
            let m = pb::Impression {
                impression_id: format!("{id}-cut"),
                event_time_ms: t,
                model_id: spec.model_ids.first().cloned().unwrap_or_default(),
                slate: vec![pb::SlateItem { item_id: item_id(1), position: 1, propensity: 0.5, score: 0.0 }],
                ..Default::default()
            };
            let mut b = m.encode_to_vec();
            b.truncate(b.len() - 3);
            (spec.impressions_topic.clone(), b)
        }
    }
}
