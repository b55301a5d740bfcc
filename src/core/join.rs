//! The attribution join: matches feedback to the impression it belongs to, by impression id,
//! within per-kind attribution windows in event time, and turns each match into model updates.
//!
//! Watermark: the newest event time seen on the partition minus `watermark_delay`. It drives
//! every expiry, so the outcome depends only on the order of records in the partition, never on
//! a clock. Outcomes (each counted in [`JoinCounters`]):
//!
//! | outcome | when | learned |
//! |---|---|---|
//! | attributed | impression buffered, feedback within its kind's window | yes |
//! | late | feedback after its window but while the impression is retained | if `learn_late` |
//! | duplicate impression | an impression id already buffered | no (first copy wins) |
//! | duplicate feedback | same (impression, item, kind) seen before | no |
//! | held | feedback before its impression: waits `grace` past its event time | later |
//! | orphaned | held feedback whose impression never came (or evicted at the cap) | no |
//! | opted out | impression flagged opted-out, and all its feedback | no |
//! | not in slate | the impression did not show that item at that position | no |
//!
//! Memory is bounded: at `max_impressions` the impression with the oldest event time (ties: the
//! smallest id) is evicted; at `max_pending_feedback` the oldest held feedback is orphaned. Both
//! are counted. The join never panics on input and never reads a clock.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap as HashMap;

