//! The attribution buffer's storage: retained impressions in a compact form.
//!
//! A shop keeps impressions for days (purchases) to a month (returns), so what one retained
//! impression costs decides how far the design scales. Here it is about 120 bytes with a
//! 6-item slate (BENCHMARKS.md, "Attribution state"):
//!
//! - impressions are found by a 128-bit hash of their id ([`Key`], xxh3 with a fixed seed): the
//!   id itself is never needed again, since nothing the join writes names it;
//! - item ids, segments and experiment arms are interned per partition ([`Interner`], counted
//!   references, so ids of released impressions are freed and cardinality is bounded by what
//!   is retained);
//! - a slate of up to [`INLINE`] items at consecutive positions is stored inline: item numbers,
//!   propensities as `f32`, and the kinds of feedback seen per item as 4 bits each (a 104-byte
//!   entry in all); longer slates go to a side map;
//! - entries live in a chunked slab indexed by a `hashbrown::HashTable<u32>` (4 bytes a slot),
//!   and expire through a wheel of one-minute buckets (unordered) whose first buckets are in a
//!   min-heap, instead of an ordered set of every entry.
//!
//! The buffer is a storage detail: every ordering decision (expiry, eviction) is taken on
//! (retention end, key), never on slab positions or hash-table order, so the join's behaviour
//! is a function of the records alone. Context features are kept only for linear models, which
//! need them when feedback arrives (a side map; they are outside the 128-byte goal).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use hashbrown::HashTable;
use rustc_hash::{FxHashMap, FxHashSet};
use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64};

use super::event::{FeedbackKind, Variant};

/// Seed of the impression-id hash. Fixed: keys are stored in the snapshot topic.
pub const KEY_SEED: u64 = 0x6261_6e64_6974_666c;

/// An impression's identity in the buffer: the xxh3-128 hash of its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key(pub u64, pub u64);

impl Key {
    pub fn of(id: &str) -> Key {
        let h = xxh3_128_with_seed(id.as_bytes(), KEY_SEED);
        Key((h >> 64) as u64, h as u64)
    }
}

/// Strings numbered per partition, with counted references: a name whose last user is gone
/// is freed and its number reused.
#[derive(Debug, Clone, Default)]
pub struct Interner {
    table: HashTable<u32>,
    names: Vec<Box<str>>,
    refs: Vec<u32>,
    free: Vec<u32>,
}

fn name_hash(s: &str) -> u64 {
    xxh3_64(s.as_bytes())
}

