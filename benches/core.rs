//! Core benchmarks (criterion). Each group measures banditflow's code next to a baseline in the
//! same run, so the figures in BENCHMARKS.md compare like with like on one machine:
//!
//! - decode: `event::decode` (prost + validation + domain types), `event::decode_in_place` (the
//!   processor's reader: strings borrowed, same validation) vs prost's decode alone;
//! - beta_update: `ModelShard::observe_impression` per placed item vs a bare HashMap increment;
//! - lints_update_d16: packed upper-triangle rank-1 update vs a full d×d update;
//! - join: impressions + feedback through `AttributionJoin` vs HashMap insert + lookup;
//! - snapshot_100k: encode, decode and 4-shard merge of 100k arms vs a memcpy of the bytes.
//!
//! Before the timed groups it prints the state size per item (heap bytes counted by a
//! counting allocator, and snapshot bytes per arm). Run: `cargo bench --bench core`.

#![allow(unsafe_code)] // the counting allocator below

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::Ordering;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use prost::Message;

use banditflow::core::event::{
    self, Encoding, Event, FeedbackKind, Impression, SlateEntry, TopicRole, Variant,
};
use banditflow::core::join::AttributionJoin;
use banditflow::core::linear;
use banditflow::core::model::{ImpressionRef, ModelShard};
use banditflow::core::params::{CoreSpec, Examination, JoinSpec, ModelSpec, PositionModel};
use banditflow::core::pb;
use banditflow::core::snapshot::{self, SnapshotMeta};

#[path = "support/counting.rs"]
mod counting;
use counting::{Counting, COUNTING, LIVE};

#[global_allocator]
static GLOBAL: Counting = Counting;

const T0: i64 = 1_767_225_600_000;

fn spec() -> CoreSpec {
    let config = banditflow::config::Config::from_layers(None, Vec::new()).expect("defaults are valid");
    let mut core = config.core;
    core.join = JoinSpec { max_impressions: 10_000_000, max_pending_feedback: 1_000_000, ..core.join };
    core
}

fn beta_model(core: &CoreSpec) -> ModelSpec {
    let mut m = core.models[0].clone();
    m.position = PositionModel::Pbm(Examination::Fixed(vec![1.0, 0.8, 0.6, 0.5, 0.4]));
    m
}

fn impression(i: usize, items: usize) -> Impression {
    Impression {
        impression_id: format!("imp-{i:08}"),
        time_ms: T0 + i as i64 * 10,
        model_id: "home".into(),
        model_version: 3,
        variant: if i % 10 == 0 { Variant::Holdout } else { Variant::Treatment },
        segment: ["women", "men", "kids"][i % 3].into(),
        features: vec![("mobile".into(), 1.0), ("hour".into(), 0.5)],
        slate: (0..6)
            .map(|p| SlateEntry {
                item_id: format!("sku-{:06}", (i * 7 + p * 13) % items),
                position: p as u32 + 1,
                propensity: 0.2,
                score: 0.0,
            })
            .collect(),
        opted_out: false,
    }
}

fn report_state_size() {
    let core = spec();
    let m = beta_model(&core);
    let n = 100_000;
    COUNTING.store(true, Ordering::Relaxed);
    let before = LIVE.load(Ordering::Relaxed);
    let mut shard = ModelShard::new(&m);
    for i in 0..n {
        let item = format!("sku-{i:06}");
        let imp = ImpressionRef { time_ms: T0 + i as i64, segment: "women", features: &[] };
        shard.observe_impression(&m, imp, &Variant::Treatment, &[(item.as_str(), 1, 0.5)], usize::MAX);
    }
    let after = LIVE.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::Relaxed);
    let meta = meta(&m);
    let bytes = snapshot::encode(&m, &shard, &meta);
    println!(
        "state size: {n} arms (item ids of 10 bytes): {:.1} heap bytes per arm in memory, {:.1} bytes per arm in the snapshot",
        (after - before) as f64 / n as f64,
        bytes.len() as f64 / n as f64
    );
}

/// The buffered impression as it was stored before compact entries (id-keyed map of owned
/// strings plus an ordered expiry set): the same-run baseline of the memory per impression.
#[allow(dead_code)]
struct OldEntry {
    time_ms: i64,
    model: usize,
    variant: Variant,
    segment: String,
    features: Vec<(String, f64)>,
    slate: Vec<(String, u32, f64)>,
    opted_out: bool,
    total_reward_micros: i64,
    seen: Vec<(u16, FeedbackKind)>,
    last_feedback_position: u32,
}

