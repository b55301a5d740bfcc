//! The attribution join: matches feedback to the impression it belongs to, by impression id,
//! within per-kind attribution windows in event time, and turns each match into model updates.
//!
//! Watermark: a clock of event time minus `watermark_delay`. With one input topic the clock is
//! the newest event time seen on the partition; with two, the oldest of the inputs' newest
//! times (`PartitionState` advances it per input, so feedback read ahead of its impressions
//! waits as held feedback instead of expiring them). It drives every expiry, so the outcome
//! depends only on the order of records in the partition and, with two inputs, on when the
//! edge declared an input idle (its wall-clock decision, passed in); the join reads no clock.
//! Outcomes (each counted in [`JoinCounters`]):
//!
//! | outcome | when | learned |
//! |---|---|---|
//! | attributed | impression buffered, feedback within its kind's window | yes |
//! | late | feedback after its window but while the impression is retained | if `learn_late` |
//! | duplicate impression | an impression id already buffered | no (first copy wins) |
//! | duplicate feedback | same (impression, item, kind) seen before | no |
//! | held | feedback before its impression: waits `grace` past its event time | later |
//! | orphaned | held feedback of a first funnel step (no required kind) whose impression never came | no |
//! | released | held feedback of a kind that needs an earlier step, whose impression is not retained | no |
//! | opted out | impression flagged opted-out, and all its feedback | no |
//! | not in slate | the impression did not show that item at that position | no |
//!
//! Retention follows the funnel (`JoinSpec::funnel`): an impression is kept while feedback can
//! still come for it given what it has received — the longest window among the kinds its items
//! have opened (a kind is open for an item when it needs no earlier kind, or the item received
//! one of the kinds it needs), plus `late_retention`. With the default funnel an unclicked
//! impression is kept for the click window, a clicked one for the cart and purchase windows, a
//! purchased one for the return window. Feedback for a released impression finds nothing:
//! after `grace` it is counted as `released` if its kind needs an earlier step (a purchase
//! without a retained click), as `orphaned` otherwise. Released and never-arrived impressions
//! cannot be told apart without remembering every released id for a month, the memory
//! retention exists to save.
//!
//! Memory is bounded: at `max_impressions` the impression retained for the shortest time (ties:
//! the smallest key) is evicted; at `max_pending_feedback` the oldest held feedback is orphaned.
//! Both are counted. The join never panics on input and never reads a clock.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap as HashMap;

use super::buffer::{kind_bit, Buffer, Entry, Key, Retention, Slate, UNSAVED};
use super::event::{Feedback, FeedbackKind, FeedbackView, ImpressionView};
use super::model::{ImpressionRef, ModelShard};
use super::params::{Algorithm, CoreSpec, PositionModel};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinCounters {
    pub impressions_learned: u64,
    pub impressions_duplicate: u64,
    pub impressions_opted_out: u64,
    pub impressions_evicted: u64,
    pub impressions_expired: u64,
    pub feedback_attributed: u64,
    pub feedback_late_learned: u64,
    pub feedback_late_ignored: u64,
    pub feedback_duplicate: u64,
    pub feedback_held: u64,
    pub feedback_orphaned: u64,
    /// Held feedback of a kind that needs an earlier funnel step, whose impression was not
    /// retained (released by the funnel, or never arrived).
    pub feedback_released: u64,
    pub feedback_evicted: u64,
    pub feedback_opted_out: u64,
    pub feedback_not_in_slate: u64,
    /// Slate propensities raised to `limits.propensity_floor`.
    pub propensities_clipped: u64,
    /// Feedback rewards bounded to ±`MAX_REWARD_MICROS`.
    pub rewards_clamped: u64,
    /// Placements not learned because their model's arm cap was reached.
    pub arms_rejected: u64,
    /// Integer reward sums that hit their bound and saturated.
    pub sums_saturated: u64,
}