impl Interner {
    /// The number of `s`, one more reference to it.
    pub fn intern(&mut self, s: &str) -> u32 {
        let h = name_hash(s);
        let names = &self.names;
        if let Some(&i) = self.table.find(h, |&i| &*names[i as usize] == s) {
            self.refs[i as usize] += 1;
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.names[i as usize] = s.into();
                self.refs[i as usize] = 1;
                i
            }
            None => {
                self.names.push(s.into());
                self.refs.push(1);
                (self.names.len() - 1) as u32
            }
        };
        let names = &self.names;
        self.table.insert_unique(h, i, |&j| name_hash(&names[j as usize]));
        i
    }

    /// A variant stored as a number (0 treatment, 1 holdout, 2 + n the arm named n).
    pub fn variant(&self, code: u32) -> Variant {
        match code {
            0 => Variant::Treatment,
            1 => Variant::Holdout,
            n => Variant::Arm(self.name(n - 2).to_string()),
        }
    }

    pub fn find(&self, s: &str) -> Option<u32> {
        let names = &self.names;
        self.table.find(name_hash(s), |&i| &*names[i as usize] == s).copied()
    }

    pub fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("", |s| s)
    }

    /// Drops one reference to `i`.
    pub fn release(&mut self, i: u32) {
        let Some(r) = self.refs.get_mut(i as usize) else { return };
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        let h = name_hash(&self.names[i as usize]);
        if let Ok(e) = self.table.find_entry(h, |&j| j == i) {
            e.remove();
        }
        self.names[i as usize] = "".into();
        self.free.push(i);
    }

    /// Distinct names held.
    pub fn len(&self) -> usize {
        self.names.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Slates up to this long at consecutive positions are stored inline.
pub const INLINE: usize = 6;

/// `len` of a slate stored in [`Buffer::large`].
const ON_HEAP: u32 = 0xFF;

/// A stored slate: per item its interned id, position, propensity (as `f32`) and the feedback
/// kinds seen for it (bit `kind.index()`). Up to [`INLINE`] items at consecutive positions are
/// inline; a longer slate, or one with gaps, lives in [`Buffer::large`] under the entry's key.
/// `meta` packs the length (top 8 bits) with the seen kinds: 4 bits per inline item, or, for a
/// slate on the heap, the union of its items' kinds (which is all retention needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Slate {
    first_position: u32,
    items: [u32; INLINE],
    propensities: [f32; INLINE],
    meta: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeapSlate {
    pub items: Vec<u32>,
    pub positions: Vec<u32>,
    pub propensities: Vec<f32>,
    pub seen: Vec<u8>,
}

impl Slate {
    /// From (item, position, propensity) in slate order; `None` for the inline part of a slate
    /// that goes on the heap, with the heap part.
    pub fn new(slots: &[(u32, u32, f32)]) -> (Slate, Option<HeapSlate>) {
        let consecutive = slots
            .first()
            .is_some_and(|f| slots.iter().enumerate().all(|(i, s)| Some(s.1) == f.1.checked_add(i as u32)));
        if slots.len() <= INLINE && (consecutive || slots.is_empty()) {
            let mut items = [0; INLINE];
            let mut propensities = [0.0; INLINE];
            for (i, s) in slots.iter().enumerate() {
                items[i] = s.0;
                propensities[i] = s.2;
            }
            let slate = Slate {
                first_position: slots.first().map_or(0, |s| s.1),
                items,
                propensities,
                meta: (slots.len() as u32) << 24,
            };
            return (slate, None);
        }
        let heap = HeapSlate {
            items: slots.iter().map(|s| s.0).collect(),
            positions: slots.iter().map(|s| s.1).collect(),
            propensities: slots.iter().map(|s| s.2).collect(),
            seen: vec![0; slots.len()],
        };
        let slate =
            Slate { first_position: 0, items: [0; INLINE], propensities: [0.0; INLINE], meta: ON_HEAP << 24 };
        (slate, Some(heap))
    }

    pub fn on_heap(&self) -> bool {
        self.meta >> 24 == ON_HEAP
    }

    /// The feedback kinds seen for any item.
    pub fn seen_union(&self) -> u8 {
        if self.on_heap() {
            return (self.meta & 0xF) as u8;
        }
        (0..INLINE).fold(0u8, |u, i| u | ((self.meta >> (4 * i)) & 0xF) as u8)
    }

    pub fn len(&self, heap: Option<&HeapSlate>) -> usize {
        match heap {
            Some(h) if self.on_heap() => h.items.len(),
            _ if self.on_heap() => 0,
            _ => (self.meta >> 24) as usize,
        }
    }

    /// (item, position, propensity, seen kinds) of slot `i` (< `len()`).
    pub fn get(&self, i: usize, heap: Option<&HeapSlate>) -> (u32, u32, f32, u8) {
        match heap {
            Some(h) if self.on_heap() => (h.items[i], h.positions[i], h.propensities[i], h.seen[i]),
            _ => (
                self.items[i],
                self.first_position + i as u32,
                self.propensities[i],
                ((self.meta >> (4 * i)) & 0xF) as u8,
            ),
        }
    }

    pub fn set_seen(&mut self, i: usize, kinds: u8, heap: Option<&mut HeapSlate>) {
        match heap {
            Some(h) if self.on_heap() => {
                h.seen[i] = kinds;
                self.meta |= u32::from(kinds & 0xF);
            }
            _ => self.meta = (self.meta & !(0xF << (4 * i))) | (u32::from(kinds & 0xF) << (4 * i)),
        }
    }

    pub fn iter<'a>(&'a self, heap: Option<&'a HeapSlate>) -> impl Iterator<Item = (u32, u32, f32, u8)> + 'a {
        (0..self.len(heap)).map(move |i| self.get(i, heap))
    }
}

/// Changelog segment of an entry not written yet.
pub const UNSAVED: u32 = u32::MAX;

/// One retained impression.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: Key,
    pub time_ms: i64,
    pub total_reward_micros: i64,
    /// Interned segment.
    pub segment: u32,
    /// 0 = treatment, 1 = holdout, 2 + n = experiment arm with interned name n.
    pub variant: u32,
    /// The changelog segment holding this entry's newest stored version ([`UNSAVED`]: none).
    pub changelog: u32,
    /// Cascade models: 1 + the slate index of the deepest learned feedback (0: none).
    pub depth: u16,
    pub model: u8,
    pub opted_out: bool,
    pub slate: Slate,
}

