//! Per input topic-partition: where it starts and ends (its backlog), the timestamp merge of
//! two input topics inside a partition task ([`Aligner`]), and the pause/resume requests a
//! task makes when it holds too much of one topic while waiting for the other.
//!
//! Two input topics are aligned per partition task: records are applied in timestamp order
//! across both, and a topic whose partition still has records on the broker is never
//! overtaken. The consumer thread tells each task which of its inputs are behind (the
//! consumer's position below the end offset last reported by the broker). Positions move only
//! as a task takes records from its queues, so the task has read every record such news
//! covers. A task that holds too many records of one topic while it waits for another stops
//! reading that topic's queue and asks the consumer thread to pause the topic-partition, and
//! to resume it once the other caught up.
//! The consumer-facing half (`impl Session` below) reads positions and applies pauses on the
//! consumer the driver owns; the decisions are the pure [`Aligner`]'s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use crate::telemetry::processor::{InputPaused, InputsAligned};

use super::driver::Ctx;
use super::session::Session;
use super::task::{Cmd, OwnedRecord};

/// What an input topic of a partition task has left on the broker, as far as the consumer
/// knows. Decides whether the task may skip the topic when it has no records of it queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backlog {
    /// Not known yet (end offsets unreadable, or where the consumer starts is not known): the
    /// topic is waited for up to [`FIRST_RECORD_WAIT`] for its first record, then `max_idle`.
    Unknown,
    /// Records are known to exist on the broker past the ones delivered: never skipped.
    Behind,
    /// Delivered up to the end offset last reported: may be skipped after `max_idle`.
    CaughtUp,
}

/// The consumer thread's view of one (input topic, partition): how far it has delivered
/// records and where the partition ends.
#[derive(Clone, Copy, Debug)]
pub(super) struct InputLag {
    /// The consumer's position: librdkafka's position (past the last record a task took from its queue),
    /// which also moves past transaction markers (control records). -1: not known.
    pub(super) next: i64,
    /// The end offset last known (read_committed: the last stable offset, from the watermarks
    /// read at assignment and the fetch responses reported in the statistics). -1: not known.
    pub(super) end: i64,
    /// What the task was last told.
    pub(super) told: Backlog,
    /// Paused on the consumer at the task's request.
    pub(super) paused: bool,
}

impl InputLag {
    /// The consumer delivered up to `next` (a record, or its position).
    pub(super) fn delivered(&mut self, next: i64) -> bool {
        let moved = next > self.next;
        self.next = self.next.max(next);
        moved
    }

    pub(super) fn backlog(&self) -> Backlog {
        if self.next < 0 || self.end < 0 {
            Backlog::Unknown
        } else if self.next < self.end {
            Backlog::Behind
        } else {
            Backlog::CaughtUp
        }
    }
}

/// A partition task's pause requests to the consumer thread, which alone may call
/// `pause`/`resume` on the consumer it owns. A fresh one per task, so a request of a task that
/// has already been revoked never reaches the partition's next task.
pub(super) struct Flow {
    /// Per input topic: whether the task wants it paused.
    pub(super) want: Vec<AtomicBool>,
    /// Set after `want` changed; one flag per session, checked after every poll.
    pub(super) changed: Arc<AtomicBool>,
}

impl Flow {
    pub(super) fn request(&self, paused: &[bool]) {
        for (w, p) in self.want.iter().zip(paused) {
            w.store(*p, Ordering::SeqCst);
        }
        self.changed.store(true, Ordering::SeqCst);
    }
}

/// How often, while an input is not known to be caught up, the consumer's positions are read
/// (a local call): they move past transaction markers, which no record reports.
pub(super) const POSITION_CHECK: Duration = Duration::from_millis(50);

/// An aligned input at assignment: where the consumer starts (`restored`, the state's next
/// offset; without one the assignment names the log start, or the end with `latest`) against
/// the partition's (low, high) watermarks read just before (read_committed, so `high` is the
/// last stable offset), when they could be read. An input whose end lies past where the
/// consumer starts is behind until its records are delivered, however slow the fetch.
pub(super) fn input_lag(restored: Option<i64>, watermarks: Option<(i64, i64)>, latest: bool) -> InputLag {
    let (next, end) = match (restored, watermarks) {
        // Below the log start the consumer is reset: to the start, or with `latest` to the end.
        (Some(o), Some((low, high))) => (if o < low && latest { high } else { o.max(low) }, high),
        (None, Some((_, high))) if latest => (high, high),
        (None, Some((low, high))) => (low, high),
        (restored, None) => (restored.unwrap_or(-1), -1),
    };
    let mut lag = InputLag { next, end, told: Backlog::Unknown, paused: false };
    lag.told = lag.backlog();
    lag
}

