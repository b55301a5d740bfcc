//! A protobuf reader for the event contract (`proto/banditflow/v1/events.proto`) that decodes
//! in place: strings are checked as UTF-8 and borrowed from the record, repeated messages are
//! collected into one vector each, nothing else is allocated.
//!
//! It reads the wire format as prost does (the last value of a scalar or string field wins,
//! unknown fields are skipped, `uint32` and enums keep the low 32 bits of their varint, `bool`
//! is a varint other than 0) and gives up (`None`) on whatever it would have to merge or
//! reject: a singular message field (`variant`, `context`, the event's body) given twice, a
//! field whose wire type is not the contract's, a group, an overlong or truncated varint,
//! a length past the end, invalid UTF-8. The caller then decodes with prost, which answers
//! those (mostly with its own error), so a record decodes to the same event or the same error
//! whichever reader takes it (`event::decode_in_place`, tested against prost on mutated
//! records).

use super::event::{PbFeedback, PbImpression};

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    fn more(&self) -> bool {
        !self.buf.is_empty()
    }

    /// A varint of at most 10 bytes whose tenth byte adds at most one bit (prost's bound).
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, &b) in self.buf.iter().take(10).enumerate() {
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.buf = self.buf.get(i + 1..)?;
                return Some(value);
            }
        }
        None
    }

    /// A field's number and wire type.
    fn key(&mut self) -> Option<(u32, u8)> {
        let key = u32::try_from(self.varint()?).ok()?;
        let tag = key >> 3;
        (tag != 0).then_some((tag, (key & 7) as u8))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Some(head)
    }

    fn string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn fixed64(&mut self) -> Option<u64> {
        let (head, rest) = self.buf.split_first_chunk::<8>()?;
        self.buf = rest;
        Some(u64::from_le_bytes(*head))
    }

    fn double(&mut self) -> Option<f64> {
        self.fixed64().map(f64::from_bits)
    }

    /// Skips a field this reader does not know (groups are left to prost).
    fn skip(&mut self, wire_type: u8) -> Option<()> {
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.fixed64().map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => {
                let (_, rest) = self.buf.split_first_chunk::<4>()?;
                self.buf = rest;
                Some(())
            }
            _ => None,
        }
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// An `Event`'s body.
pub(crate) enum Body<'a> {
    Impression(PbImpression<'a>),
    Feedback(PbFeedback<'a>),
}

pub(crate) fn event(buf: &[u8]) -> Option<Body<'_>> {
    let mut r = Reader::new(buf);
    let mut body = None;
    while r.more() {
        match r.key()? {
            (1, LEN) if body.is_none() => body = Some(Body::Impression(impression(r.bytes()?)?)),
            (2, LEN) if body.is_none() => body = Some(Body::Feedback(feedback(r.bytes()?)?)),
            (1 | 2, _) => return None,
            (_, wt) => r.skip(wt)?,
        }
    }
    body
}

pub(crate) fn impression(buf: &[u8]) -> Option<PbImpression<'_>> {
    let mut m = PbImpression {
        impression_id: "",
        event_time_ms: 0,
        model_id: "",
        model_version: 0,
        variant: None,
        segment: "",
        features: Vec::new(),
        slate: Vec::new(),
        opted_out: false,
    };
    let mut context = false;
    let mut r = Reader::new(buf);
    while r.more() {
        match r.key()? {
            (1, LEN) => m.impression_id = r.string()?,
            (2, VARINT) => m.event_time_ms = r.varint()? as i64,
            (3, LEN) => m.model_id = r.string()?,
            (4, VARINT) => m.model_version = r.varint()?,
            (5, LEN) if m.variant.is_none() => m.variant = Some(variant(r.bytes()?)?),
            (6, LEN) if !context => {
                context = true;
                let mut c = Reader::new(r.bytes()?);
                while c.more() {
                    match c.key()? {
                        (1, LEN) => m.segment = c.string()?,
                        (2, LEN) => m.features.push(feature(c.bytes()?)?),
                        (1 | 2, _) => return None,
                        (_, wt) => c.skip(wt)?,
                    }
                }
            }
            (7, LEN) => m.slate.push(slate_item(r.bytes()?)?),
            (8, VARINT) => m.opted_out = r.varint()? != 0,
            // Never stored, but prost checks it is UTF-8.
            (9, LEN) => drop(r.string()?),
            (1..=9, _) => return None,
            (_, wt) => r.skip(wt)?,
        }
    }
    Some(m)
}

fn variant(buf: &[u8]) -> Option<(i32, &str)> {
    let (mut kind, mut arm) = (0, "");
    let mut r = Reader::new(buf);
    while r.more() {
        match r.key()? {
            (1, VARINT) => kind = r.varint()? as i32,
            (2, LEN) => arm = r.string()?,
            (1 | 2, _) => return None,
            (_, wt) => r.skip(wt)?,
        }
    }
    Some((kind, arm))
}

fn feature(buf: &[u8]) -> Option<(&str, f64)> {
    let (mut name, mut value) = ("", 0.0);
    let mut r = Reader::new(buf);
    while r.more() {
        match r.key()? {
            (1, LEN) => name = r.string()?,
            (2, FIXED64) => value = r.double()?,
            (1 | 2, _) => return None,
            (_, wt) => r.skip(wt)?,
        }
    }
    Some((name, value))
}

/// (item, position, propensity, score)
fn slate_item(buf: &[u8]) -> Option<(&str, i64, f64, f64)> {
    let (mut item, mut position, mut propensity, mut score) = ("", 0u32, 0.0, 0.0);
    let mut r = Reader::new(buf);
    while r.more() {
        match r.key()? {
            (1, LEN) => item = r.string()?,
            (2, VARINT) => position = r.varint()? as u32,
            (3, FIXED64) => propensity = r.double()?,
            (4, FIXED64) => score = r.double()?,
            (1..=4, _) => return None,
            (_, wt) => r.skip(wt)?,
        }
    }
    Some((item, i64::from(position), propensity, score))
}

pub(crate) fn feedback(buf: &[u8]) -> Option<PbFeedback<'_>> {
    let mut m =
        PbFeedback { impression_id: "", item_id: "", position: 0, kind: 0, value: 0.0, event_time_ms: 0 };
    let mut r = Reader::new(buf);
    while r.more() {
        match r.key()? {
            (1, LEN) => m.impression_id = r.string()?,
            (2, LEN) => m.item_id = r.string()?,
            (3, VARINT) => m.position = r.varint()? as u32,
            (4, VARINT) => m.kind = r.varint()? as i32,
            (5, FIXED64) => m.value = r.double()?,
            (6, VARINT) => m.event_time_ms = r.varint()? as i64,
            (1..=6, _) => return None,
            (_, wt) => r.skip(wt)?,
        }
    }
    Some(m)
}