/// When impressions may be released: the funnel of feedback kinds and the windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// By the set of kinds an item has received (bit `kind.index()`): how long after the
    /// impression more feedback may still come for it — the longest window of the kinds that
    /// set opens.
    pub horizon_by_seen: [i64; 16],
    pub late_ms: i64,
}

impl Retention {
    /// `requires[k]`: the kinds one of which must have been received for an item before kind
    /// `k` can come for it (0 = none: `k` can come for any shown item).
    pub fn new(requires: [u8; 4], windows: [i64; 4], late_ms: i64) -> Retention {
        let mut horizon_by_seen = [0i64; 16];
        for (seen, h) in horizon_by_seen.iter_mut().enumerate() {
            *h = (0..4)
                .filter(|&k| requires[k] == 0 || requires[k] & seen as u8 != 0)
                .map(|k| windows[k])
                .max()
                .unwrap_or(0);
        }
        Retention { horizon_by_seen, late_ms }
    }

    /// [`Retention::retained_until`] of an impression at `time_ms` whose items have seen `seen`.
    pub fn until(&self, time_ms: i64, seen: u8) -> i64 {
        time_ms.saturating_add(self.horizon_by_seen[usize::from(seen & 0xF)]).saturating_add(self.late_ms)
    }

    /// The last event time at which an entry is still retained: the watermark releases it once
    /// it passes this. The kinds open for an item are those whose requirement meets its seen
    /// kinds; a requirement is "any of", so the kinds open for some item are exactly those open
    /// for the union of all items' seen kinds, and the longest horizon is that union's.
    pub fn retained_until(&self, e: &Entry) -> i64 {
        let horizon = self.horizon_by_seen[usize::from(e.slate.seen_union() & 0xF)];
        e.time_ms.saturating_add(horizon).saturating_add(self.late_ms)
    }
}

const CHUNK: usize = 4096;
/// Width of an expiry-wheel bucket.
pub const WHEEL_MS: i64 = 60_000;

/// Changelog bookkeeping of one stored segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentUse {
    /// Entries written into it.
    pub written: u32,
    /// Of those, entries whose newest version it still holds.
    pub live: u32,
    /// With delete markers: the latest retention end of the entries they delete. Any stored
    /// version of those entries is dead at restore once the watermark passes it (a version's
    /// retention end is at most its entry's newest one), so the segment is kept until then, or
    /// until no older segment is left.
    pub markers_until: Option<i64>,
}