impl JoinCounters {
    /// (name, value) pairs in a fixed order, for reports and metrics.
    pub fn rows(&self) -> [(&'static str, u64); 19] {
        [
            ("impressions_learned", self.impressions_learned),
            ("impressions_duplicate", self.impressions_duplicate),
            ("impressions_opted_out", self.impressions_opted_out),
            ("impressions_evicted", self.impressions_evicted),
            ("impressions_expired", self.impressions_expired),
            ("feedback_attributed", self.feedback_attributed),
            ("feedback_late_learned", self.feedback_late_learned),
            ("feedback_late_ignored", self.feedback_late_ignored),
            ("feedback_duplicate", self.feedback_duplicate),
            ("feedback_held", self.feedback_held),
            ("feedback_orphaned", self.feedback_orphaned),
            ("feedback_released", self.feedback_released),
            ("feedback_evicted", self.feedback_evicted),
            ("feedback_opted_out", self.feedback_opted_out),
            ("feedback_not_in_slate", self.feedback_not_in_slate),
            ("propensities_clipped", self.propensities_clipped),
            ("rewards_clamped", self.rewards_clamped),
            ("arms_rejected", self.arms_rejected),
            ("sums_saturated", self.sums_saturated),
        ]
    }

    pub fn add(&mut self, o: &JoinCounters) {
        let JoinCounters {
            impressions_learned,
            impressions_duplicate,
            impressions_opted_out,
            impressions_evicted,
            impressions_expired,
            feedback_attributed,
            feedback_late_learned,
            feedback_late_ignored,
            feedback_duplicate,
            feedback_held,
            feedback_orphaned,
            feedback_released,
            feedback_evicted,
            feedback_opted_out,
            feedback_not_in_slate,
            propensities_clipped,
            rewards_clamped,
            arms_rejected,
            sums_saturated,
        } = o;
        self.impressions_learned += impressions_learned;
        self.impressions_duplicate += impressions_duplicate;
        self.impressions_opted_out += impressions_opted_out;
        self.impressions_evicted += impressions_evicted;
        self.impressions_expired += impressions_expired;
        self.feedback_attributed += feedback_attributed;
        self.feedback_late_learned += feedback_late_learned;
        self.feedback_late_ignored += feedback_late_ignored;
        self.feedback_duplicate += feedback_duplicate;
        self.feedback_held += feedback_held;
        self.feedback_orphaned += feedback_orphaned;
        self.feedback_released += feedback_released;
        self.feedback_evicted += feedback_evicted;
        self.feedback_opted_out += feedback_opted_out;
        self.feedback_not_in_slate += feedback_not_in_slate;
        self.propensities_clipped += propensities_clipped;
        self.rewards_clamped += rewards_clamped;
        self.arms_rejected += arms_rejected;
        self.sums_saturated += sums_saturated;
    }

    /// Feedback events that reached a final outcome (held feedback is not final yet).
    pub fn feedback_final(&self) -> u64 {
        self.feedback_attributed
            + self.feedback_late_learned
            + self.feedback_late_ignored
            + self.feedback_duplicate
            + self.feedback_orphaned
            + self.feedback_released
            + self.feedback_evicted
            + self.feedback_opted_out
            + self.feedback_not_in_slate
    }
}

/// What happened to one event right away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    ImpressionLearned,
    ImpressionDuplicate,
    ImpressionOptedOut,
    FeedbackAttributed,
    FeedbackLateLearned,
    FeedbackLateIgnored,
    FeedbackDuplicate,
    FeedbackHeld,
    FeedbackOptedOut,
    FeedbackNotInSlate,
}

/// What changed in the join since the changes were last taken, besides the buffer's own
/// changelog (`Buffer::dirty`, `Buffer::deleted`): held feedback to write or delete, and what a
/// restore decided. Bookkeeping of the persistence edge, not join state: it is excluded from
/// equality, so a restored join equals the one that was saved.
#[derive(Debug, Clone, Default)]
pub struct JoinChanges {
    pub held_written: rustc_hash::FxHashSet<u64>,
    pub held_deleted: rustc_hash::FxHashSet<u64>,
    /// Models no longer configured whose snapshot records must be deleted.
    pub models_retired: Vec<String>,
    /// Snapshot-topic keys to delete as they are (keys written by an older version).
    pub keys_deleted: Vec<String>,
    /// Changelog values (key, stored value) an older build kept on the snapshot topic, in key
    /// order: the next saves write them to the changelog topic and delete them from the
    /// snapshot topic, each in one transaction (`checkpoint::MOVE_BYTES_PER_SAVE` per save).
    pub moved: Vec<(String, Vec<u8>)>,
    /// The stored state is out of date even without new records (a configuration change was
    /// applied at restore): the next save must write it.
    pub dirty: bool,
    /// No durable copy to keep up to date (the offline replay): nothing is recorded, so the
    /// sets cannot grow with every impression ever seen.
    pub untracked: bool,
}

