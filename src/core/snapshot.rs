//! Model snapshots: encoding to the `banditflow.v1.ModelSnapshot` contract, checked decoding,
//! and the merge of shard snapshots into one global model.
//!
//! Encoding is canonical: every list is sorted by its key, so the same state always gives the
//! same bytes. The checksum is xxh3-64 over the canonical encoding with `checksum = 0`. Decoding
//! never panics: truncated, corrupt or foreign bytes give a [`SnapshotError`].

use std::collections::BTreeMap;

use super::model::HashMap;

use prost::Message;
use xxhash_rust::xxh3::xxh3_64;

use super::event::{FeedbackKind, Variant};
use super::model::{ArmFold, ArmStats, ModelShard, PositionStats, VariantStats};
use super::params::{Algorithm, Examination, KindReward, ModelSpec, PositionModel, Prior, Rewards};
use super::pb;

/// A whole model (files, merged models, and shards of older builds): its arms inline.
pub const FORMAT_VERSION: u32 = 1;
/// A shard on the snapshot topic: everything but its arms, which are in the arm segments its
/// `arm_log` names (`core::armlog`).
pub const HEAD_FORMAT_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SnapshotError {
    #[error("snapshot bytes do not decode: {0}")]
    Decode(String),
    #[error("snapshot format version {found} is not supported (this build reads {FORMAT_VERSION} and {HEAD_FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("snapshot checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum { stored: u64, computed: u64 },
    #[error(
        "checkpoint format version {found} is not supported (this build reads {} and {}, and upgrades 2 and 1)",
        crate::core::checkpoint::PREVIOUS_FORMAT_VERSION,
        crate::core::checkpoint::FORMAT_VERSION
    )]
    CheckpointVersion { found: u32 },
    #[error("snapshot is invalid: {0}")]
    Invalid(String),
    #[error("stored state is incomplete: {0}")]
    Missing(String),
    #[error("cannot merge snapshots of model `{a}` and `{b}`")]
    ModelMismatch { a: String, b: String },
    #[error("cannot merge snapshots of model `{0}` learned with different parameters")]
    ParamsMismatch(String),
    #[error("nothing to merge")]
    Empty,
}

/// Where a snapshot comes from and what input it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotMeta {
    pub model_id: String,
    /// -1 for a merged model.
    pub source_partition: i32,
    pub version: u64,
    pub watermark_ms: i64,
    /// (topic, partition, next offset), sorted.
    pub input_offsets: Vec<(String, i32, i64)>,
}

#[derive(Debug, Clone)]
pub struct DecodedSnapshot {
    pub meta: SnapshotMeta,
    pub spec: ModelSpec,
    pub shard: ModelShard,
    /// Set when the snapshot was written by an older build in a layout this build learns
    /// differently: the config field a processor reports when it starts the model afresh.
    pub legacy: Option<&'static str>,
    /// A shard's head (format 2): where its arms are stored. `None` for a whole model.
    pub arm_log: Option<pb::ArmLog>,
    /// A merged model's shards ([`merge`] sets it; a merged head on the merged-model topic
    /// stores it). `None` for a shard.
    pub merged_from: Option<pb::MergedFrom>,
}

pub fn params_to_pb(spec: &ModelSpec) -> pb::ModelParams {
    let (algorithm, linear_dim, linear_lambda, feature_hash_seed) = match spec.algorithm {
        Algorithm::BetaBernoulli => (pb::Algorithm::BetaBernoulli, 0, 0.0, 0),
        Algorithm::Linear { dim, lambda, hash_seed } => (pb::Algorithm::Linear, dim, lambda, hash_seed),
    };
    let (position_model, examination, examination_estimated) = match &spec.position {
        PositionModel::Pbm(Examination::Fixed(w)) => (pb::PositionModel::Pbm, w.clone(), false),
        PositionModel::Pbm(Examination::Estimated) => (pb::PositionModel::Pbm, Vec::new(), true),
        PositionModel::Cascade => (pb::PositionModel::Cascade, Vec::new(), false),
    };
    pb::ModelParams {
        algorithm: algorithm as i32,
        position_model: position_model as i32,
        examination,
        examination_estimated,
        half_life_ms: spec.half_life_ms,
        prior: Some(pb::Prior { alpha: spec.prior.alpha, beta: spec.prior.beta }),
        empirical_prior: spec.empirical_prior,
        segment_priors: spec
            .segment_priors
            .iter()
            .map(|(s, p)| pb::SegmentPrior {
                segment: s.clone(),
                prior: Some(pb::Prior { alpha: p.alpha, beta: p.beta }),
            })
            .collect(),
        rewards: FeedbackKind::ALL
            .iter()
            .map(|k| {
                let r = spec.rewards.of(*k);
                pb::KindReward {
                    kind: k.to_pb() as i32,
                    reward: r.reward,
                    value_weight: r.value_weight,
                    window_ms: r.window_ms,
                }
            })
            .collect(),
        reward_scale: spec.rewards.scale,
        linear_dim,
        linear_lambda,
        feature_hash_seed,
        linear_features: spec.linear_features.clone(),
        position_clicks_kept: matches!(spec.position, PositionModel::Pbm(Examination::Estimated)),
    }
}