/// The retained impressions of one partition.
#[derive(Debug, Clone, Default)]
pub struct Buffer {
    chunks: Vec<Vec<Option<Entry>>>,
    free: Vec<u32>,
    index: HashTable<u32>,
    /// Expiry wheel: bucket → slab slots (stale references are skipped when a bucket is read).
    wheel: BTreeMap<i64, Vec<u32>>,
    /// Buckets up to `head_bucket` are in a min-heap of (retained until, key, slot): what
    /// expires next, exactly ordered. References are checked when they come out (an entry
    /// removed, moved or its slot reused leaves one behind).
    head: BinaryHeap<Reverse<(i64, Key, u32)>>,
    head_bucket: Option<i64>,
    pub names: Interner,
    /// Slates that are not stored inline (longer than [`INLINE`] or with gaps), by key.
    pub large: FxHashMap<Key, HeapSlate>,
    /// Context features of impressions whose model needs them (linear models).
    pub features: FxHashMap<Key, Vec<(String, f64)>>,
    /// Changelog: entries written since the last save, entries deleted (evicted or dropped;
    /// released ones need no record, restore recognises them by their retention end).
    pub dirty: FxHashSet<Key>,
    /// (key, retention end when deleted) of entries deleted before their retention end.
    pub deleted: Vec<(Key, i64)>,
    /// Nothing to keep durable (the offline replay): changes are not recorded.
    pub untracked: bool,
    /// Stored changelog segments by sequence number.
    pub segments: BTreeMap<u32, SegmentUse>,
    pub next_segment: u32,
    /// Entries to copy into the next segments so sparse old segments can be deleted.
    pub compaction: Vec<Key>,
    /// Entries copied so far (for metrics and tests).
    pub copied: u64,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn slot(&self, i: u32) -> Option<&Entry> {
        self.chunks.get(i as usize / CHUNK)?.get(i as usize % CHUNK)?.as_ref()
    }

    fn slot_mut(&mut self, i: u32) -> Option<&mut Entry> {
        self.chunks.get_mut(i as usize / CHUNK)?.get_mut(i as usize % CHUNK)?.as_mut()
    }

    fn find_slot(&self, key: Key) -> Option<u32> {
        let chunks = &self.chunks;
        self.index
            .find(key.0, |&i| {
                chunks[i as usize / CHUNK][i as usize % CHUNK].as_ref().is_some_and(|e| e.key == key)
            })
            .copied()
    }

    pub fn contains(&self, key: Key) -> bool {
        self.find_slot(key).is_some()
    }

    pub fn get(&self, key: Key) -> Option<&Entry> {
        self.find_slot(key).and_then(|i| self.slot(i))
    }

    /// The entry, the names it refers to and its slate if that is on the heap.
    pub fn get_mut(&mut self, key: Key) -> Option<(&mut Entry, &Interner, Option<&mut HeapSlate>)> {
        let i = self.find_slot(key)?;
        let names = &self.names;
        let e = self.chunks.get_mut(i as usize / CHUNK)?.get_mut(i as usize % CHUNK)?.as_mut()?;
        let heap = if e.slate.on_heap() { self.large.get_mut(&key) } else { None };
        Some((e, names, heap))
    }

    /// The heap part of an entry's slate, if it has one.
    pub fn heap(&self, e: &Entry) -> Option<&HeapSlate> {
        if e.slate.on_heap() {
            self.large.get(&e.key)
        } else {
            None
        }
    }

    /// (item, position, propensity, seen kinds) of every slot of an entry's slate.
    pub fn slate<'a>(&'a self, e: &'a Entry) -> impl Iterator<Item = (u32, u32, f32, u8)> + 'a {
        e.slate.iter(self.heap(e))
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.chunks.iter().flatten().flatten()
    }

    /// Inserts an entry whose key is not present (with its slate's heap part, if any).
    pub fn insert(&mut self, r: &Retention, entry: Entry, heap: Option<HeapSlate>) {
        let key = entry.key;
        if let Some(h) = heap {
            self.large.insert(key, h);
        }
        let until = r.retained_until(&entry);
        let i = match self.free.pop() {
            Some(i) => {
                self.chunks[i as usize / CHUNK][i as usize % CHUNK] = Some(entry);
                i
            }
            None => {
                if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                let n = self.chunks.len();
                self.chunks[n - 1].push(Some(entry));
                ((n - 1) * CHUNK + self.chunks[n - 1].len() - 1) as u32
            }
        };
        let chunks = &self.chunks;
        self.index.insert_unique(key.0, i, |&j| {
            chunks[j as usize / CHUNK][j as usize % CHUNK].as_ref().map_or(0, |e| e.key.0)
        });
        self.schedule(i, key, until);
        self.mark(key);
    }

