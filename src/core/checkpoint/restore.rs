//! Restoring a partition from its stored records: the checkpoint header, the attribution
//! changelog's segments and held feedback, and the models' heads and arm segments, checked
//! against what the header says must be there.

use super::*;

/// Restores a segment entry, or a format-1 record, as a join entry: names interned.
fn restore_entry(
    join: &mut AttributionJoin,
    model: usize,
    key: Key,
    parts: RestoredParts<'_>,
) -> Result<(Entry, Option<crate::core::buffer::HeapSlate>), SnapshotError> {
    let b = &mut join.buffer;
    if parts.items.len() != parts.positions.len()
        || parts.items.len() != parts.propensities.len()
        || (!parts.seen.is_empty() && parts.seen.len() != parts.items.len())
        || parts.items.len() > event::MAX_SLATE_LEN
    {
        return Err(invalid("buffer entry with inconsistent slate"));
    }
    let slots: Vec<(u32, u32, f32)> = parts
        .items
        .iter()
        .zip(&parts.positions)
        .zip(&parts.propensities)
        .map(|((i, p), q)| (b.names.intern(i), *p, *q))
        .collect();
    let (mut slate, mut heap) = Slate::new(&slots);
    for (i, s) in parts.seen.iter().enumerate() {
        slate.set_seen(i, *s, heap.as_mut());
    }
    if parts.depth as usize > slots.len() {
        return Err(invalid("buffer entry with a cascade depth beyond its slate"));
    }
    let variant = b.intern_variant(&parts.variant);
    if !parts.features.is_empty() {
        b.features.insert(key, parts.features);
    }
    let entry = Entry {
        key,
        time_ms: parts.time_ms,
        total_reward_micros: parts.total_reward_micros,
        segment: b.names.intern(parts.segment),
        variant,
        changelog: UNSAVED,
        depth: parts.depth as u16,
        model: model as u8,
        opted_out: parts.opted_out,
        slate,
    };
    Ok((entry, heap))
}

struct RestoredParts<'a> {
    time_ms: i64,
    variant: Variant,
    segment: &'a str,
    items: Vec<&'a str>,
    positions: Vec<u32>,
    propensities: Vec<f32>,
    seen: Vec<u8>,
    total_reward_micros: i64,
    opted_out: bool,
    depth: u32,
    features: Vec<(String, f64)>,
}