fn invalid(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(msg.into())
}

pub fn params_from_pb(model_id: &str, p: &pb::ModelParams) -> Result<ModelSpec, SnapshotError> {
    let algorithm = match pb::Algorithm::try_from(p.algorithm) {
        Ok(pb::Algorithm::BetaBernoulli) => Algorithm::BetaBernoulli,
        Ok(pb::Algorithm::Linear) => {
            if p.linear_dim == 0 || p.linear_dim > 4096 {
                return Err(invalid(format!("linear_dim {} out of range", p.linear_dim)));
            }
            Algorithm::Linear { dim: p.linear_dim, lambda: p.linear_lambda, hash_seed: p.feature_hash_seed }
        }
        _ => return Err(invalid(format!("unknown algorithm {}", p.algorithm))),
    };
    let position = match pb::PositionModel::try_from(p.position_model) {
        Ok(pb::PositionModel::Pbm) if p.examination_estimated => PositionModel::Pbm(Examination::Estimated),
        Ok(pb::PositionModel::Pbm) => PositionModel::Pbm(Examination::Fixed(p.examination.clone())),
        Ok(pb::PositionModel::Cascade) => PositionModel::Cascade,
        _ => return Err(invalid(format!("unknown position model {}", p.position_model))),
    };
    let prior = p
        .prior
        .as_ref()
        .map(|q| Prior { alpha: q.alpha, beta: q.beta })
        .ok_or_else(|| invalid("missing prior"))?;
    let mut kinds = [KindReward { reward: 0.0, value_weight: 0.0, window_ms: 0 }; 4];
    for r in &p.rewards {
        let kind = FeedbackKind::ALL
            .into_iter()
            .find(|k| k.to_pb() as i32 == r.kind)
            .ok_or_else(|| invalid(format!("unknown reward kind {}", r.kind)))?;
        kinds[kind.index()] =
            KindReward { reward: r.reward, value_weight: r.value_weight, window_ms: r.window_ms };
    }
    Ok(ModelSpec {
        id: model_id.to_string(),
        algorithm,
        position,
        half_life_ms: p.half_life_ms,
        prior,
        segment_priors: p
            .segment_priors
            .iter()
            .map(|s| {
                let q = s.prior.as_ref().map(|q| Prior { alpha: q.alpha, beta: q.beta }).unwrap_or(prior);
                (s.segment.clone(), q)
            })
            .collect(),
        empirical_prior: p.empirical_prior,
        rewards: Rewards { kinds, scale: p.reward_scale },
        linear_features: p.linear_features.clone(),
    })
}

pub fn variant_to_pb(v: &Variant) -> pb::Variant {
    match v {
        Variant::Treatment => pb::Variant { kind: pb::VariantKind::Treatment as i32, arm: String::new() },
        Variant::Holdout => pb::Variant { kind: pb::VariantKind::Holdout as i32, arm: String::new() },
        Variant::Arm(a) => pb::Variant { kind: pb::VariantKind::Experiment as i32, arm: a.clone() },
    }
}

pub fn variant_from_pb(v: Option<&pb::Variant>) -> Result<Variant, SnapshotError> {
    let v = v.ok_or_else(|| invalid("variant stats without a variant"))?;
    match pb::VariantKind::try_from(v.kind) {
        Ok(pb::VariantKind::Treatment) => Ok(Variant::Treatment),
        Ok(pb::VariantKind::Holdout) => Ok(Variant::Holdout),
        Ok(pb::VariantKind::Experiment) => Ok(Variant::Arm(v.arm.clone())),
        _ => Err(invalid(format!("unknown variant kind {}", v.kind))),
    }
}

