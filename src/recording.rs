//! The recording format: JSON lines, one Kafka record per line.
//!
//! ```json
//! {"topic":"impressions","partition":0,"offset":42,"timestamp":1767225600000,
//!  "key":"imp-17","headers":[["source","web"]],"payload_b64":"CgZpbXAtMTcQ..."}
//! ```
//!
//! `payload` holds a UTF-8 payload as text, `payload_b64` a binary one (standard base64);
//! `key`/`key_b64` likewise; `timestamp` is milliseconds since the Unix epoch; `headers` is a
//! list of `[name, value]` pairs (values UTF-8). Lines written by `kcat -J` are accepted too:
//! `ts` for the timestamp and `headers` as a flat `[name, value, name, value, ...]` list, with
//! text payloads. A missing or null payload is an empty payload.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("recording line {line}: {message}")]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

fn bytes_field(obj: &Map<String, Value>, text: &str, b64: &str) -> Result<Option<Vec<u8>>, String> {
    if let Some(v) = obj.get(b64) {
        return match v {
            Value::Null => Ok(None),
            Value::String(s) => B64.decode(s).map(Some).map_err(|e| format!("`{b64}` is not base64: {e}")),
            _ => Err(format!("`{b64}` must be a string")),
        };
    }
    match obj.get(text) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone().into_bytes())),
        Some(_) => Err(format!("`{text}` must be a string")),
    }
}

/// Parses one line (1-based `line` for the error).
pub fn parse_line(line: usize, text: &str) -> Result<Record, LineError> {
    let err = |message: String| LineError { line, message };
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| err("not a JSON object".into()))?;
    let topic = obj
        .get("topic")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("missing `topic`".into()))?
        .to_string();
    let partition = obj
        .get("partition")
        .and_then(Value::as_i64)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p >= 0)
        .ok_or_else(|| err("missing or invalid `partition`".into()))?;
    let offset = obj
        .get("offset")
        .and_then(Value::as_i64)
        .filter(|o| *o >= 0)
        .ok_or_else(|| err("missing or invalid `offset`".into()))?;
    let timestamp_ms = obj.get("timestamp").or_else(|| obj.get("ts")).and_then(Value::as_i64);
    let key = bytes_field(obj, "key", "key_b64").map_err(err)?;
    let payload = bytes_field(obj, "payload", "payload_b64").map_err(err)?.unwrap_or_default();
    let mut headers = Vec::new();
    match obj.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let pairs = items.iter().all(|i| i.is_array());
            if pairs {
                for i in items {
                    match i.as_array().map(Vec::as_slice) {
                        Some([Value::String(k), Value::String(v)]) => {
                            headers.push((k.clone(), v.clone().into_bytes()))
                        }
                        Some([Value::String(k), Value::Null]) => headers.push((k.clone(), Vec::new())),
                        _ => return Err(err("each header must be [name, value]".into())),
                    }
                }
            } else {
                // kcat: ["name", "value", "name", "value", ...]
                if items.len() % 2 != 0 {
                    return Err(err("kcat headers must come in name/value pairs".into()));
                }
                for pair in items.chunks(2) {
                    match pair {
                        [Value::String(k), Value::String(v)] => {
                            headers.push((k.clone(), v.clone().into_bytes()))
                        }
                        [Value::String(k), Value::Null] => headers.push((k.clone(), Vec::new())),
                        _ => return Err(err("header names and values must be strings".into())),
                    }
                }
            }
        }
        Some(_) => return Err(err("`headers` must be a list".into())),
    }
    Ok(Record { topic, partition, offset, timestamp_ms, key, headers, payload })
}

fn put_bytes(obj: &mut Map<String, Value>, text: &str, b64: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(text.into(), Value::String(s.to_string())),
        Err(_) => obj.insert(b64.into(), Value::String(B64.encode(bytes))),
    };
}

/// Formats one record as a line (without the newline). Binary payloads go base64.
pub fn format_line(r: &Record) -> String {
    let mut obj = Map::new();
    obj.insert("topic".into(), Value::String(r.topic.clone()));
    obj.insert("partition".into(), Value::from(r.partition));
    obj.insert("offset".into(), Value::from(r.offset));
    if let Some(ts) = r.timestamp_ms {
        obj.insert("timestamp".into(), Value::from(ts));
    }
    if let Some(k) = &r.key {
        put_bytes(&mut obj, "key", "key_b64", k);
    }
    if !r.headers.is_empty() {
        let hs = r
            .headers
            .iter()
            .map(|(k, v)| {
                Value::Array(vec![
                    Value::String(k.clone()),
                    Value::String(String::from_utf8_lossy(v).into_owned()),
                ])
            })
            .collect();
        obj.insert("headers".into(), Value::Array(hs));
    }
    put_bytes(&mut obj, "payload", "payload_b64", &r.payload);
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_binary_and_text() {
        let r = Record {
            topic: "impressions".into(),
            partition: 3,
            offset: 9,
            timestamp_ms: Some(1_767_225_600_000),
            key: Some(b"imp-1".to_vec()),
            headers: vec![("source".into(), b"web".to_vec())],
            payload: vec![0x0a, 0xff, 0x00, 0x12],
        };
        let line = format_line(&r);
        assert!(line.contains("payload_b64"));
        assert_eq!(parse_line(1, &line), Ok(r));
    }

    #[test]
    fn accepts_kcat_lines() {
        let line = r#"{"topic":"feedback","partition":1,"offset":7,"tstype":"create","ts":1700000000123,"broker":1,"headers":["a","1","b","2"],"key":"imp-9","payload":"{\"x\":1}"}"#;
        let r = parse_line(4, line).expect("kcat line");
        assert_eq!(r.timestamp_ms, Some(1_700_000_000_123));
        assert_eq!(r.headers, vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]);
        assert_eq!(r.payload, br#"{"x":1}"#.to_vec());
    }

    #[test]
    fn bad_lines_name_the_line() {
        for (text, needle) in [
            ("nope", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"partition":0,"offset":1}"#, "topic"),
            (r#"{"topic":"t","partition":-1,"offset":1}"#, "partition"),
            (r#"{"topic":"t","partition":0,"offset":1,"payload_b64":"%%"}"#, "base64"),
        ] {
            let e = parse_line(12, text).expect_err(text);
            assert_eq!(e.line, 12);
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }
}