    fn schedule(&mut self, i: u32, key: Key, until: i64) {
        let bucket = until.div_euclid(WHEEL_MS);
        if self.head_bucket.is_some_and(|h| bucket <= h) {
            self.head.push(Reverse((until, key, i)));
        } else {
            self.wheel.entry(bucket).or_default().push(i);
        }
    }

    /// Called after an entry's seen kinds changed: it may be retained longer.
    pub fn reschedule(&mut self, r: &Retention, key: Key, before_until: i64) {
        let Some(i) = self.find_slot(key) else { return };
        let Some(e) = self.slot(i) else { return };
        let until = r.retained_until(e);
        if until != before_until {
            self.schedule(i, key, until);
        }
    }

    pub fn mark(&mut self, key: Key) {
        if !self.untracked {
            self.dirty.insert(key);
        }
    }

    /// Removes and returns the entry that expires first (ties: smallest key) if it is retained
    /// until before `watermark` (any, with `None`: what a full buffer evicts).
    pub fn pop_first(&mut self, r: &Retention, watermark: Option<i64>) -> Option<Entry> {
        loop {
            let Some(&Reverse((until, key, i))) = self.head.peek() else {
                // Move the next bucket into the heap.
                let (&b, _) = self.wheel.first_key_value()?;
                if watermark.is_some_and(|w| b.saturating_mul(WHEEL_MS) >= w) {
                    return None;
                }
                let slots = self.wheel.remove(&b).unwrap_or_default();
                for j in slots {
                    if let Some(e) = self.slot(j) {
                        let t = r.retained_until(e);
                        if t.div_euclid(WHEEL_MS) == b {
                            self.head.push(Reverse((t, e.key, j)));
                        }
                    }
                }
                self.head_bucket = Some(b);
                continue;
            };
            let valid = self.slot(i).is_some_and(|e| e.key == key && r.retained_until(e) == until);
            if !valid {
                self.head.pop();
                continue;
            }
            if watermark.is_some_and(|w| until >= w) {
                return None;
            }
            self.head.pop();
            return self.remove_slot(i);
        }
    }

    /// Removes an entry (its interned names released).
    pub fn remove(&mut self, key: Key) -> Option<Entry> {
        let i = self.find_slot(key)?;
        self.remove_slot(i)
    }

    fn remove_slot(&mut self, i: u32) -> Option<Entry> {
        let e = self.chunks.get_mut(i as usize / CHUNK)?.get_mut(i as usize % CHUNK)?.take()?;
        if let Ok(found) = self.index.find_entry(e.key.0, |&j| j == i) {
            found.remove();
        }
        self.free.push(i);
        self.names.release(e.segment);
        if e.variant >= 2 {
            self.names.release(e.variant - 2);
        }
        let heap = if e.slate.on_heap() { self.large.remove(&e.key) } else { None };
        for s in e.slate.iter(heap.as_ref()) {
            self.names.release(s.0);
        }
        self.features.remove(&e.key);
        self.dirty.remove(&e.key);
        if let Some(seg) = self.segments.get_mut(&e.changelog) {
            seg.live = seg.live.saturating_sub(1);
        }
        Some(e)
    }

    /// The variant of an entry as the models name it.
    pub fn variant(&self, e: &Entry) -> Variant {
        self.names.variant(e.variant)
    }

    pub fn intern_variant(&mut self, v: &Variant) -> u32 {
        match v {
            Variant::Treatment => 0,
            Variant::Holdout => 1,
            Variant::Arm(a) => 2 + self.names.intern(a),
        }
    }

    /// Where the entry `key` sits (a handle for [`Buffer::at`] and [`Buffer::stored_in`],
    /// valid until the buffer changes): a save looks each key up once.
    pub fn slot_of(&self, key: Key) -> Option<u32> {
        self.find_slot(key)
    }

    /// The entry at a slot from [`Buffer::slot_of`].
    pub fn at(&self, slot: u32) -> Option<&Entry> {
        self.slot(slot)
    }