/// The snapshot message for a shard (canonical, with its checksum set).
pub fn to_pb(spec: &ModelSpec, shard: &ModelShard, meta: &SnapshotMeta) -> pb::ModelSnapshot {
    to_pb_with(spec, shard, meta, None, None)
}

/// A shard's head: [`to_pb`] without the arms, naming where they are stored.
pub fn encode_head(spec: &ModelSpec, shard: &ModelShard, meta: &SnapshotMeta, log: pb::ArmLog) -> Vec<u8> {
    to_pb_with(spec, shard, meta, Some(log), None).encode_to_vec()
}

/// A merged model's head on the merged-model topic: a head that also names the shards merged.
pub fn encode_merged_head(
    spec: &ModelSpec,
    shard: &ModelShard,
    meta: &SnapshotMeta,
    log: pb::ArmLog,
    merged_from: pb::MergedFrom,
) -> Vec<u8> {
    to_pb_with(spec, shard, meta, Some(log), Some(merged_from)).encode_to_vec()
}

/// One arm as stored.
pub(crate) fn arm_to_pb(segment: &str, item: &str, a: &ArmStats) -> pb::ArmStats {
    pb::ArmStats {
        segment: segment.to_string(),
        item_id: item.to_string(),
        impressions: a.impressions,
        clicks: a.feedback[0],
        add_to_carts: a.feedback[1],
        purchases: a.feedback[2],
        returns: a.feedback[3],
        reward_micros: a.reward_micros,
        exposure: a.exposure,
        success: a.success,
        position_exposure: a.position_exposure.clone(),
        linear: a.linear.clone(),
        position_clicks: a.position_clicks.clone(),
    }
}

/// A stored arm (its linear statistics checked against the model's `linear_dim`, 0 for a
/// Beta model), with where it is stored.
pub(crate) fn arm_from_pb(
    a: pb::ArmStats,
    linear_dim: usize,
    stored: u32,
) -> Result<(String, String, ArmStats), SnapshotError> {
    let stats = ArmStats {
        impressions: a.impressions,
        feedback: [a.clicks, a.add_to_carts, a.purchases, a.returns],
        reward_micros: a.reward_micros,
        exposure: a.exposure,
        success: a.success,
        position_exposure: a.position_exposure,
        position_clicks: a.position_clicks,
        linear: a.linear,
        stored,
    };
    if !stats.linear.is_empty() && stats.linear.len() != crate::core::linear::stats_len(linear_dim) {
        return Err(invalid("an arm's linear statistics do not match linear_dim"));
    }
    Ok((a.segment, a.item_id, stats))
}

/// The dimension of a model's linear statistics (0 for a Beta model).
pub(crate) fn linear_dim(spec: &ModelSpec) -> usize {
    match spec.algorithm {
        Algorithm::Linear { dim, .. } => dim as usize,
        Algorithm::BetaBernoulli => 0,
    }
}

fn to_pb_with(
    spec: &ModelSpec,
    shard: &ModelShard,
    meta: &SnapshotMeta,
    arm_log: Option<pb::ArmLog>,
    merged_from: Option<pb::MergedFrom>,
) -> pb::ModelSnapshot {
    let mut arms: Vec<pb::ArmStats> =
        Vec::with_capacity(if arm_log.is_some() { 0 } else { shard.arm_count() });
    for (segment, items) in shard.arms.iter().filter(|_| arm_log.is_none()) {
        for (item, a) in items {
            arms.push(arm_to_pb(segment, item, a));
        }
    }
    arms.sort_by(|a, b| (&a.segment, &a.item_id).cmp(&(&b.segment, &b.item_id)));
    let mut offsets = meta.input_offsets.clone();
    offsets.sort();
    let mut snap = pb::ModelSnapshot {
        format_version: if arm_log.is_some() { HEAD_FORMAT_VERSION } else { FORMAT_VERSION },
        model_id: meta.model_id.clone(),
        source_partition: meta.source_partition,
        version: meta.version,
        watermark_ms: meta.watermark_ms,
        input_offsets: offsets
            .into_iter()
            .map(|(topic, partition, next_offset)| pb::InputOffset { topic, partition, next_offset })
            .collect(),
        params: Some(params_to_pb(spec)),
        decay_landmark_ms: shard.landmark_ms.unwrap_or(0),
        arms,
        positions: shard
            .positions
            .iter()
            .map(|(pos, p)| pb::PositionStats {
                position: *pos,
                impressions: p.impressions,
                clicks: p.clicks,
                ips_impressions: p.ips_impressions,
                ips_clicks: p.ips_clicks,
            })
            .collect(),
        variants: shard
            .variants
            .iter()
            .map(|(v, s)| pb::VariantStats {
                variant: Some(variant_to_pb(v)),
                impressions: s.impressions,
                reward_micros: s.reward_micros,
                reward_sq_micros2: s.reward_sq_micros2.to_string(),
            })
            .collect(),
        linear: match spec.algorithm {
            Algorithm::Linear { dim, .. } => Some(pb::LinearState {
                dim,
                xx_upper: Vec::new(),
                xr: Vec::new(),
                updates: shard.linear_updates,
            }),
            Algorithm::BetaBernoulli => None,
        },
        newest_impression_ms: shard.newest_impression_ms.unwrap_or(0),
        arm_log,
        checksum: 0,
        merged_from,
    };
    snap.checksum = xxh3_64(&snap.encode_to_vec());
    snap
}