impl PartialEq for JoinChanges {
    fn eq(&self, _: &JoinChanges) -> bool {
        true
    }
}

impl JoinChanges {
    pub(crate) fn hold(&mut self, seq: u64) {
        if self.untracked {
            return;
        }
        self.held_written.insert(seq);
    }

    fn release(&mut self, seq: u64) {
        if self.untracked {
            return;
        }
        // Never written: nothing to delete.
        if !self.held_written.remove(&seq) {
            self.held_deleted.insert(seq);
        }
    }
}

/// A retained impression with its names resolved: what equality and tests compare.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryView {
    pub key: Key,
    pub time_ms: i64,
    pub model: usize,
    pub variant: super::event::Variant,
    pub segment: String,
    pub features: Vec<(String, f64)>,
    /// (item, position, propensity, seen kinds).
    pub slate: Vec<(String, u32, f32, u8)>,
    pub opted_out: bool,
    pub total_reward_micros: i64,
}

#[derive(Debug, Clone, Default)]
pub struct AttributionJoin {
    pub buffer: Buffer,
    /// impression id → held feedback with its arrival sequence number.
    pub pending: HashMap<String, Vec<(u64, Feedback)>>,
    /// (event time, impression id, sequence): expiry order of held feedback.
    pub pending_order: BTreeSet<(i64, String, u64)>,
    pub next_seq: u64,
    pub max_event_time_ms: Option<i64>,
    pub counters: JoinCounters,
    pub changes: JoinChanges,
    /// Retention derived from the parameters it was computed for.
    retention_cache: Option<(RetentionInputs, Retention)>,
}

type RetentionInputs = ([u8; 4], [i64; 4], i64);

impl PartialEq for AttributionJoin {
    /// The join as a function of its records: retained impressions (names resolved, storage
    /// layout and changelog bookkeeping aside), held feedback, watermark input and counters.
    fn eq(&self, o: &AttributionJoin) -> bool {
        self.pending == o.pending
            && self.pending_order == o.pending_order
            && self.next_seq == o.next_seq
            && self.max_event_time_ms == o.max_event_time_ms
            && self.counters == o.counters
            && self.buffer.len() == o.buffer.len()
            && self.views() == o.views()
    }
}

impl AttributionJoin {
    pub fn new() -> AttributionJoin {
        AttributionJoin::default()
    }

    /// A join whose changes are not recorded (the offline replay).
    pub fn untracked() -> AttributionJoin {
        let mut j = AttributionJoin::default();
        j.changes.untracked = true;
        j.buffer.untracked = true;
        j
    }

    pub fn watermark_ms(&self, spec: &CoreSpec) -> Option<i64> {
        self.max_event_time_ms.map(|t| t.saturating_sub(spec.join.watermark_delay_ms))
    }

    pub fn buffered_impressions(&self) -> usize {
        self.buffer.len()
    }

    pub fn pending_feedback(&self) -> usize {
        self.pending_order.len()
    }

    pub fn retention(spec: &CoreSpec) -> Retention {
        let windows = [0, 1, 2, 3].map(|k| spec.rewards.kinds[k].window_ms);
        Retention::new(spec.join.funnel, windows, spec.join.late_retention_ms)
    }

    /// [`AttributionJoin::retention`], computed once per set of parameters (it was ~2 % of
    /// the pipeline's CPU when computed per record).
    fn cached_retention(&mut self, spec: &CoreSpec) -> Retention {
        let inputs = (
            spec.join.funnel,
            [0, 1, 2, 3].map(|k| spec.rewards.kinds[k].window_ms),
            spec.join.late_retention_ms,
        );
        match &self.retention_cache {
            Some((i, r)) if *i == inputs => *r,
            _ => {
                let r = Retention::new(inputs.0, inputs.1, inputs.2);
                self.retention_cache = Some((inputs, r));
                r
            }
        }
    }

    /// A retained impression with its names resolved.
    pub fn view(&self, e: &Entry) -> EntryView {
        let names = &self.buffer.names;
        EntryView {
            key: e.key,
            time_ms: e.time_ms,
            model: usize::from(e.model),
            variant: self.buffer.variant(e),
            segment: names.name(e.segment).to_string(),
            features: self.buffer.features.get(&e.key).cloned().unwrap_or_default(),
            slate: self.buffer.slate(e).map(|(i, p, q, s)| (names.name(i).to_string(), p, q, s)).collect(),
            opted_out: e.opted_out,
            total_reward_micros: e.total_reward_micros,
        }
    }