/// Heap bytes per retained impression (6-item slates from a catalogue of 20,000 items, three
/// segments, no context features: a Beta model's impressions), counted by the allocator, at
/// several buffer sizes (a hash table's load factor moves between its doublings), next to the
/// previous representation; and the time to restore the buffer from its changelog segments.
fn report_buffer_size() {
    let core = spec();
    let items = 20_000;
    for n in [300_000usize, 700_000, 1_000_000] {
        let imps: Vec<Impression> = (0..n)
            .map(|i| {
                let mut imp = impression(i, items);
                imp.features.clear();
                // 1 ms apart: all within the retention of an unclicked impression (2 h).
                imp.time_ms = T0 + i as i64;
                imp
            })
            .collect();
        // The models' arms exist before counting (a throwaway join learned the same stream),
        // so the count is the buffer's alone.
        let mut state = banditflow::core::partition::PartitionState::new(&core, 0);
        for imp in imps.iter().take(200_000) {
            AttributionJoin::untracked().process_impression(&core, &mut state.models, 0, &imp.view());
        }
        state.join = AttributionJoin::untracked();
        COUNTING.store(true, Ordering::Relaxed);
        let start = LIVE.load(Ordering::Relaxed);
        for imp in &imps {
            state.join.process_impression(&core, &mut state.models, 0, &imp.view());
        }
        let after = LIVE.load(Ordering::Relaxed);
        assert_eq!(state.join.buffered_impressions(), n, "all retained");
        let mut old: HashMap<String, OldEntry> = HashMap::new();
        let mut order = std::collections::BTreeSet::new();
        let old_start = LIVE.load(Ordering::Relaxed);
        for imp in imps.iter().cloned() {
            order.insert((imp.time_ms, imp.impression_id.clone()));
            old.insert(
                imp.impression_id,
                OldEntry {
                    time_ms: imp.time_ms,
                    model: 0,
                    variant: imp.variant,
                    segment: imp.segment,
                    features: imp.features,
                    slate: imp.slate.into_iter().map(|s| (s.item_id, s.position, s.propensity)).collect(),
                    opted_out: false,
                    total_reward_micros: 0,
                    seen: Vec::new(),
                    last_feedback_position: 0,
                },
            );
        }
        let old_after = LIVE.load(Ordering::Relaxed);
        COUNTING.store(false, Ordering::Relaxed);
        println!(
            "attribution buffer: {n} retained impressions (6-item slates, {items} items): {:.1} heap bytes per impression; previous representation (same run): {:.1}",
            (after - start) as f64 / n as f64,
            (old_after - old_start) as f64 / n as f64
        );
        drop((old, order));
        if n == 1_000_000 {
            state.join.changes.untracked = false;
            state.join.buffer.untracked = false;
            let saved = banditflow::core::checkpoint::save_all(&core, &state);
            let segs: Vec<Vec<u8>> =
                saved.puts.iter().filter(|(k, _)| k.starts_with("buf/")).map(|(_, v)| v.clone()).collect();
            let models: Vec<_> =
                saved.models.iter().map(|(_, b)| snapshot::decode(b).expect("decodes")).collect();
            let bytes: usize = segs.iter().map(Vec::len).sum();
            let t = std::time::Instant::now();
            let cpu = cpu_seconds();
            let (restored, _) =
                banditflow::core::checkpoint::restore(&core, &saved.header, &segs, &[], &[], &models)
                    .expect("restores");
            println!(
                "restore of {n} retained impressions from {:.1} MB of segments ({:.1} bytes each): {:.2} s wall, {:.2} s CPU",
                bytes as f64 / 1e6,
                bytes as f64 / n as f64,
                t.elapsed().as_secs_f64(),
                cpu_seconds() - cpu
            );
            assert_eq!(restored.join.buffered_impressions(), n);
        }
    }
}

/// CPU seconds (user + system) of this process so far, from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

/// Snapshot metadata for a bench shard (partition 0, version 1).
fn meta(m: &ModelSpec) -> SnapshotMeta {
    SnapshotMeta {
        model_id: m.id.clone(),
        source_partition: 0,
        version: 1,
        watermark_ms: T0,
        input_offsets: vec![],
    }
}