/// Records waiting in a partition task, one queue per input topic, released in timestamp order
/// so that impressions and feedback read from two topics meet in event order even when the
/// consumer reads one topic far ahead of the other (catching up on lag, unequal fetch sizes,
/// a loaded broker).
///
/// The oldest head is released unless another topic has no records queued and
///
/// - is [`Backlog::Behind`]: its partition still has records on the broker. It is waited for
///   however long that takes (as Kafka Streams' task idling and Flink's per-input watermarks
///   do): applying the other topic meanwhile would move the event-time watermark past records
///   not read yet, and orphan feedback that is merely early. Only a record or news of its
///   backlog can end the wait, so no timer runs for it;
/// - is [`Backlog::CaughtUp`] and has been so, and empty, for less than `max_idle` (a quiet
///   topic is skipped after that);
/// - is [`Backlog::Unknown`] and has been empty for less than `max_idle`, or, before its first
///   record, [`FIRST_RECORD_WAIT`].
///
/// Waiting for a topic that is caught up or unknown ends early once more than `cap` records
/// are queued. Waiting for a topic that is behind does not: instead, a topic whose queue
/// reaches `pause_at` is marked to be paused on the consumer, and resumed once its queue is
/// down to `resume_at` or no other topic is behind. A topic with an empty queue is never left
/// paused, so the topic waited for always keeps being fetched.
pub(super) struct Aligner {
    pub(super) queues: Vec<std::collections::VecDeque<OwnedRecord>>,
    pub(super) empty_since: Vec<Instant>,
    /// Whether the topic has delivered a record (or was known caught up).
    pub(super) heard: Vec<bool>,
    pub(super) backlog: Vec<Backlog>,
    /// Which topics the task wants paused.
    pub(super) paused: Vec<bool>,
    pub(super) queued: usize,
    /// Per topic: skipped as idle by the last release (empty, not behind, waited for its idle
    /// limit). The task tells the partition state, whose join watermark then stops waiting
    /// for it ([`crate::core::partition::InputClock::idle`]).
    pub(super) idle: Vec<bool>,
    /// `idle` changed since the task last read it.
    pub(super) idle_changed: bool,
    pub(super) max_idle: Duration,
    pub(super) cap: usize,
    pub(super) pause_at: usize,
    pub(super) resume_at: usize,
}

/// The longest wait for the first record of a topic whose backlog is unknown (the watermarks
/// could not be read at assignment, or where the consumer starts is not known).
pub(super) const FIRST_RECORD_WAIT: Duration = Duration::from_secs(5);

impl Aligner {
    pub(super) fn new(backlog: Vec<Backlog>, max_idle: Duration, cap: usize) -> Aligner {
        let n = backlog.len();
        let pause_at = (cap / 2).max(1);
        Aligner {
            queues: (0..n).map(|_| std::collections::VecDeque::new()).collect(),
            empty_since: vec![Instant::now(); n],
            heard: backlog.iter().map(|b| *b == Backlog::CaughtUp).collect(),
            backlog,
            paused: vec![false; n],
            queued: 0,
            idle: vec![false; n],
            idle_changed: false,
            max_idle,
            cap,
            pause_at,
            resume_at: pause_at / 2,
        }
    }

    pub(super) fn push(&mut self, r: OwnedRecord) {
        let t = r.topic;
        self.heard[t] = true;
        self.queues[t].push_back(r);
        self.queued += 1;
    }

    /// What the consumer now knows of topic `t`'s records on the broker.
    pub(super) fn set_backlog(&mut self, t: usize, backlog: Backlog, now: Instant) {
        if self.backlog[t] == backlog {
            return;
        }
        if backlog == Backlog::CaughtUp {
            self.heard[t] = true;
            // Idle counts from when the topic is known to have nothing more.
            if self.queues[t].is_empty() {
                self.empty_since[t] = now;
            }
        }
        self.backlog[t] = backlog;
    }