pub fn encode(spec: &ModelSpec, shard: &ModelShard, meta: &SnapshotMeta) -> Vec<u8> {
    to_pb(spec, shard, meta).encode_to_vec()
}

pub fn decode(bytes: &[u8]) -> Result<DecodedSnapshot, SnapshotError> {
    let mut snap = pb::ModelSnapshot::decode(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    match (snap.format_version, &snap.arm_log) {
        (FORMAT_VERSION, None) => {}
        (HEAD_FORMAT_VERSION, Some(_)) if snap.arms.is_empty() => {}
        (FORMAT_VERSION | HEAD_FORMAT_VERSION, _) => {
            return Err(invalid(
                "a head must name its arm segments and hold no arms; a whole model the reverse",
            ))
        }
        (found, _) => return Err(SnapshotError::Version { found }),
    }
    let stored = snap.checksum;
    snap.checksum = 0;
    let computed = xxh3_64(&snap.encode_to_vec());
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    from_pb(snap)
}

/// [`decode`] of a whole model (a file): a shard's head, whose arms are elsewhere, is refused.
pub fn decode_whole(bytes: &[u8]) -> Result<DecodedSnapshot, SnapshotError> {
    let s = decode(bytes)?;
    if s.arm_log.is_some() {
        return Err(invalid(
            "this is a shard's head from the snapshot topic: its arms are in the arm segments it names \
             (read the topic with `inspect-topic`)",
        ));
    }
    Ok(s)
}

fn from_pb(snap: pb::ModelSnapshot) -> Result<DecodedSnapshot, SnapshotError> {
    let params = snap.params.as_ref().ok_or_else(|| invalid("missing params"))?;
    let mut spec = params_from_pb(&snap.model_id, params)?;
    let mut legacy = (matches!(spec.position, PositionModel::Pbm(Examination::Estimated))
        && !params.position_clicks_kept)
        .then_some("examination");
    if let Algorithm::Linear { dim, .. } = &mut spec.algorithm {
        if snap.linear.as_ref().is_some_and(|l| !l.xx_upper.is_empty()) {
            // An older build's one shared linear model: not convertible to per-arm statistics,
            // so it is dropped (the arms keep their Beta statistics): a processor starts the
            // model afresh (a reset, logged and counted), a serving node ranks its arms by the
            // prior until then. Older builds allowed up to 1,024 dimensions.
            legacy = Some("linear");
            *dim = (*dim).clamp(1, crate::core::linear::MAX_DIM);
        } else if !(1..=crate::core::linear::MAX_DIM).contains(dim) {
            return Err(invalid(format!("linear_dim {dim} out of range")));
        }
        if spec.linear_features.len() >= *dim as usize {
            return Err(invalid("more linear_features than linear_dim has slots"));
        }
    }
    let linear_dim = linear_dim(&spec);
    let mut arms: HashMap<String, HashMap<String, ArmStats>> = HashMap::default();
    for a in snap.arms {
        let (segment, item, stats) = arm_from_pb(a, linear_dim, crate::core::armlog::NEVER_STORED)?;
        if arms.entry(segment).or_default().insert(item, stats).is_some() {
            return Err(invalid("an arm appears twice"));
        }
    }
    let positions: BTreeMap<u32, PositionStats> = snap
        .positions
        .into_iter()
        .map(|p| {
            (
                p.position,
                PositionStats {
                    impressions: p.impressions,
                    clicks: p.clicks,
                    ips_impressions: p.ips_impressions,
                    ips_clicks: p.ips_clicks,
                },
            )
        })
        .collect();
    let mut variants = BTreeMap::new();
    for v in snap.variants {
        let sq: i128 =
            v.reward_sq_micros2.parse().map_err(|_| invalid("reward_sq_micros2 is not an integer"))?;
        variants.insert(
            variant_from_pb(v.variant.as_ref())?,
            VariantStats {
                impressions: v.impressions,
                reward_micros: v.reward_micros,
                reward_sq_micros2: sq,
            },
        );
    }
    let linear_updates = match (spec.algorithm, snap.linear) {
        (Algorithm::Linear { .. }, Some(l)) => l.updates,
        (Algorithm::Linear { .. }, None) => return Err(invalid("linear model without linear state")),
        (Algorithm::BetaBernoulli, _) => 0,
    };
    let has_data = !arms.is_empty()
        || !variants.is_empty()
        || !positions.is_empty()
        || snap.arm_log.as_ref().is_some_and(|l| l.arms > 0);
    let arm_total = arms.values().map(HashMap::len).sum();
    let shard = ModelShard {
        arm_total,
        newest_impression_ms: (snap.newest_impression_ms > 0).then_some(snap.newest_impression_ms),
        landmark_ms: if has_data { Some(snap.decay_landmark_ms) } else { None },
        arms,
        positions,
        variants,
        linear_updates,
        log: None,
    };
    let meta = SnapshotMeta {
        model_id: snap.model_id,
        source_partition: snap.source_partition,
        version: snap.version,
        watermark_ms: snap.watermark_ms,
        input_offsets: snap
            .input_offsets
            .into_iter()
            .map(|o| (o.topic, o.partition, o.next_offset))
            .collect(),
    };
    Ok(DecodedSnapshot { meta, spec, shard, legacy, arm_log: snap.arm_log, merged_from: snap.merged_from })
}

/// Source partitions merged together first. [`merge`] is a two-level tree: the shards of
/// partitions `[k·G, (k+1)·G)` are added in partition order into group `k`, then the groups'
/// merges in group order. An aggregation divided by group (each merging its group's shards,
/// then one merging the groups' merges) therefore computes the same bits as one merge of every
/// shard; with at most `G` partitions (one group) the merge is the plain fold in partition
/// order. (Decay rescalings are exact powers of two, so only the order of additions differs
/// between a tree and a fold.)
pub const MERGE_GROUP: i32 = 16;

/// Merges shard snapshots of one model into the global model, as the tree described at
/// [`MERGE_GROUP`]: the result does not depend on the order the shards are given in. Shards
/// may themselves be merges (with `merged_from`), such as one group's merge.
pub fn merge(snaps: &[DecodedSnapshot]) -> Result<DecodedSnapshot, SnapshotError> {
    merge_refs(&snaps.iter().collect::<Vec<_>>())
}

/// [`merge`] of shards held elsewhere (a serving node's newest shard per partition), without
/// copying them.
pub fn merge_refs(snaps: &[&DecodedSnapshot]) -> Result<DecodedSnapshot, SnapshotError> {
    merge_with(snaps, true)
}

/// [`merge_refs`] of everything but the arms: the merged model's head (meta, positions,
/// variants, landmark, `merged_from`) with no arms, for a merge that recomputes only the arms
/// that changed ([`merge_arm`]).
pub fn merge_heads(snaps: &[&DecodedSnapshot]) -> Result<DecodedSnapshot, SnapshotError> {
    merge_with(snaps, false)
}

/// The first source partition a shard covers: its own, or a merge's lowest.
fn first_partition(s: &DecodedSnapshot) -> i32 {
    match &s.merged_from {
        Some(m) => m.partitions.iter().copied().min().unwrap_or(s.meta.source_partition),
        None => s.meta.source_partition,
    }
}

/// The group of [`MERGE_GROUP`] partitions a shard belongs to (a merge: by its lowest partition).
pub fn merge_group(s: &DecodedSnapshot) -> i32 {
    first_partition(s).div_euclid(MERGE_GROUP)
}

/// The shards in the order [`merge`] adds them: by group, and within a group by partition.
pub fn merge_groups<'a>(snaps: &[&'a DecodedSnapshot]) -> Vec<Vec<&'a DecodedSnapshot>> {
    let mut order: Vec<&DecodedSnapshot> = snaps.to_vec();
    order.sort_by_key(|s| first_partition(s));
    let mut groups: Vec<Vec<&DecodedSnapshot>> = Vec::new();
    for s in order {
        match groups.last_mut() {
            Some(g) if g.first().map(|f| merge_group(f)) == Some(merge_group(s)) => g.push(s),
            _ => groups.push(vec![s]),
        }
    }
    groups
}