fn decode(c: &mut Criterion) {
    let payloads: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            event::encode(TopicRole::Impressions, Encoding::Protobuf, &Event::Impression(impression(i, 5000)))
        })
        .collect();
    let mut g = c.benchmark_group("decode_impression");
    g.throughput(Throughput::Elements(payloads.len() as u64));
    g.bench_function("banditflow_decode_validate", |b| {
        b.iter(|| {
            for p in &payloads {
                black_box(event::decode(TopicRole::Impressions, Encoding::Protobuf, p).is_ok());
            }
        })
    });
    g.bench_function("banditflow_decode_in_place", |b| {
        b.iter(|| {
            for p in &payloads {
                black_box(matches!(
                    event::decode_in_place(TopicRole::Impressions, Encoding::Protobuf, p),
                    Some(Ok(_))
                ));
            }
        })
    });
    g.bench_function("baseline_prost_decode_only", |b| {
        b.iter(|| {
            for p in &payloads {
                black_box(pb::Impression::decode(p.as_slice()).is_ok());
            }
        })
    });
    g.finish();
}

fn beta_update(c: &mut Criterion) {
    let core = spec();
    let m = beta_model(&core);
    let items: Vec<String> = (0..10_000).map(|i| format!("sku-{i:06}")).collect();
    let slates: Vec<Vec<(&str, u32, f64)>> = (0..1000)
        .map(|i| {
            (0..10).map(|p| (items[(i * 31 + p * 977) % items.len()].as_str(), p as u32 + 1, 0.2)).collect()
        })
        .collect();
    let mut shard = ModelShard::new(&m);
    for s in &slates {
        shard.observe_impression(
            &m,
            ImpressionRef { time_ms: T0, segment: "women", features: &[] },
            &Variant::Treatment,
            s,
            usize::MAX,
        );
    }
    let mut g = c.benchmark_group("beta_update");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("banditflow_observe_impression_per_item", |b| {
        b.iter(|| {
            for (k, s) in slates.iter().enumerate() {
                let imp = ImpressionRef { time_ms: T0 + k as i64, segment: "women", features: &[] };
                shard.observe_impression(&m, imp, &Variant::Treatment, s, usize::MAX);
            }
        })
    });
    let mut naive: HashMap<String, (f64, f64)> = items.iter().map(|i| (i.clone(), (0.0, 0.0))).collect();
    g.bench_function("baseline_hashmap_increment", |b| {
        b.iter(|| {
            for s in &slates {
                for (item, _, _) in s {
                    if let Some(v) = naive.get_mut(*item) {
                        v.0 += 1.0;
                        v.1 += 0.5;
                    }
                }
            }
        })
    });
    g.finish();
}

fn lints_update(c: &mut Criterion) {
    // The default hashed space (the intercept and 7 feature slots).
    let d = 8;
    let space = linear::FeatureSpace { dim: d, hash_seed: 7, names: &[] };
    let xs: Vec<Vec<f64>> = (0..1000)
        .map(|i| {
            let mut x = Vec::new();
            space.vector(&[("mobile".into(), 1.0), ("hour".into(), f64::from(i % 24) / 24.0)], &mut x);
            // A dense vector, the worst case for the update.
            x.iter_mut().enumerate().for_each(|(j, v)| *v += (j as f64 + 1.0) * 1e-3);
            x
        })
        .collect();
    let mut state = Vec::new();
    let mut g = c.benchmark_group("lints_update_d8");
    g.throughput(Throughput::Elements(xs.len() as u64));
    g.bench_function("banditflow_packed_rank1_plus_reward", |b| {
        b.iter(|| {
            for x in &xs {
                linear::add_exposure(&mut state, x, 0.7);
                linear::add_reward(&mut state, x, 0.125);
            }
        })
    });
    let mut full = vec![0.0f64; d * d];
    let mut xr = vec![0.0f64; d];
    g.bench_function("baseline_full_matrix_rank1_plus_reward", |b| {
        b.iter(|| {
            for x in &xs {
                for i in 0..d {
                    for j in 0..d {
                        full[i * d + j] += 0.7 * x[i] * x[j];
                    }
                    xr[i] += 0.125 * x[i];
                }
            }
        })
    });
    g.bench_function("banditflow_feature_hashing", |b| {
        let mut x = Vec::new();
        let ctx = vec![("mobile".to_string(), 1.0), ("hour".to_string(), 0.5)];
        b.iter(|| {
            for _ in 0..1000 {
                space.vector(&ctx, &mut x);
                black_box(&x);
            }
        })
    });
    g.finish();
}