use super::event::{Feedback, FeedbackKind, Impression, Variant};
use super::model::{ImpressionRef, ModelShard};
use super::params::{CoreSpec, PositionModel};

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
    pub fn rows(&self) -> [(&'static str, u64); 18] {
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

/// A buffered impression.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub time_ms: i64,
    pub model: usize,
    pub variant: Variant,
    pub segment: String,
    pub features: Vec<(String, f64)>,
    /// (item, position, propensity), sorted by position.
    pub slate: Vec<(String, u32, f64)>,
    pub opted_out: bool,
    pub total_reward_micros: i64,
    /// (slate index, kind) already seen, for de-duplication.
    pub seen: Vec<(u16, FeedbackKind)>,
    /// Largest position with feedback; 0 = none yet (cascade examination depth).
    pub last_feedback_position: u32,
}

/// What changed in the join since the changes were last taken: which buffered impressions and
/// held feedback must be written to (or deleted from) durable storage. Bookkeeping of the
/// persistence edge, not join state: it is excluded from equality, so a restored join equals
/// the one that was saved.
#[derive(Debug, Clone, Default)]
pub struct JoinChanges {
    pub impressions_written: rustc_hash::FxHashSet<String>,
    pub impressions_deleted: rustc_hash::FxHashSet<String>,
    pub held_written: rustc_hash::FxHashSet<u64>,
    pub held_deleted: rustc_hash::FxHashSet<u64>,
    /// Models no longer configured whose snapshot records must be deleted.
    pub models_retired: Vec<String>,
    /// Snapshot-topic keys to delete as they are (keys written by an older version).
    pub keys_deleted: Vec<String>,
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
    fn touch(&mut self, id: &str) {
        if self.untracked {
            return;
        }
        if !self.impressions_written.contains(id) {
            self.impressions_written.insert(id.to_string());
        }
        self.impressions_deleted.remove(id);
    }

    fn delete(&mut self, id: String) {
        if self.untracked {
            return;
        }
        self.impressions_written.remove(&id);
        self.impressions_deleted.insert(id);
    }

    fn hold(&mut self, seq: u64) {
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

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttributionJoin {
    pub impressions: HashMap<String, Entry>,
    /// (event time, id): eviction and expiry order.
    pub impression_order: BTreeSet<(i64, String)>,
    /// impression id → held feedback with its arrival sequence number.
    pub pending: HashMap<String, Vec<(u64, Feedback)>>,
    /// (event time, impression id, sequence): expiry order of held feedback.
    pub pending_order: BTreeSet<(i64, String, u64)>,
    pub next_seq: u64,
    pub max_event_time_ms: Option<i64>,
    pub counters: JoinCounters,
    pub changes: JoinChanges,
}

impl AttributionJoin {
    pub fn new() -> AttributionJoin {
        AttributionJoin::default()
    }

    pub fn watermark_ms(&self, spec: &CoreSpec) -> Option<i64> {
        self.max_event_time_ms.map(|t| t.saturating_sub(spec.join.watermark_delay_ms))
    }

    pub fn buffered_impressions(&self) -> usize {
        self.impressions.len()
    }

    pub fn pending_feedback(&self) -> usize {
        self.pending_order.len()
    }

    fn retention_ms(spec: &CoreSpec) -> i64 {
        spec.rewards.max_window_ms().saturating_add(spec.join.late_retention_ms)
    }

    /// Processes one valid event whose model index (for impressions) the caller resolved.
    pub fn process_impression(
        &mut self,
        spec: &CoreSpec,
        models: &mut [ModelShard],
        model: usize,
        imp: Impression,
    ) -> Outcome {
        self.advance(imp.time_ms);
        let outcome = self.insert_impression(spec, models, model, imp);
        self.expire(spec);
        outcome
    }

    pub fn process_feedback(&mut self, spec: &CoreSpec, models: &mut [ModelShard], fb: Feedback) -> Outcome {
        self.advance(fb.time_ms);
        let outcome = match self.impressions.get_mut(&fb.impression_id) {
            Some(entry) => {
                self.changes.touch(&fb.impression_id);
                apply_feedback(spec, models, entry, &fb, &mut self.counters)
            }
            None => {
                self.hold(spec, fb);
                Outcome::FeedbackHeld
            }
        };
        self.expire(spec);
        outcome
    }

    fn advance(&mut self, t: i64) {
        self.max_event_time_ms = Some(self.max_event_time_ms.map_or(t, |m| m.max(t)));
    }

    fn insert_impression(
        &mut self,
        spec: &CoreSpec,
        models: &mut [ModelShard],
        model: usize,
        imp: Impression,
    ) -> Outcome {
        if self.impressions.contains_key(&imp.impression_id) {
            self.counters.impressions_duplicate += 1;
            return Outcome::ImpressionDuplicate;
        }
        if self.impressions.len() >= spec.join.max_impressions {
            if let Some(oldest) = self.impression_order.pop_first() {
                self.impressions.remove(&oldest.1);
                self.changes.delete(oldest.1);
                self.counters.impressions_evicted += 1;
            }
        }
        let Impression { impression_id, time_ms, variant, segment, features, slate, opted_out, .. } = imp;
        // Propensities divide inverse-propensity sums: raised to the floor (counted) here, for
        // impressions that are kept, so a rejected or duplicate record counts nothing.
        let floor = spec.limits.propensity_floor;
        let clipped = slate.iter().filter(|s| s.propensity < floor).count() as u64;
        self.counters.propensities_clipped += clipped;
        let entry = Entry {
            time_ms,
            model,
            variant,
            segment,
            features,
            slate: slate.into_iter().map(|s| (s.item_id, s.position, s.propensity.max(floor))).collect(),
            opted_out,
            total_reward_micros: 0,
            seen: Vec::new(),
            last_feedback_position: 0,
        };
        let outcome = if opted_out {
            self.counters.impressions_opted_out += 1;
            Outcome::ImpressionOptedOut
        } else {
            let (Some(shard), Some(mspec)) = (models.get_mut(model), spec.models.get(model)) else {
                // The caller resolved `model` against the same spec; unreachable by construction.
                return Outcome::ImpressionDuplicate;
            };
            let slate: Vec<(&str, u32, f64)> =
                entry.slate.iter().map(|(i, p, q)| (i.as_str(), *p, *q)).collect();
            self.counters.arms_rejected += shard.observe_impression(
                mspec,
                entry_ref(&entry),
                &entry.variant,
                &slate,
                spec.limits.max_arms_per_model,
            );
            self.counters.impressions_learned += 1;
            Outcome::ImpressionLearned
        };
        self.impression_order.insert((time_ms, impression_id.clone()));
        self.changes.touch(&impression_id);
        let entry = self.impressions.entry(impression_id.clone()).or_insert(entry);
        // Feedback that arrived first is applied now, in arrival order.
        if let Some(held) = self.pending.remove(&impression_id) {
            for (seq, fb) in held {
                self.pending_order.remove(&(fb.time_ms, impression_id.clone(), seq));
                self.changes.release(seq);
                apply_feedback(spec, models, entry, &fb, &mut self.counters);
            }
        }
        outcome
    }

    /// Evicts down to the caps (oldest first, counted), for a buffer restored under caps that
    /// were lowered since it was saved.
    pub fn enforce_caps(&mut self, spec: &CoreSpec) {
        while self.impressions.len() > spec.join.max_impressions {
            let Some((_, id)) = self.impression_order.pop_first() else { break };
            self.impressions.remove(&id);
            self.changes.delete(id);
            self.counters.impressions_evicted += 1;
        }
        while self.pending_order.len() > spec.join.max_pending_feedback {
            if !self.orphan_oldest(|c| c.feedback_evicted += 1) {
                break;
            }
        }
    }

    fn hold(&mut self, spec: &CoreSpec, fb: Feedback) {
        self.counters.feedback_held += 1;
        if self.pending_order.len() >= spec.join.max_pending_feedback {
            self.orphan_oldest(|c| c.feedback_evicted += 1);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending_order.insert((fb.time_ms, fb.impression_id.clone(), seq));
        self.changes.hold(seq);
        self.pending.entry(fb.impression_id.clone()).or_default().push((seq, fb));
    }

    fn orphan_oldest(&mut self, count: impl Fn(&mut JoinCounters)) -> bool {
        let Some((_, id, seq)) = self.pending_order.pop_first() else {
            return false;
        };
        if let Some(list) = self.pending.get_mut(&id) {
            list.retain(|(s, _)| *s != seq);
            if list.is_empty() {
                self.pending.remove(&id);
            }
        }
        self.changes.release(seq);
        count(&mut self.counters);
        true
    }

    /// Drops impressions past their retention and orphans held feedback past its grace period.
    fn expire(&mut self, spec: &CoreSpec) {
        let Some(wm) = self.watermark_ms(spec) else {
            return;
        };
        let retention = Self::retention_ms(spec);
        while let Some((t, _)) = self.impression_order.first() {
            if t.saturating_add(retention) >= wm {
                break;
            }
            if let Some((_, id)) = self.impression_order.pop_first() {
                self.impressions.remove(&id);
                self.changes.delete(id);
                self.counters.impressions_expired += 1;
            }
        }
        let grace = spec.join.grace_ms;
        while let Some((t, _, _)) = self.pending_order.first() {
            if t.saturating_add(grace) >= wm {
                break;
            }
            self.orphan_oldest(|c| c.feedback_orphaned += 1);
        }
    }
}

fn entry_ref(e: &Entry) -> ImpressionRef<'_> {
    ImpressionRef { time_ms: e.time_ms, segment: &e.segment, features: &e.features }
}

/// Attributes one feedback event to its buffered impression.
fn apply_feedback(
    spec: &CoreSpec,
    models: &mut [ModelShard],
    entry: &mut Entry,
    fb: &Feedback,
    counters: &mut JoinCounters,
) -> Outcome {
    if entry.opted_out {
        counters.feedback_opted_out += 1;
        return Outcome::FeedbackOptedOut;
    }
    let Some(idx) = entry.slate.iter().position(|(item, pos, _)| *item == fb.item_id && *pos == fb.position)
    else {
        counters.feedback_not_in_slate += 1;
        return Outcome::FeedbackNotInSlate;
    };
    let key = (idx as u16, fb.kind);
    if entry.seen.contains(&key) {
        counters.feedback_duplicate += 1;
        return Outcome::FeedbackDuplicate;
    }
    entry.seen.push(key);
    let late = fb.time_ms.saturating_sub(entry.time_ms) > spec.rewards.of(fb.kind).window_ms;
    if late && !spec.join.learn_late {
        counters.feedback_late_ignored += 1;
        return Outcome::FeedbackLateIgnored;
    }
    let (Some(shard), Some(mspec)) = (models.get_mut(entry.model), spec.models.get(entry.model)) else {
        counters.feedback_not_in_slate += 1;
        return Outcome::FeedbackNotInSlate;
    };
    let (reward, clamped) = spec.rewards.micros_clamped(fb.kind, fb.value);
    counters.rewards_clamped += u64::from(clamped);
    let (item, position, propensity) = &entry.slate[idx];
    let imp = ImpressionRef { time_ms: entry.time_ms, segment: &entry.segment, features: &entry.features };
    let saturated = shard.observe_feedback(
        mspec,
        imp,
        &entry.variant,
        item,
        *position,
        *propensity,
        fb.kind,
        reward,
        entry.total_reward_micros,
    );
    counters.sums_saturated += u64::from(saturated);
    if mspec.position == PositionModel::Cascade && fb.position > entry.last_feedback_position {
        // Examined set: every item up to the deepest feedback (all items while there is none).
        let before = entry.last_feedback_position;
        for (item, pos, _) in &entry.slate {
            let was = before == 0 || *pos <= before;
            let now = *pos <= fb.position;
            if was != now {
                shard.cascade_examination(mspec, imp, item, if now { 1.0 } else { -1.0 });
            }
        }
        entry.last_feedback_position = fb.position;
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