    /// Records that the entry at `slot` is stored in segment `seq` (its previous segment loses
    /// it).
    pub fn stored_in(&mut self, slot: u32, seq: u32) {
        let Some(e) = self.slot_mut(slot) else { return };
        let before = std::mem::replace(&mut e.changelog, seq);
        if let Some(s) = self.segments.get_mut(&before) {
            s.live = s.live.saturating_sub(1);
        }
        let s = self.segments.entry(seq).or_default();
        s.written += 1;
        s.live += 1;
    }

    /// Restore: the entry `key` was found in stored segment `seq`.
    pub fn restored_in(&mut self, key: Key, seq: u32) {
        let Some(i) = self.find_slot(key) else { return };
        let Some(e) = self.slot_mut(i) else { return };
        e.changelog = seq;
        self.segments.entry(seq).or_default().live += 1;
    }
}

/// Bit of `kind` in a seen-kinds set.
pub fn kind_bit(kind: FeedbackKind) -> u8 {
    1 << kind.index()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_are_freed_with_their_last_reference() {
        let mut n = Interner::default();
        let a = n.intern("a");
        assert_eq!(n.intern("a"), a);
        let b = n.intern("b");
        n.release(a);
        assert_eq!(n.find("a"), Some(a));
        n.release(a);
        assert_eq!(n.find("a"), None);
        assert_eq!(n.intern("c"), a, "number reused");
        assert_eq!(n.name(b), "b");
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn slates_round_trip_inline_and_on_the_heap() {
        for slots in [
            vec![(1, 1, 0.5f32), (2, 2, 0.25), (3, 3, 1.0)],
            (0..6).map(|i| (i, i + 7, 0.1)).collect(),
            (0..7).map(|i| (i, i + 1, 0.1)).collect(),
            vec![(1, 1, 0.5), (2, 3, 0.5)],
            vec![],
        ] {
            let (mut s, mut heap) = Slate::new(&slots);
            assert_eq!(heap.is_none(), slots.len() <= 6 && slots != [(1, 1, 0.5), (2, 3, 0.5)]);
            assert_eq!(s.len(heap.as_ref()), slots.len());
            for (i, want) in slots.iter().enumerate() {
                assert_eq!(s.get(i, heap.as_ref()), (want.0, want.1, want.2, 0));
            }
            if !slots.is_empty() {
                let last = slots.len() - 1;
                s.set_seen(last, 0b1010, heap.as_mut());
                assert_eq!(s.get(last, heap.as_ref()).3, 0b1010);
                s.set_seen(0, 0b0001, heap.as_mut());
                assert_eq!(s.seen_union(), if last == 0 { 0b0001 } else { 0b1011 });
            }
        }
    }

    #[test]
    fn a_retained_entry_fits_the_size_goal() {
        // The fixed part: 128 bytes per impression is the goal, with the table and the wheel.
        assert!(std::mem::size_of::<Option<Entry>>() <= 104, "{}", std::mem::size_of::<Option<Entry>>());
    }

    #[test]
    fn the_funnel_sets_how_long_an_item_stays_open() {
        // click 1h; cart and purchase need a click (1d, 7d); a return needs a purchase (30d).
        let h = 3_600_000;
        let r = Retention::new([0, 0b1, 0b11, 0b100], [h, 24 * h, 168 * h, 720 * h], 0);
        assert_eq!(r.horizon_by_seen[0], h, "nothing yet: the click window");
        assert_eq!(r.horizon_by_seen[0b1], 168 * h, "clicked: cart and purchase windows");
        assert_eq!(r.horizon_by_seen[0b11], 168 * h, "in the cart: the purchase window");
        assert_eq!(r.horizon_by_seen[0b101], 720 * h, "purchased: the return window");
        let none = Retention::new([0; 4], [h, 24 * h, 168 * h, 720 * h], 0);
        assert!(none.horizon_by_seen.iter().all(|&x| x == 720 * h), "no funnel: the longest window");
    }
}