    /// Every retained impression, sorted by key.
    pub fn views(&self) -> Vec<EntryView> {
        let mut v: Vec<EntryView> = self.buffer.entries().map(|e| self.view(e)).collect();
        v.sort_by_key(|e| e.key);
        v
    }

    /// Processes one valid event whose model index (for impressions) the caller resolved, on
    /// a partition with one input: the watermark follows the event's time.
    pub fn process_impression(
        &mut self,
        spec: &CoreSpec,
        models: &mut [ModelShard],
        model: usize,
        imp: &ImpressionView<'_>,
    ) -> Outcome {
        self.advance(imp.time_ms);
        self.impression(spec, models, model, imp)
    }

    /// [`AttributionJoin::process_impression`]'s counterpart for feedback.
    pub fn process_feedback(
        &mut self,
        spec: &CoreSpec,
        models: &mut [ModelShard],
        fb: &FeedbackView<'_>,
    ) -> Outcome {
        self.advance(fb.time_ms);
        self.feedback(spec, models, fb)
    }

    /// Processes an impression without moving the watermark's clock (the caller advanced it:
    /// `PartitionState` does so per input).
    pub fn impression(
        &mut self,
        spec: &CoreSpec,
        models: &mut [ModelShard],
        model: usize,
        imp: &ImpressionView<'_>,
    ) -> Outcome {
        let r = self.cached_retention(spec);
        let outcome = self.insert_impression(spec, &r, models, model, imp);
        self.expire(spec, &r);
        outcome
    }

    /// Processes feedback without moving the watermark's clock (see [`AttributionJoin::impression`]).
    pub fn feedback(&mut self, spec: &CoreSpec, models: &mut [ModelShard], fb: &FeedbackView<'_>) -> Outcome {
        let r = self.cached_retention(spec);
        let key = Key::of(fb.impression_id);
        let features = self.buffer_features(key);
        let outcome = match self.buffer.get_mut(key) {
            Some((entry, names, heap)) => {
                let before = r.retained_until(entry);
                let outcome =
                    apply_feedback(spec, models, entry, names, heap, &features, fb, &mut self.counters);
                // Only outcomes that changed the entry (seen kinds, reward, depth) need a write.
                if changes_entry(outcome) {
                    self.buffer.mark(key);
                    self.buffer.reschedule(&r, key, before);
                }
                outcome
            }
            None => {
                self.hold(spec, fb.to_feedback());
                Outcome::FeedbackHeld
            }
        };
        self.expire(spec, &r);
        outcome
    }

    fn buffer_features(&self, key: Key) -> Vec<(String, f64)> {
        self.buffer.features.get(&key).cloned().unwrap_or_default()
    }

    /// Moves the watermark's clock forward to `t` (never back).
    pub fn advance(&mut self, t: i64) {
        self.max_event_time_ms = Some(self.max_event_time_ms.map_or(t, |m| m.max(t)));
    }

    fn evict_one(&mut self, r: &Retention) {
        if let Some(e) = self.buffer.pop_first(r, None) {
            if !self.buffer.untracked && e.changelog != UNSAVED {
                self.buffer.deleted.push((e.key, r.retained_until(&e)));
            }
            self.counters.impressions_evicted += 1;
        }
    }

