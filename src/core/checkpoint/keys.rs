//! The keys of the state topics: checkpoint headers and markers, model heads, buffer segments,
//! held feedback and format-1 impression records, and how an id becomes one key segment.

pub fn header_key(partition: i32) -> String {
    format!("checkpoint/{partition}")
}

/// What a `checkpoint/…` key names: a partition with state (`checkpoint/<p>`, a processor's
/// header, or a group aggregator's marker of it) or a partition group whose aggregator has
/// announced itself (`checkpoint/group/<k>`, on the groups topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKey {
    Partition(i32),
    Group(i32),
}

/// The key a group aggregator announces partition group `group` under.
pub fn group_key(group: i32) -> String {
    format!("checkpoint/group/{group}")
}

/// Reads a `checkpoint/…` key ([`header_key`], [`group_key`]); `None` for any other key.
pub fn parse_checkpoint_key(key: &str) -> Option<CheckpointKey> {
    let rest = key.strip_prefix("checkpoint/")?;
    match rest.strip_prefix("group/") {
        Some(g) => g.parse().ok().map(CheckpointKey::Group),
        None => rest.parse().ok().map(CheckpointKey::Partition),
    }
}

/// Key of a format-1 buffered-impression record (restored, then deleted).
pub fn impression_key(partition: i32, id: &str) -> String {
    format!("imp/{partition}/{}", escape_key_part(id))
}

/// Whether `key` (a stored key or one of its chunks) belongs on the changelog topic: buffer
/// segments and held feedback. Everything else (headers, model heads and arm segments, and the
/// format-1 `imp/` records, which are only ever deleted) is on the snapshot topic.
pub fn is_changelog_key(key: &str) -> bool {
    key.starts_with("buf/") || key.starts_with("held/")
}

pub fn segment_key(partition: i32, sequence: u32) -> String {
    format!("buf/{partition}/{sequence:010}")
}

/// An id as one segment of a snapshot-topic key: `%`, `/` and `#` are percent-encoded, so that
/// `/` only ever separates segments and `#` only ever marks a chunk (`core::blob`), whatever
/// the id holds. Ids without those characters are unchanged.
pub fn escape_key_part(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.contains(['%', '/', '#']) {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The inverse of [`escape_key_part`]; `None` for text it cannot have produced.
pub fn unescape_key_part(part: &str) -> Option<String> {
    if part.contains(['/', '#']) {
        return None;
    }
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "2F" => '/',
            "23" => '#',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Whether `part` is a key segment as [`escape_key_part`] writes it. Keys written by versions
/// that did not escape (ids with `%` or `/`) are not, and are rewritten at restore.
pub fn is_escaped_key_part(part: &str) -> bool {
    unescape_key_part(part).is_some_and(|id| escape_key_part(&id) == part)
}

/// The model id and partition of a `model/<model>/<p>` key (`None` for any other key, chunks
/// included).
pub fn parse_model_key(key: &str) -> Option<(String, i32)> {
    let rest = key.strip_prefix("model/")?;
    let (model, partition) = rest.split_once('/')?;
    if partition.contains('#') {
        return None;
    }
    // A key written before ids were escaped holds the raw id (any but `/`, which model ids
    // never had): read it as such, so an upgrade restores it (and rewrites it escaped).
    let id = unescape_key_part(model).unwrap_or_else(|| model.to_string());
    Some((id, partition.parse().ok()?))
}

pub fn held_key(partition: i32, sequence: u64) -> String {
    format!("held/{partition}/{sequence:020}")
}

pub fn model_key(model: &str, partition: i32) -> String {
    format!("model/{}/{partition}", escape_key_part(model))
}