    /// Whether some topic is behind with nothing queued: then nothing may be released.
    fn blocked(&self) -> bool {
        self.queues.iter().zip(&self.backlog).any(|(q, b)| q.is_empty() && *b == Backlog::Behind)
    }

    /// How long an empty topic that is not behind is waited for before others may run ahead.
    fn idle_limit(&self, u: usize) -> Duration {
        if self.heard[u] || self.backlog[u] == Backlog::CaughtUp {
            self.max_idle
        } else {
            FIRST_RECORD_WAIT.max(self.max_idle)
        }
    }

    /// The next record to apply: the oldest head, if no topic is waited for (see the type).
    pub(super) fn pop(&mut self, now: Instant) -> Option<OwnedRecord> {
        let (t, _) = self
            .queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|r| (i, (r.timestamp_ms.unwrap_or(i64::MIN), i))))
            .min_by_key(|(_, key)| *key)?;
        if self.blocked() {
            return None;
        }
        let waiting = self.queues.iter().enumerate().any(|(u, q)| {
            u != t && q.is_empty() && now.duration_since(self.empty_since[u]) < self.idle_limit(u)
        });
        if waiting && self.queued <= self.cap {
            return None;
        }
        // Released past a topic still waited for (the cap overflowed), that topic is not idle:
        // the partition's watermark keeps waiting for it, so what is released meanwhile is held
        // or retained, not expired.
        for u in 0..self.queues.len() {
            let idle = u != t
                && self.queues[u].is_empty()
                && self.backlog[u] != Backlog::Behind
                && now.duration_since(self.empty_since[u]) >= self.idle_limit(u);
            if idle != self.idle[u] {
                self.idle[u] = idle;
                self.idle_changed = true;
            }
        }
        let r = self.queues[t].pop_front()?;
        self.queued -= 1;
        if self.queues[t].is_empty() {
            self.empty_since[t] = now;
        }
        Some(r)
    }

    /// How long until a waiting record may be released by the idle rule (the longest remaining
    /// wait: `pop` releases only when no empty topic is still waited for). `None` when nothing
    /// waits, or when a topic that is behind is waited for: only a command can end that wait.
    pub(super) fn wait_hint(&self, now: Instant) -> Option<Duration> {
        if self.queued == 0 || self.blocked() {
            return None;
        }
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.is_empty())
            .map(|(u, _)| self.idle_limit(u).saturating_sub(now.duration_since(self.empty_since[u])))
            .max()
            .map(|d| d.max(Duration::from_millis(1)))
    }

    /// Updates which topics should be paused on the consumer; `true` when that changed.
    pub(super) fn update_pauses(&mut self) -> bool {
        let mut changed = false;
        for u in 0..self.queues.len() {
            let others = || (0..self.queues.len()).filter(move |v| *v != u);
            let len = self.queues[u].len();
            let want = if self.paused[u] {
                len > self.resume_at && others().any(|v| self.backlog[v] == Backlog::Behind)
            } else {
                len >= self.pause_at
                    && others().any(|v| self.backlog[v] == Backlog::Behind && self.queues[v].is_empty())
            };
            if want != self.paused[u] {
                self.paused[u] = want;
                changed = true;
            }
        }
        changed
    }
}

impl Session {
    /// Takes the end offsets (last stable offsets) and the consumer's positions that librdkafka
    /// reports for the aligned inputs. `ls_offset` comes from the last fetch response of the
    /// partition; `app_offset` is the position after the last record (or transaction marker)
    /// a task took from its queue, so every record before it has been read already.
    pub(super) fn observe_stats(&mut self, stats: &Statistics) {
        if !self.align {
            return;
        }
        for (topic, t) in &stats.topics {
            let Some(&u) = self.topic_index.get(topic) else { continue };
            for (p, part) in &t.partitions {
                let Some(input) = self.tasks.get_mut(p).and_then(|task| task.inputs.get_mut(u)) else {
                    continue;
                };
                // The end only moves forward: a value older than the watermarks read at
                // assignment (left from an earlier assignment of the partition) must not hide
                // a backlog.
                if part.ls_offset >= 0 && part.ls_offset > input.end {
                    input.end = part.ls_offset;
                    self.lag_changed = true;
                }
                if part.app_offset >= 0 && input.delivered(part.app_offset) {
                    self.lag_changed = true;
                }
            }
        }
    }