/// One arm of [`merge_refs`] of the shards grouped as [`merge_groups`] gives them, bit for bit,
/// computed alone (`None` when no shard with a landmark holds it): the fold within each group,
/// then over the groups.
pub fn merge_arm(groups: &[Vec<&DecodedSnapshot>], segment: &str, item: &str) -> Option<ArmStats> {
    let spec = &groups.first()?.first()?.spec;
    let mut top = ArmFold::default();
    for g in groups {
        let mut within = ArmFold::default();
        for s in g {
            within.add(spec, s.shard.landmark_ms, s.shard.arms.get(segment).and_then(|m| m.get(item)));
        }
        if groups.len() == 1 {
            return within.acc;
        }
        // A group's merge ends at the latest landmark among its shards.
        top.add(spec, within.landmark, within.acc.as_ref());
    }
    top.acc
}

fn merge_with(snaps: &[&DecodedSnapshot], arms: bool) -> Result<DecodedSnapshot, SnapshotError> {
    let groups = merge_groups(snaps);
    match groups.len() {
        0 => Err(SnapshotError::Empty),
        1 => fold(&groups[0], arms),
        _ => {
            let parts = groups.iter().map(|g| fold(g, arms)).collect::<Result<Vec<_>, _>>()?;
            fold(&parts.iter().collect::<Vec<_>>(), arms)
        }
    }
}