    fn insert_impression(
        &mut self,
        spec: &CoreSpec,
        r: &Retention,
        models: &mut [ModelShard],
        model: usize,
        imp: &ImpressionView<'_>,
    ) -> Outcome {
        let key = Key::of(imp.impression_id);
        if self.buffer.contains(key) {
            self.counters.impressions_duplicate += 1;
            return Outcome::ImpressionDuplicate;
        }
        if models.get(model).is_none() || spec.models.get(model).is_none() {
            // The caller resolved `model` against the same spec; unreachable by construction.
            return Outcome::ImpressionDuplicate;
        }
        if self.buffer.len() >= spec.join.max_impressions {
            self.evict_one(r);
        }
        let ImpressionView { impression_id, time_ms, ref variant, segment, ref slate, opted_out, .. } = *imp;
        let linear = spec.models.get(model).is_some_and(|m| matches!(m.algorithm, Algorithm::Linear { .. }));
        // Only a linear model learns (and keeps) the context's features.
        let features: Vec<(String, f64)> = if linear {
            imp.features.iter().map(|(name, value)| (name.to_string(), *value)).collect()
        } else {
            Vec::new()
        };
        // Propensities divide inverse-propensity sums: raised to the floor (counted) here, for
        // impressions that are kept, so a rejected or duplicate record counts nothing. They are
        // stored (and learned) as f32: 7 significant digits, far finer than any estimate.
        let floor = spec.limits.propensity_floor;
        let clipped = slate.iter().filter(|s| s.propensity < floor).count() as u64;
        self.counters.propensities_clipped += clipped;
        let slots: Vec<(u32, u32, f32)> = slate
            .iter()
            .map(|s| (self.buffer.names.intern(s.item_id), s.position, s.propensity.max(floor) as f32))
            .collect();
        let (stored, heap) = Slate::new(&slots);
        let entry = Entry {
            key,
            time_ms,
            total_reward_micros: 0,
            segment: self.buffer.names.intern(segment),
            variant: self.buffer.intern_variant(variant),
            changelog: UNSAVED,
            depth: 0,
            model: model as u8,
            opted_out,
            slate: stored,
        };
        let outcome = if opted_out {
            self.counters.impressions_opted_out += 1;
            Outcome::ImpressionOptedOut
        } else {
            let (Some(shard), Some(mspec)) = (models.get_mut(model), spec.models.get(model)) else {
                // The caller resolved `model` against the same spec; unreachable by construction.
                return Outcome::ImpressionDuplicate;
            };
            let learned: Vec<(&str, u32, f64)> =
                slate.iter().zip(&slots).map(|(s, (_, p, q))| (s.item_id, *p, f64::from(*q))).collect();
            let imp = ImpressionRef { time_ms, segment, features: &features };
            self.counters.arms_rejected +=
                shard.observe_impression(mspec, imp, variant, &learned, spec.limits.max_arms_per_model);
            self.counters.impressions_learned += 1;
            Outcome::ImpressionLearned
        };
        if linear && !features.is_empty() {
            self.buffer.features.insert(key, features);
        }
        self.buffer.insert(r, entry, heap);
        // Feedback that arrived first is applied now, in arrival order.
        if let Some((impression_id, held)) = self.pending.remove_entry(impression_id) {
            let feats = self.buffer_features(key);
            for (seq, fb) in held {
                self.pending_order.remove(&(fb.time_ms, impression_id.clone(), seq));
                self.changes.release(seq);
                if let Some((entry, names, heap)) = self.buffer.get_mut(key) {
                    let before = r.retained_until(entry);
                    apply_feedback(spec, models, entry, names, heap, &feats, &fb.view(), &mut self.counters);
                    self.buffer.reschedule(r, key, before);
                }
            }
        }
        outcome
    }

    /// Evicts down to the caps (first to expire first, counted), for a buffer restored under
    /// caps that were lowered since it was saved.
    pub fn enforce_caps(&mut self, spec: &CoreSpec) {
        let r = Self::retention(spec);
        while self.buffer.len() > spec.join.max_impressions {
            let before = self.buffer.len();
            self.evict_one(&r);
            if self.buffer.len() == before {
                break;
            }
        }
        while self.pending_order.len() > spec.join.max_pending_feedback {
            if !self.orphan_oldest(|c, _| c.feedback_evicted += 1) {
                break;
            }
        }
    }

    fn hold(&mut self, spec: &CoreSpec, fb: Feedback) {
        self.counters.feedback_held += 1;
        if self.pending_order.len() >= spec.join.max_pending_feedback {
            self.orphan_oldest(|c, _| c.feedback_evicted += 1);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending_order.insert((fb.time_ms, fb.impression_id.clone(), seq));
        self.changes.hold(seq);
        self.pending.entry(fb.impression_id.clone()).or_default().push((seq, fb));
    }

    fn orphan_oldest(&mut self, count: impl Fn(&mut JoinCounters, FeedbackKind)) -> bool {
        let Some((_, id, seq)) = self.pending_order.pop_first() else {
            return false;
        };
        let mut kind = FeedbackKind::Click;
        if let Some(list) = self.pending.get_mut(&id) {
            if let Some(at) = list.iter().position(|(s, _)| *s == seq) {
                kind = list.remove(at).1.kind;
            }
            if list.is_empty() {
                self.pending.remove(&id);
            }
        }
        self.changes.release(seq);
        count(&mut self.counters, kind);
        true
    }

    /// Releases impressions past their retention and gives up on held feedback past its grace.
    fn expire(&mut self, spec: &CoreSpec, r: &Retention) {
        let Some(wm) = self.watermark_ms(spec) else {
            return;
        };
        while self.buffer.pop_first(r, Some(wm)).is_some() {
            self.counters.impressions_expired += 1;
        }
        let grace = spec.join.grace_ms;
        let funnel = spec.join.funnel;
        while let Some((t, _, _)) = self.pending_order.first() {
            if t.saturating_add(grace) >= wm {
                break;
            }
            self.orphan_oldest(|c, kind| {
                if funnel[kind.index()] != 0 {
                    c.feedback_released += 1;
                } else {
                    c.feedback_orphaned += 1;
                }
            });
        }
    }
}

fn changes_entry(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::FeedbackAttributed | Outcome::FeedbackLateLearned | Outcome::FeedbackLateIgnored
    )
}