    /// After every poll, with aligned inputs: reads the consumer's positions while an input is
    /// not known to be caught up (they move past transaction markers, which no record
    /// reports), and tells the tasks whose inputs changed between behind and caught up.
    pub(super) fn track_backlog(&mut self, consumer: &BaseConsumer<Ctx>) {
        if !self.align {
            return;
        }
        let now = Instant::now();
        if now >= self.next_position_check {
            self.next_position_check = now + POSITION_CHECK;
            let unsettled = self.tasks.values().any(|t| t.inputs.iter().any(|i| i.told != Backlog::CaughtUp));
            if unsettled {
                match consumer.position() {
                    Ok(positions) => {
                        for e in positions.elements() {
                            let Some(&u) = self.topic_index.get(e.topic()) else { continue };
                            let Offset::Offset(o) = e.offset() else { continue };
                            let Some(input) =
                                self.tasks.get_mut(&e.partition()).and_then(|t| t.inputs.get_mut(u))
                            else {
                                continue;
                            };
                            if input.delivered(o) {
                                self.lag_changed = true;
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "consumer positions unavailable"),
                }
            }
        }
        if std::mem::take(&mut self.lag_changed) {
            self.publish_backlog();
        }
    }

    /// Sends each task the inputs whose backlog changed (positions move only as a task reads
    /// its queue, so the task has read every record the news covers).
    pub(super) fn publish_backlog(&mut self) {
        let mut dead = Vec::new();
        let mut changed = false;
        for (p, task) in &mut self.tasks {
            for (u, input) in task.inputs.iter_mut().enumerate() {
                let backlog = input.backlog();
                if backlog == input.told {
                    continue;
                }
                input.told = backlog;
                changed = true;
                tracing::debug!(
                    topic = %self.config.topics[u].name, partition = *p, next = input.next, end = input.end,
                    ?backlog, "input backlog changed"
                );
                if task.tx.blocking_send(Cmd::Backlog { topic: u, backlog }).is_err() {
                    dead.push(*p);
                    break;
                }
            }
        }
        for p in dead {
            self.poison(anyhow!("partition task {p} ended unexpectedly"));
        }
        if changed {
            self.report_lag();
        }
    }

    /// Carries out the tasks' pause requests on the consumer (this thread owns it).
    pub(super) fn apply_pauses(&mut self, consumer: &BaseConsumer<Ctx>) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let mut changes = Vec::new();
        for (p, task) in &self.tasks {
            for (u, input) in task.inputs.iter().enumerate() {
                let want = task.flow.want.get(u).is_some_and(|w| w.load(Ordering::SeqCst));
                if want != input.paused {
                    let list = if want { &mut pause } else { &mut resume };
                    list.add_partition(&self.config.topics[u].name, *p);
                    changes.push((*p, u, want));
                }
            }
        }
        if changes.is_empty() {
            return;
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                self.poison(anyhow!("pausing input partitions failed: {e}"));
                return;
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                self.poison(anyhow!("resuming input partitions failed: {e}"));
                return;
            }
        }
        for (p, u, want) in changes {
            let name = &self.config.topics[u].name;
            if let Some(input) = self.tasks.get_mut(&p).and_then(|t| t.inputs.get_mut(u)) {
                input.paused = want;
            }
            InputPaused { topic: name, partition: p, paused: want }.emit();
        }
        self.report_lag();
    }

    /// Resumes what the tasks of `parts` had paused (they are ending).
    pub(super) fn release_pauses(&mut self, consumer: &BaseConsumer<Ctx>, parts: &[i32]) {
        let mut resume = TopicPartitionList::new();
        for p in parts {
            let Some(task) = self.tasks.get_mut(p) else { continue };
            for (u, input) in task.inputs.iter_mut().enumerate() {
                if input.paused {
                    resume.add_partition(&self.config.topics[u].name, *p);
                    input.paused = false;
                }
            }
        }
        if resume.count() > 0 {
            tracing::debug!(partitions = ?parts, "resuming the inputs of ending partition tasks");
            if let Err(e) = consumer.resume(&resume) {
                self.poison(anyhow!("resuming input partitions failed: {e}"));
            }
        }
    }