fn join(c: &mut Criterion) {
    let core = spec();
    let n = 2000;
    let imps: Vec<Impression> = (0..n).map(|i| impression(i, 5000)).collect();
    let fbs: Vec<event::Feedback> = imps
        .iter()
        .map(|i| event::Feedback {
            impression_id: i.impression_id.clone(),
            item_id: i.slate[1].item_id.clone(),
            position: 2,
            kind: FeedbackKind::Click,
            value: 0.0,
            time_ms: i.time_ms + 5_000,
        })
        .collect();
    let mut g = c.benchmark_group("attribution_join");
    g.throughput(Throughput::Elements((imps.len() + fbs.len()) as u64));
    g.bench_function("banditflow_join_and_learn", |b| {
        b.iter_batched(
            || {
                (
                    AttributionJoin::new(),
                    core.models.iter().map(ModelShard::new).collect::<Vec<_>>(),
                    imps.clone(),
                    fbs.clone(),
                )
            },
            |(mut j, mut models, imps, fbs)| {
                for (imp, fb) in imps.into_iter().zip(fbs) {
                    j.process_impression(&core, &mut models, 0, &imp.view());
                    j.process_feedback(&core, &mut models, &fb.view());
                }
                black_box(j.counters.feedback_attributed)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("baseline_hashmap_insert_lookup", |b| {
        b.iter_batched(
            || (HashMap::<String, Impression>::new(), imps.clone(), fbs.clone()),
            |(mut h, imps, fbs)| {
                let mut hits = 0u64;
                for (imp, fb) in imps.into_iter().zip(fbs) {
                    h.insert(imp.impression_id.clone(), imp);
                    hits += u64::from(h.contains_key(&fb.impression_id));
                }
                black_box(hits)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn big_shard(m: &ModelSpec, n: usize, offset: usize) -> ModelShard {
    let mut shard = ModelShard::new(m);
    for i in 0..n {
        let item = format!("sku-{:06}", i + offset);
        let imp = ImpressionRef { time_ms: T0 + i as i64, segment: ["women", "men"][i % 2], features: &[] };
        shard.observe_impression(
            m,
            imp,
            &Variant::Treatment,
            &[(item.as_str(), (i % 5) as u32 + 1, 0.5)],
            usize::MAX,
        );
    }
    shard
}

fn snapshots(c: &mut Criterion) {
    let core = spec();
    let m = beta_model(&core);
    let n = 100_000;
    let shard = big_shard(&m, n, 0);
    let meta = meta(&m);
    let bytes = snapshot::encode(&m, &shard, &meta);
    let mut g = c.benchmark_group("snapshot_100k_arms");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("banditflow_encode", |b| {
        b.iter(|| black_box(snapshot::encode(&m, &shard, &meta).len()))
    });
    g.bench_function("banditflow_decode_verify", |b| b.iter(|| black_box(snapshot::decode(&bytes).is_ok())));
    g.bench_function("baseline_memcpy_of_encoded_bytes", |b| b.iter(|| black_box(bytes.to_vec().len())));
    // Four partition shards of 25k arms each (half the items shared between shards).
    let parts: Vec<_> = (0..4)
        .map(|p| {
            let s = big_shard(&m, n / 4, p * n / 8);
            let meta = SnapshotMeta { source_partition: p as i32, ..meta.clone() };
            snapshot::decode(&snapshot::encode(&m, &s, &meta)).expect("decodes")
        })
        .collect();
    g.bench_function("banditflow_merge_4_shards", |b| {
        b.iter(|| black_box(snapshot::merge(&parts).map(|m| m.shard.arm_count())))
    });
    g.finish();
}

/// A decay weight per event at distinct milliseconds (every event's cost in the learning path),
/// against libm's `exp2` (not portable to the last bit, so not used) in the same run.
fn decay_weight(c: &mut Criterion) {
    let h = 7 * 86_400_000;
    let landmark = banditflow::core::decay::landmark_for(h, T0);
    let mut g = c.benchmark_group("decay_weight");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("banditflow_weight", |b| {
        b.iter(|| {
            let mut sum = 0.0;
            for k in 0..10_000i64 {
                sum += banditflow::core::decay::weight(h, landmark, std::hint::black_box(T0 + k * 37));
            }
            sum
        })
    });
    g.bench_function("baseline_libm_exp2", |b| {
        b.iter(|| {
            let mut sum = 0.0;
            for k in 0..10_000i64 {
                let t = std::hint::black_box(T0 + k * 37);
                sum += ((t as f64 - landmark as f64) / h as f64).exp2();
            }
            sum
        })
    });
    g.finish();
}

criterion_group!(benches, decode, beta_update, lints_update, join, snapshots, decay_weight);

fn main() {
    report_state_size();
    report_buffer_size();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
