//! Helpers of the benches that run `banditflow` against a real broker (`#[path]` module):
//! producing records, CPU time of a process, starting and stopping a `banditflow run` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::TopicPartitionList;

use banditflow::kafka::{bootstrap_config, now_ms};

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn produce(bootstrap: &str, topic: &str, evs: &[(i32, Vec<u8>, Vec<u8>)], rate: Option<f64>) {
    produce_records(bootstrap, evs.iter().map(|(p, k, v)| (topic, *p, k.as_slice(), v.as_slice())), rate);
}

/// Writes (topic, partition, key, payload) records in the order given, each stamped with the
/// time it is produced: records of several topics interleave in time as their order says.
pub fn produce_records<'a>(
    bootstrap: &str,
    evs: impl IntoIterator<Item = (&'a str, i32, &'a [u8], &'a [u8])>,
    rate: Option<f64>,
) {
    produce_with(&producer(bootstrap), evs, rate);
}

/// The producer the benches write their inputs with (idempotent, 5 ms linger).
pub fn producer(bootstrap: &str) -> BaseProducer {
    let mut c = bootstrap_config(bootstrap);
    c.set("linger.ms", "5").set("enable.idempotence", "true").set("queue.buffering.max.messages", "1000000");
    c.create().expect("producer")
}

/// [`produce_records`] with a producer made earlier. A new idempotent producer sends nothing
/// until it has a producer id and the topic's metadata, up to a second after it is made, while
/// the records it holds are already stamped: a freshness run makes its producer before the
/// processor starts, so that what it measures is the pipeline, not that first second.
pub fn produce_with<'a>(
    p: &BaseProducer,
    evs: impl IntoIterator<Item = (&'a str, i32, &'a [u8], &'a [u8])>,
    rate: Option<f64>,
) {
    let started = Instant::now();
    for (i, (topic, part, key, payload)) in evs.into_iter().enumerate() {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / r);
            while Instant::now() < due {
                p.poll(Duration::from_micros(200));
            }
        }
        let mut rec = BaseRecord::to(topic).partition(part).key(key).payload(payload).timestamp(now_ms());
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    p.poll(Duration::from_millis(1));
                }
            }
        }
        if i % 1000 == 0 {
            p.poll(Duration::ZERO);
        }
    }
    p.flush(Duration::from_secs(120)).expect("flushed");
}