/// Attributes one feedback event to its retained impression.
#[allow(clippy::too_many_arguments)]
fn apply_feedback(
    spec: &CoreSpec,
    models: &mut [ModelShard],
    entry: &mut Entry,
    names: &super::buffer::Interner,
    mut heap: Option<&mut super::buffer::HeapSlate>,
    features: &[(String, f64)],
    fb: &FeedbackView<'_>,
    counters: &mut JoinCounters,
) -> Outcome {
    if entry.opted_out {
        counters.feedback_opted_out += 1;
        return Outcome::FeedbackOptedOut;
    }
    let item = names.find(fb.item_id);
    let len = entry.slate.len(heap.as_deref());
    let Some(idx) = (0..len).find(|&i| {
        let s = entry.slate.get(i, heap.as_deref());
        Some(s.0) == item && s.1 == fb.position
    }) else {
        counters.feedback_not_in_slate += 1;
        return Outcome::FeedbackNotInSlate;
    };
    let (_, position, propensity, seen) = entry.slate.get(idx, heap.as_deref());
    let bit = kind_bit(fb.kind);
    if seen & bit != 0 {
        counters.feedback_duplicate += 1;
        return Outcome::FeedbackDuplicate;
    }
    let model = usize::from(entry.model);
    if models.get(model).is_none() || spec.models.get(model).is_none() {
        counters.feedback_not_in_slate += 1;
        return Outcome::FeedbackNotInSlate;
    }
    let last_feedback_position = match entry.depth {
        0 => 0,
        d => entry.slate.get(usize::from(d) - 1, heap.as_deref()).1,
    };
    entry.slate.set_seen(idx, seen | bit, heap.as_deref_mut());
    let late = fb.time_ms.saturating_sub(entry.time_ms) > spec.rewards.of(fb.kind).window_ms;
    if late && !spec.join.learn_late {
        counters.feedback_late_ignored += 1;
        return Outcome::FeedbackLateIgnored;
    }
    let (Some(shard), Some(mspec)) = (models.get_mut(model), spec.models.get(model)) else {
        counters.feedback_not_in_slate += 1;
        return Outcome::FeedbackNotInSlate;
    };
    let (reward, clamped) = spec.rewards.micros_clamped(fb.kind, fb.value);
    counters.rewards_clamped += u64::from(clamped);
    let variant = names.variant(entry.variant);
    let imp = ImpressionRef { time_ms: entry.time_ms, segment: names.name(entry.segment), features };
    let saturated = shard.observe_feedback(
        mspec,
        imp,
        &variant,
        fb.item_id,
        position,
        f64::from(propensity),
        fb.kind,
        reward,
        entry.total_reward_micros,
    );
    counters.sums_saturated += u64::from(saturated);
    if mspec.position == PositionModel::Cascade && fb.position > last_feedback_position {
        // Examined set: every item up to the deepest feedback (all items while there is none).
        let before = last_feedback_position;
        for (item, pos, _, _) in entry.slate.iter(heap.as_deref()) {
            let was = before == 0 || pos <= before;
            let now = pos <= fb.position;
            if was != now {
                shard.cascade_examination(mspec, imp, names.name(item), if now { 1.0 } else { -1.0 });
            }
        }
        entry.depth = idx as u16 + 1;
    }
    // At most 4 kinds × 256 slots × MAX_REWARD_MICROS per impression: cannot overflow.
    entry.total_reward_micros = entry.total_reward_micros.saturating_add(reward);
    if late {
        counters.feedback_late_learned += 1;
        Outcome::FeedbackLateLearned
    } else {
        counters.feedback_attributed += 1;
        Outcome::FeedbackAttributed
    }
}