/// Adds `order`'s shards, in this order, into an empty merged model.
fn fold(order: &[&DecodedSnapshot], arms: bool) -> Result<DecodedSnapshot, SnapshotError> {
    let first = order.first().ok_or(SnapshotError::Empty)?;
    let spec = first.spec.clone();
    let mut shard = ModelShard::new(&spec);
    let mut meta = SnapshotMeta {
        model_id: first.meta.model_id.clone(),
        source_partition: -1,
        version: 0,
        watermark_ms: i64::MAX,
        input_offsets: Vec::new(),
    };
    for s in order {
        if s.meta.model_id != meta.model_id {
            return Err(SnapshotError::ModelMismatch {
                a: meta.model_id.clone(),
                b: s.meta.model_id.clone(),
            });
        }
        if s.spec != spec {
            return Err(SnapshotError::ParamsMismatch(meta.model_id.clone()));
        }
        if arms {
            shard.merge(&spec, &s.shard);
        } else {
            shard.merge_except_arms(&spec, &s.shard);
        }
        meta.version += s.meta.version;
        // A merged model is complete up to the slowest shard's watermark.
        meta.watermark_ms = meta.watermark_ms.min(s.meta.watermark_ms);
        meta.input_offsets.extend(s.meta.input_offsets.iter().cloned());
    }
    meta.input_offsets.sort();
    meta.input_offsets.dedup();
    let legacy = order.iter().find_map(|s| s.legacy);
    // What the merge covers: the shards' partitions (a merged model's own), and the oldest of
    // their newest learned impressions (a merged model's own oldest).
    let mut partitions: Vec<i32> = order
        .iter()
        .flat_map(|s| match &s.merged_from {
            Some(m) => m.partitions.clone(),
            None => vec![s.meta.source_partition],
        })
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    let oldest = order
        .iter()
        .filter_map(|s| match &s.merged_from {
            Some(m) => (m.oldest_newest_impression_ms > 0).then_some(m.oldest_newest_impression_ms),
            None => s.shard.newest_impression_ms,
        })
        .min()
        .unwrap_or(0);
    let merged_from = Some(pb::MergedFrom { partitions, oldest_newest_impression_ms: oldest });
    Ok(DecodedSnapshot { meta, spec, shard, legacy, arm_log: None, merged_from })
}