/// CPU seconds (user + system) of a process so far, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime (fields 14 and 15) are the 12th and 13th after the command name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn start_binary(
    bin: &str,
    config: &std::path::Path,
    partitions: i32,
) -> (std::process::Child, Arc<AtomicBool>, Arc<std::sync::Mutex<Option<Instant>>>) {
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("banditflow run starts");
    let assigned = Arc::new(AtomicBool::new(false));
    let at = Arc::new(std::sync::Mutex::new(None));
    let stderr = child.stderr.take().expect("stderr");
    let (flag, when) = (Arc::clone(&assigned), Arc::clone(&at));
    std::thread::spawn(move || {
        let mut seen = 0;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // A failing processor says why on the bench's output.
            if line.contains(" ERROR ")
                || line.contains("panicked")
                || std::env::var_os("BENCH_VERBOSE").is_some()
            {
                eprintln!("banditflow run: {line}");
            }
            if line.contains("partition assigned") {
                seen += 1;
                if seen == partitions {
                    *when.lock().expect("lock") = Some(Instant::now());
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    (child, assigned, at)
}

pub fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

/// The offsets `group` committed on `topic`, summed over its partitions.
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let mut c = bootstrap_config(bootstrap);
    c.set("group.id", group);
    let consumer: BaseConsumer = c.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map(|t| t.elements().iter().map(|e| e.offset().to_raw().unwrap_or(0).max(0)).sum())
        .unwrap_or(0)
}

/// An impression of model `home` by `segment` (`seg-<n>`) showing `items` (`item-<nnnnn>`) in
/// order, each at propensity 0.5.
pub fn impression(id: &str, t: i64, segment: usize, items: &[usize]) -> banditflow::core::event::Event {
    use banditflow::core::event::{Event, Impression, SlateEntry, Variant};
    Event::Impression(Impression {
        impression_id: id.into(),
        time_ms: t,
        model_id: "home".into(),
        model_version: 0,
        variant: Variant::Treatment,
        segment: format!("seg-{segment}"),
        features: Vec::new(),
        slate: items
            .iter()
            .enumerate()
            .map(|(i, it)| SlateEntry {
                item_id: format!("item-{it:05}"),
                position: i as u32 + 1,
                propensity: 0.5,
                score: 0.0,
            })
            .collect(),
        opted_out: false,
    })
}

/// A processor configuration for one combined protobuf topic, its snapshot topic `<tag>-snapshots`
/// and group `<tag>-group`; `kafka.snapshot_interval` from BENCH_SNAPSHOT_INTERVAL, else the
/// binary's default; `/metrics` on BENCH_METRICS_ADDRESS, else none.
pub fn config_file(dir: &std::path::Path, bootstrap: &str, topic: &str, tag: &str) -> std::path::PathBuf {
    let metrics = std::env::var("BENCH_METRICS_ADDRESS").unwrap_or_default();
    config_file_with(dir, bootstrap, topic, tag, &metrics, "")
}

/// [`config_file`] reading `inputs` ((topic, role, encoding)) instead of one combined topic.
#[allow(dead_code)] // not every bench reads several topics
pub fn config_file_inputs(
    dir: &std::path::Path,
    bootstrap: &str,
    inputs: &[(String, &str, &str)],
    tag: &str,
) -> std::path::PathBuf {
    let metrics = std::env::var("BENCH_METRICS_ADDRESS").unwrap_or_default();
    let path = config_file_with(dir, bootstrap, "", tag, &metrics, "");
    let topics: Vec<String> = inputs
        .iter()
        .map(|(t, role, encoding)| format!(r#"{{ name = "{t}", role = "{role}", encoding = "{encoding}" }}"#))
        .collect();
    let text = std::fs::read_to_string(&path).expect("config read");
    let text = text.replace(
        r#"topics = [{ name = "", role = "combined", encoding = "protobuf" }]"#,
        &format!("topics = [{}]", topics.join(", ")),
    );
    std::fs::write(&path, text).expect("config written");
    path
}

/// [`config_file`] with `/metrics` on `metrics` (none if empty) and `extra` appended (e.g. a
/// `[serving]` table).
pub fn config_file_with(
    dir: &std::path::Path,
    bootstrap: &str,
    topic: &str,
    tag: &str,
    metrics: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{tag}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[input]
topics = [{{ name = "{topic}", role = "combined", encoding = "protobuf" }}]
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{tag}-group"
snapshot_topic = "{tag}-snapshots"
dead_letter_topic = "{tag}-dlq"
metrics_address = "{metrics}"
{interval}{extra}"#,
            interval = std::env::var("BENCH_SNAPSHOT_INTERVAL")
                .map(|i| format!("snapshot_interval = \"{i}\"\n"))
                .unwrap_or_default()
        ),
    )
    .expect("config written");
    path
}

/// The HTTP status of `GET path` on `addr` (None when it does not answer).
pub fn get_status(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

/// Sum over partitions of a gauge on a /metrics page.
pub fn gauge_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub struct Start {
    pub ready_s: f64,
    pub cpu_s: f64,
    pub rss_mb: f64,
}

/// Starts `bin <command>` and returns it, running, once `/readyz` on `listen` answers 200.
pub fn spawn_ready(
    bin: &str,
    command: &str,
    config: &std::path::Path,
    listen: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, Start) {
    let started = Instant::now();
    // `command` may carry its own arguments ("aggregate --group 0").
    let mut child = Command::new(bin)
        .args(command.split_whitespace())
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .env("BANDITFLOW_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("banditflow starts");
    let deadline = started + Duration::from_secs(600);
    loop {
        if get_status(listen, "/readyz").is_some_and(|(c, _)| c == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "`{command}` did not become ready within 10 min");
        assert!(child.try_wait().ok().flatten().is_none(), "`{command}` exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready_s = started.elapsed().as_secs_f64();
    let pid = child.id();
    let s = Start { ready_s, cpu_s: cpu_seconds(&pid.to_string()), rss_mb: rss_mb(pid) };
    (child, s)
}