/// Rebuilds a partition from its header, its buffer segments (values of `buf/…` keys, in key
/// order, which is sequence order), format-1 buffered impressions (values of `imp/…` keys, upgraded: written into the
/// next segment), held feedback (values of `held/…`) and the model snapshots of the header's
/// version, under the parameters configured now. Configuration changes never fail a restore:
/// each model's outcome is returned ([`ModelChange`], classes in `core::reconfigure`). A model
/// reset or removed loses its buffered impressions too (deleted in the next segment); a
/// removed model's snapshot record is deleted likewise.
pub fn restore(
    spec: &CoreSpec,
    header: &[u8],
    segments: &[Vec<u8>],
    legacy_impressions: &[Vec<u8>],
    held: &[Vec<u8>],
    models: &[DecodedSnapshot],
) -> Result<(PartitionState, Vec<(String, ModelChange)>), SnapshotError> {
    let decode_err = |e: prost::DecodeError| SnapshotError::Decode(e.to_string());
    let mut cp = pb::PartitionCheckpoint::decode(header).map_err(decode_err)?;
    if cp.format_version != FORMAT_VERSION
        && cp.format_version != PREVIOUS_FORMAT_VERSION
        && !UPGRADED_FORMAT_VERSIONS.contains(&cp.format_version)
    {
        return Err(SnapshotError::CheckpointVersion { found: cp.format_version });
    }
    let stored = cp.checksum;
    cp.checksum = 0;
    let computed = xxh3_64(&cp.encode_to_vec());
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let mut state = PartitionState::new(spec, cp.partition);
    state.records = cp.records;
    for t in &cp.input_times {
        state.inputs.push(crate::core::partition::InputClock {
            topic: t.topic.clone(),
            newest_ms: Some(t.newest_ms),
            idle: false,
        });
    }
    for o in &cp.input_offsets {
        state.offsets.insert((o.topic.clone(), o.partition), o.next_offset);
    }
    let mut report = Vec::new();
    // Buffered impressions of these models are dropped.
    let mut dropped: Vec<String> = Vec::new();
    let mut changes = JoinChanges::default();
    for id in &cp.models {
        if spec.model(id).is_none() {
            report.push((id.clone(), ModelChange::Removed));
            dropped.push(id.clone());
            changes.models_retired.push(id.clone());
            // Its arm segments go with its head.
            if let Some(log) =
                models.iter().find(|s| &s.meta.model_id == id).and_then(|s| s.shard.log.as_ref())
            {
                changes
                    .keys_deleted
                    .extend(log.segments.keys().map(|q| armlog::segment_key(id, cp.partition, *q)));
            }
        }
    }
    // Shards stored whole by an older build are written again as a head and arm segments.
    let mut rewrite_models = false;
    for (i, m) in spec.models.iter().enumerate() {
        let found = models.iter().find(|s| s.meta.model_id == m.id);
        match found {
            Some(s) => {
                if s.meta.version != cp.records || s.meta.source_partition != cp.partition {
                    return Err(invalid(format!(
                        "model `{}` snapshot is version {} of partition {}, checkpoint is version {} of partition {}",
                        m.id, s.meta.version, s.meta.source_partition, cp.records, cp.partition
                    )));
                }
                if let Some(field) =
                    s.legacy.map(str::to_string).or_else(|| reconfigure::reset_field(&s.spec, m))
                {
                    report.push((m.id.clone(), ModelChange::Reset { field }));
                    dropped.push(m.id.clone());
                    // The fresh shard's first save deletes the old arm segments.
                    if let Some(old) = &s.shard.log {
                        let mut log = armlog::ArmLog::new();
                        log.next = old.next;
                        log.retired = old.segments.keys().copied().collect();
                        state.models[i].log = Some(Box::new(log));
                    }
                    continue;
                }
                let mut shard = s.shard.clone();
                if shard.log.is_none() {
                    rewrite_models = true;
                }
                if s.spec.half_life_ms != m.half_life_ms {
                    let at = cp.max_event_time_ms.or(shard.landmark_ms).unwrap_or(0);
                    shard.change_half_life(s.spec.half_life_ms, m.half_life_ms, at);
                    report.push((
                        m.id.clone(),
                        ModelChange::HalfLifeChanged { from_ms: s.spec.half_life_ms, to_ms: m.half_life_ms },
                    ));
                }
                let read_time = reconfigure::read_time_fields(&s.spec, m);
                if !read_time.is_empty() || s.spec.half_life_ms == m.half_life_ms {
                    report.push((m.id.clone(), ModelChange::Kept { read_time }));
                }
                state.models[i] = shard;
            }
            None if cp.models.contains(&m.id) => {
                return Err(invalid(format!(
                    "model `{}` snapshot of version {} is missing",
                    m.id, cp.records
                )))
            }
            None => report.push((m.id.clone(), ModelChange::Added)),
        }
    }
    let mut join = AttributionJoin::new();
    join.max_event_time_ms = cp.max_event_time_ms;
    join.next_seq = cp.next_sequence;
    join.counters = counters_from(&cp.join_counters)?;
    join.buffer.next_segment = cp.next_buffer_segment;
    let wm = join.watermark_ms(spec);
    let r = AttributionJoin::retention(spec);
    // Which model a stored model id is now; `None` for one dropped now or earlier (a segment
    // may outlive the restore that dropped its model, its entries hidden by delete markers).
    let model_index = |id: &str| -> Option<usize> {
        if dropped.iter().any(|d| d == id) {
            return None;
        }
        spec.models.iter().position(|m| m.id == id)
    };
    // (key, stored retention end) of dropped models' entries: deleted in the next segment.
    let mut to_delete: Vec<(Key, i64)> = Vec::new();
    // Format 1: a record per impression, rewritten into the next segment.
    for raw in legacy_impressions {
        let b = pb::BufferedImpression::decode(raw.as_slice()).map_err(decode_err)?;
        let key = Key::of(&b.impression_id);
        let Some(model) = model_index(&b.model_id) else { continue };
        let mut seen = vec![0u8; b.slate.len()];
        for code in &b.seen {
            let kind = FeedbackKind::ALL
                .get((code % 8) as usize)
                .ok_or_else(|| invalid("bad feedback kind in checkpoint"))?;
            let slot =
                seen.get_mut((code / 8) as usize).ok_or_else(|| invalid("bad slate index in checkpoint"))?;
            *slot |= crate::core::buffer::kind_bit(*kind);
        }
        let depth = match b.last_feedback_position {
            0 => 0,
            p => b.slate.iter().position(|s| s.position == p).map_or(0, |i| i as u32 + 1),
        };
        let parts = RestoredParts {
            time_ms: b.event_time_ms,
            variant: snapshot::variant_from_pb(b.variant.as_ref())?,
            segment: &b.segment,
            items: b.slate.iter().map(|s| s.item_id.as_str()).collect(),
            positions: b.slate.iter().map(|s| s.position).collect(),
            propensities: b.slate.iter().map(|s| s.propensity as f32).collect(),
            seen,
            total_reward_micros: b.total_reward_micros,
            opted_out: b.opted_out,
            depth,
            features: b.features.iter().map(|f| (f.name.clone(), f.value)).collect(),
        };
        join.buffer.remove(key);
        let (entry, heap) = restore_entry(&mut join, model, key, parts)?;
        let released = wm.is_some_and(|w| r.retained_until(&entry) < w);
        join.buffer.insert(&r, entry, heap);
        if released {
            // Inserted only to release its names again.
            join.buffer.remove(key);
        }
    }
    // Format 2: segments in sequence order, decoded one at a time (a partition's segments can
    // hold millions of entries); the newest version of a key wins.
    let mut previous: Option<u32> = None;
    let mut found: Vec<u32> = Vec::with_capacity(segments.len());
    // Entries whose stored retention end differs from today's (parameters changed).
    let mut rewrite: rustc_hash::FxHashSet<Key> = rustc_hash::FxHashSet::default();
    for raw in segments {
        let seg = decode_segment(raw)?;
        let q = seg.sequence;
        if q >= cp.next_buffer_segment {
            return Err(invalid(format!("buffer segment {q} is newer than the checkpoint")));
        }
        if previous.is_some_and(|p| q <= p) {
            return Err(invalid(format!(
                "buffer segment {q} given after segment {previous:?}: not in sequence order"
            )));
        }
        previous = Some(q);
        found.push(q);
        let name = |i: u32| -> Result<&str, SnapshotError> {
            seg.names
                .get(i as usize)
                .map(String::as_str)
                .ok_or_else(|| invalid("buffer segment name out of range"))
        };
        let mut markers_until = None;
        for pair in seg.deleted.chunks(2) {
            let [hi, lo] = pair else { return Err(invalid("odd delete list in buffer segment")) };
            // A key not live here has only dead versions before this segment (they stay dead:
            // the watermark only grows), so its marker needs no keeping.
            if let Some(old) = join.buffer.remove(Key(*hi, *lo)) {
                markers_until = markers_until.max(Some(r.retained_until(&old)));
            }
        }
        join.buffer.segments.entry(q).or_default().markers_until = markers_until;
        join.buffer.segments.entry(q).or_default().written = seg.entries.len() as u32;
        for e in &seg.entries {
            let key = Key(e.key_high, e.key_low);
            // A newer version replaces the older one (which no longer holds it).
            join.buffer.remove(key);
            let Some(model) = model_index(name(e.model)?) else {
                to_delete.push((key, e.retained_until_ms));
                continue;
            };
            // A version is live only if the watermark has passed neither the retention end it
            // was written with nor the one today's parameters give it: retention lengthened
            // since does not bring back what was released, shortened since does not keep what
            // today's parameters release (the version is rewritten below when they differ).
            let seen = e.seen.iter().fold(0u8, |u, s| u | s);
            let until_now = r.until(e.event_time_ms, seen);
            if wm.is_some_and(|w| e.retained_until_ms < w || until_now < w) {
                continue;
            }
            let variant = match pb::VariantKind::try_from(e.variant_kind) {
                Ok(pb::VariantKind::Treatment) => Variant::Treatment,
                Ok(pb::VariantKind::Holdout) => Variant::Holdout,
                Ok(pb::VariantKind::Experiment) => Variant::Arm(name(e.arm)?.to_string()),
                _ => return Err(invalid("buffer entry of unknown variant")),
            };
            let positions = if e.positions.is_empty() {
                (0..e.items.len() as u32).map(|i| e.first_position.saturating_add(i)).collect()
            } else {
                e.positions.clone()
            };
            let mut features = Vec::with_capacity(e.features.len());
            for f in &e.features {
                features.push((name(f.name)?.to_string(), f.value));
            }
            let items = e.items.iter().map(|i| name(*i)).collect::<Result<Vec<_>, _>>()?;
            let parts = RestoredParts {
                time_ms: e.event_time_ms,
                variant,
                segment: name(e.segment)?,
                items,
                positions,
                propensities: e.propensities.clone(),
                seen: e.seen.to_vec(),
                total_reward_micros: e.total_reward_micros,
                opted_out: e.opted_out,
                depth: e.depth,
                features,
            };
            let (entry, heap) = restore_entry(&mut join, model, key, parts)?;
            join.buffer.insert(&r, entry, heap);
            join.buffer.restored_in(key, q);
            if until_now != e.retained_until_ms {
                rewrite.insert(key);
            } else {
                rewrite.remove(&key);
            }
        }
    }
    join.buffer.dirty.clear();
    for k in rewrite {
        if join.buffer.contains(k) {
            join.buffer.mark(k);
        }
    }
    // Legacy records are written again; entries of dropped models are deleted.
    let legacy: Vec<Key> = if legacy_impressions.is_empty() {
        Vec::new()
    } else {
        join.buffer.entries().filter(|e| e.changelog == UNSAVED).map(|e| e.key).collect()
    };
    for k in legacy {
        join.buffer.mark(k);
    }
    // One marker per key, with the latest retention end among its versions.
    to_delete.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    to_delete.dedup_by_key(|d| d.0);
    for (k, until) in to_delete {
        if !join.buffer.contains(k) && wm.is_none_or(|w| until >= w) {
            join.buffer.deleted.push((k, until));
        }
    }
    if cp.format_version >= 3 {
        check_complete(&cp, &found, held.len())?;
    }
    // Format 1 kept held feedback in the header: written out as records at the next save.
    let inline_held: Vec<u64> = cp.held.iter().map(|h| h.sequence).collect();
    for seq in &inline_held {
        changes.hold(*seq);
    }
    let mut held_all = std::mem::take(&mut cp.held);
    for raw in held {
        held_all.push(pb::HeldFeedback::decode(raw.as_slice()).map_err(decode_err)?);
    }
    // Held feedback is kept per impression in arrival (sequence) order.
    held_all.sort_by_key(|h| h.sequence);
    for h in held_all {
        let f = h.feedback.ok_or_else(|| invalid("held feedback without body"))?;
        let kind = FeedbackKind::ALL
            .into_iter()
            .find(|k| k.to_pb() as i32 == f.kind)
            .ok_or_else(|| invalid("held feedback of unknown kind"))?;
        let fb = Feedback {
            impression_id: f.impression_id,
            item_id: f.item_id,
            position: f.position,
            kind,
            value: f.value,
            time_ms: f.event_time_ms,
        };
        join.pending_order.insert((fb.time_ms, fb.impression_id.clone(), h.sequence));
        join.pending.entry(fb.impression_id.clone()).or_default().push((h.sequence, fb));
    }
    // Anything but an unchanged model means the stored records are out of date.
    changes.dirty = report.iter().any(|(_, c)| c.code() != "unchanged")
        || rewrite_models
        || !legacy_impressions.is_empty()
        || !inline_held.is_empty();
    join.changes = changes;
    state.join = join;
    // Caps lowered since the save apply at once.
    state.join.enforce_caps(spec);
    for c in cp.invalid_counts {
        let code = InvalidEvent::code_named(&c.name)
            .ok_or_else(|| invalid(format!("unknown invalid reason `{}`", c.name)))?;
        state.invalid.insert(code, c.value);
    }
    Ok((state, report))
}
