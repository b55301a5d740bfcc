//! Seed corpora for the fuzz targets, made from the golden fixture: every record payload (with
//! the selector byte of its topic's role and encoding), the fixture's model snapshots and
//! checkpoint as the processor writes them, snapshot-topic records of a chunked model, and
//! recording lines. Usage: `seed <fuzz dir>`; writes `<dir>/corpus/<target>/seed-*`.

use std::path::{Path, PathBuf};

use banditflow::config::Config;
use banditflow::core::blob;
use banditflow::core::checkpoint;
use banditflow::replay;

fn write(dir: &Path, target: &str, name: &str, data: &[u8]) {
    let d = dir.join("corpus").join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(format!("seed-{name}")), data).expect("seed file");
}

fn main() {
    let fuzz = PathBuf::from(std::env::args().nth(1).expect("usage: seed <fuzz dir>"));
    let root = fuzz.join("..");
    let config = Config::load(Some(&root.join("tests/fixtures/shop.toml")), Vec::new()).expect("fixture config");
    let text = std::fs::read_to_string(root.join("tests/fixtures/shop.jsonl")).expect("fixture");
    let mut run = replay::ReplayRun::default();
    for (i, line) in text.lines().enumerate() {
        let r = banditflow::recording::parse_line(i + 1, line).expect("fixture line");
        // Every 40th record: enough variety, a corpus libFuzzer loads in a moment.
        if i % 40 == 0 {
            let topic = config.topic(&r.topic).expect("input topic");
            let role = match topic.role {
                banditflow::core::event::TopicRole::Impressions => 0u8,
                banditflow::core::event::TopicRole::Feedback => 1,
                banditflow::core::event::TopicRole::Combined => 2,
            };
            let json = u8::from(topic.encoding == banditflow::core::event::Encoding::Json) * 4;
            let mut data = vec![role | json | 8];
            data.extend(r.timestamp_ms.unwrap_or(0).to_le_bytes());
            data.extend(&r.payload);
            write(&fuzz, "event", &format!("{i:05}"), &data);
            write(&fuzz, "recording", &format!("{i:05}"), line.as_bytes());
        }
        replay::apply_record(&config, &mut run, r);
    }
    for (p, st) in &run.partitions {
        let saved = checkpoint::save_all(&config.core, st);
        write(&fuzz, "snapshot", &format!("checkpoint-{p}"), &saved.header);
        for (m, bytes) in &saved.models {
            write(&fuzz, "snapshot", &format!("{m}-{p}"), bytes);
            // The model as snapshot-topic records, chunked small, in the blob target's format.
            let key = checkpoint::model_key(m, *p);
            let mut data = Vec::new();
            for r in blob::split(&key, st.records, &bytes[..bytes.len().min(600)], 200, 0) {
                data.push(r.key.len() as u8);
                data.extend(r.key.as_bytes());
                let v = r.value.unwrap_or_default();
                data.push(1);
                data.extend((v.len() as u16).to_le_bytes());
                data.extend(&v);
            }
            write(&fuzz, "blob", &format!("{m}-{p}"), &data);
        }
    }
}