    /// Gauges of the aligned inputs: paused ones, and ones known to have records on the broker.
    pub(super) fn report_lag(&self) {
        if !self.align {
            return;
        }
        let inputs = self.tasks.values().flat_map(|t| t.inputs.iter());
        let (mut paused, mut behind) = (0usize, 0usize);
        for i in inputs {
            paused += usize::from(i.paused);
            behind += usize::from(i.told == Backlog::Behind);
        }
        InputsAligned { paused, behind }.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::Backlog::{Behind, CaughtUp, Unknown};
    use super::*;

    fn record(topic: usize, timestamp_ms: i64) -> OwnedRecord {
        OwnedRecord {
            topic,
            offset: 0,
            timestamp_ms: Some(timestamp_ms),
            bytes: Vec::new(),
            payload_len: 0,
            headers: Vec::new(),
        }
    }

    /// Everything `pop` releases at `now`, as (topic, timestamp).
    fn drain(a: &mut Aligner, now: Instant) -> Vec<(usize, i64)> {
        std::iter::from_fn(|| a.pop(now)).map(|r| (r.topic, r.timestamp_ms.unwrap_or(0))).collect()
    }

    const IDLE: Duration = Duration::from_millis(200);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn an_unknown_topic_is_waited_for_until_its_first_record() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Unknown, Unknown], IDLE, 1000);
        a.push(record(1, 10));
        let t1 = t0 + FIRST_RECORD_WAIT / 2;
        assert!(a.pop(t1).is_none(), "feedback must not run ahead of unseen impressions");
        a.push(record(0, 5));
        let first = a.pop(t1).expect("both topics heard");
        assert_eq!(first.topic, 0, "oldest timestamp first");
        // Topic 0 is now heard and empty: the steady-state idle limit applies.
        assert!(a.pop(t1 + IDLE / 2).is_none());
        assert_eq!(a.pop(t1 + IDLE * 2).map(|r| r.topic), Some(1));
    }

    #[test]
    fn a_caught_up_topic_is_waited_for_only_the_idle_limit() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![CaughtUp, Unknown], IDLE, 1000);
        a.push(record(1, 10));
        assert_eq!(a.pop(t0 + IDLE * 2).map(|r| r.topic), Some(1));
    }

    #[test]
    fn the_wait_for_a_first_record_is_bounded() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Unknown, Unknown], IDLE, 1000);
        a.push(record(1, 10));
        assert!(a.pop(t0 + FIRST_RECORD_WAIT / 2).is_none());
        assert_eq!(a.pop(t0 + FIRST_RECORD_WAIT + IDLE).map(|r| r.topic), Some(1));
        assert!(a.wait_hint(t0).is_none(), "nothing queued");
    }

    #[test]
    fn the_wait_hint_is_the_longest_remaining_wait() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![CaughtUp, Unknown, Unknown], IDLE, 1000);
        a.push(record(2, 10));
        let hint = a.wait_hint(t0 + IDLE * 2).expect("a record waits");
        assert!(hint > FIRST_RECORD_WAIT / 2, "topic 1 is still waited for: {hint:?}");
    }

    #[test]
    fn a_full_queue_is_released_without_waiting_for_a_topic_that_is_not_behind() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Unknown, Unknown], IDLE, 2);
        for ts in 0..3 {
            a.push(record(1, ts));
        }
        assert_eq!(a.pop(t0).map(|r| r.timestamp_ms), Some(Some(0)));
    }

    #[test]
    fn a_topic_behind_is_never_overtaken() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 4);
        for ts in 10..20 {
            a.push(record(1, ts));
        }
        let later = t0 + HOUR;
        assert!(a.pop(later).is_none(), "neither time nor a full queue lets feedback overtake impressions");
        assert_eq!(a.wait_hint(later), None, "no timer: only a record or news of the backlog ends the wait");
        a.push(record(0, 12));
        assert_eq!(drain(&mut a, later), vec![(1, 10), (1, 11), (0, 12)], "merged, then waiting again");
        assert!(a.pop(later + HOUR).is_none());
    }

    #[test]
    fn a_topic_that_caught_up_is_skipped_after_max_idle() {
        let t0 = Instant::now();
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 1000);
        a.push(record(1, 10));
        let t1 = t0 + IDLE * 10;
        assert!(a.pop(t1).is_none());
        a.set_backlog(0, CaughtUp, t1);
        assert!(a.pop(t1 + IDLE / 2).is_none(), "idle counts from when the topic is known caught up");
        assert_eq!(a.wait_hint(t1 + IDLE / 2), Some(IDLE / 2));
        assert_eq!(a.pop(t1 + IDLE).map(|r| r.topic), Some(1));
    }

    #[test]
    fn a_full_queue_waiting_for_a_topic_behind_is_paused_then_resumed() {
        let t0 = Instant::now();
        let later = t0 + HOUR;
        // pause at 4 queued records of one topic, resume at 2.
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 8);
        for ts in 10..13 {
            a.push(record(1, ts));
        }
        assert!(!a.update_pauses(), "below the pause mark");
        a.push(record(1, 13));
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![false, true]);
        // Records already on their way when the pause took effect: held, beyond the cap.
        for ts in 14..30 {
            a.push(record(1, ts));
        }
        assert!(a.pop(later).is_none());
        assert!(!a.update_pauses(), "stays paused");
        // The lagging topic delivers: the merge goes on and waits again at its newest record.
        a.push(record(0, 11));
        a.push(record(0, 25));
        let out = drain(&mut a, later);
        assert_eq!(out.len(), 17);
        assert_eq!(out.last(), Some(&(0, 25)));
        assert!(!a.update_pauses(), "5 queued: above the resume mark while topic 0 is behind");
        a.push(record(0, 28));
        assert_eq!(drain(&mut a, later), vec![(1, 25), (1, 26), (1, 27), (0, 28)]);
        assert!(a.update_pauses(), "down to the resume mark");
        assert_eq!(a.paused, vec![false, false]);
    }

    #[test]
    fn a_topic_that_catches_up_releases_the_pause() {
        let mut a = Aligner::new(vec![Behind, CaughtUp], IDLE, 2);
        a.push(record(1, 10));
        a.push(record(1, 11));
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![false, true]);
        a.set_backlog(0, CaughtUp, Instant::now());
        assert!(a.update_pauses(), "nothing behind any more");
        assert_eq!(a.paused, vec![false, false]);
    }

    #[test]
    fn the_topic_waited_for_is_never_left_paused() {
        let later = Instant::now() + HOUR;
        let mut a = Aligner::new(vec![Behind, Behind], IDLE, 8);
        for ts in 0..4 {
            a.push(record(1, ts));
        }
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![false, true]);
        // Topic 0 delivers records newer than all of topic 1's: topic 1 drains and becomes the
        // topic waited for.
        for ts in 10..15 {
            a.push(record(0, ts));
        }
        assert_eq!(drain(&mut a, later), vec![(1, 0), (1, 1), (1, 2), (1, 3)]);
        assert!(a.update_pauses());
        assert_eq!(a.paused, vec![true, false], "the topic now ahead is paused, the one waited for resumed");
    }

    #[test]
    fn the_backlog_at_assignment_follows_the_watermarks() {
        let b = |restored, watermarks, latest| input_lag(restored, watermarks, latest).told;
        assert_eq!(b(Some(5), Some((0, 10)), false), Behind);
        assert_eq!(b(Some(10), Some((0, 10)), false), CaughtUp);
        assert_eq!(b(Some(2), Some((5, 5)), false), CaughtUp, "below the start of an empty log");
        assert_eq!(b(Some(2), Some((5, 9)), false), Behind, "reset to the start");
        assert_eq!(b(Some(2), Some((5, 9)), true), CaughtUp, "reset to the end");
        assert_eq!(b(None, Some((0, 10)), true), CaughtUp);
        assert_eq!(b(None, Some((3, 3)), false), CaughtUp);
        assert_eq!(b(None, Some((0, 10)), false), Behind, "the assignment names the log start");
        assert_eq!(b(Some(5), None, false), Unknown);
        // Behind until the records are delivered, however long that takes: only a delivery
        // or a position moves it (the consumer thread reads positions, never a clock).
        let mut lag = input_lag(None, Some((0, 10)), false);
        assert!(!lag.delivered(0), "a position at the log start is no progress");
        assert_eq!(lag.backlog(), Behind);
        assert!(lag.delivered(10));
        assert_eq!(lag.backlog(), CaughtUp);
    }

    #[test]
    fn a_transaction_marker_is_passed_by_the_position_not_by_records() {
        // Record 8 was the last one; offset 9 is the commit marker, so the end is 10.
        let mut lag = input_lag(Some(9), Some((0, 10)), false);
        assert_eq!(lag.backlog(), Behind);
        // The consumer's position (librdkafka's, after serving the marker) moves past it.
        lag.next = lag.next.max(10);
        assert_eq!(lag.backlog(), CaughtUp);
    }
}
