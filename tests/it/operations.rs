//! Operating banditflow, proven with the tools operators use, on a real broker: the probes
//! tell the truth (a processor without Kafka stays alive and not ready; a processor is not
//! ready until its partitions are restored; a serving node is not ready while a snapshot
//! partition is still being read), the metrics pages pass `promtool check metrics`, and a real
//! Prometheus scraping a processor and a serving node under traffic answers every panel query
//! of the dashboard and every recording rule.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{json, Value};

use crate::kafka::{bootstrap, wait_until, Processor, Setup};
use crate::serving::{free_port, http, post, serve};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts `banditflow run` on `s` with its probes on a free port; returns it and that address.
fn processor_with_probes(s: &Setup, instance: &str, env: &[(&str, &str)]) -> (Processor, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let probes = addr.to_string();
    let mut env = env.to_vec();
    env.push(("BANDITFLOW__KAFKA__METRICS_ADDRESS", &probes));
    (s.start_with(instance, "info", &env), addr)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    if std::net::TcpStream::connect(addr).is_err() {
        return (0, String::new());
    }
    let (status, _, body) = http(addr, "GET", path, None, b"");
    (status, body)
}

/// `promtool` and `prometheus` from Debian's package, which scripts/deploy-check.sh installs
/// (scripts/test.sh runs it first). Missing tools fail the test: nothing is skipped.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found
        .unwrap_or_else(|| panic!("`{name}` not found; `scripts/deploy-check.sh --install-only` installs it"))
}

/// Runs `promtool check metrics` on a scrape of `addr`.
pub(crate) fn promtool_check_metrics(addr: SocketAddr, what: &str) {
    let (status, page) = get(addr, "/metrics");
    assert_eq!(status, 200, "{what}: /metrics");
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), page.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "{what}: promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        page.contains("# TYPE banditflow_build_info gauge") && page.contains("process_cpu_seconds_total")
    );
    assert!(!page.contains(" summary\n"), "{what}: no summaries, histograms only");
}

#[test]
fn a_processor_without_kafka_stays_alive_not_ready_and_retrying() {
    let b = bootstrap();
    let s = Setup::new("nokafka", &b, 1);
    // Nothing listens on port 1: Kafka is unreachable.
    let (mut p, addr) = processor_with_probes(
        &s,
        "0",
        &[("BANDITFLOW__KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1"), ("BANDITFLOW_LOG_FORMAT", "json")],
    );
    wait_until("the probes to answer", Duration::from_secs(20), || get(addr, "/healthz").0 == 200);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    wait_until("a retry, said in the log", Duration::from_secs(40), || {
        p.log_text().contains("cannot start consuming yet; retrying")
    });
    let log = p.log_text();
    assert!(log.contains("cannot reach Kafka at 127.0.0.1:1"), "{log}");
    assert!(p.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none()), "still running: {log}");
    assert_eq!(get(addr, "/healthz").0, 200, "liveness does not fail because Kafka is down");
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("cannot reach Kafka"), "readiness says why: {body}");
    let (_, metrics) = get(addr, "/metrics");
    assert!(metrics.contains("banditflow_ready 0"), "{metrics}");
    let (st, took) = p.terminate();
    assert!(st.success(), "SIGTERM while retrying exits 0");
    assert!(took < Duration::from_secs(20), "{took:?}");
    // Logged as JSON lines (BANDITFLOW_LOG_FORMAT=json, as --log-format json): each a JSON
    // object with its level and fields, librdkafka's lines included.
    let log = p.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    assert!(lines.iter().all(|v| v["level"].is_string() && v["fields"]["message"].is_string()), "{log}");
    assert!(lines.iter().any(|v| v["level"] == "WARN"
        && v["fields"]["error"].as_str().is_some_and(|e| e.contains("cannot reach Kafka"))));
}

/// Writes `n` records of `bytes` bytes under keys that are neither state nor models to
/// `partition` of `topic`: a long changelog in front of whatever comes next.
fn write_filler(bootstrap: &str, topic: &str, partition: i32, n: usize, bytes: usize) {
    let producer: BaseProducer = banditflow::kafka::bootstrap_config(bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "none")
        .create()
        .expect("producer");
    let value = vec![b'x'; bytes];
    for i in 0..n {
        let key = format!("filler/{partition}/{i:08}");
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).partition(partition).key(key.as_bytes()).payload(&value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flushed");
}

#[test]
fn probes_wait_for_restored_partitions_and_for_every_snapshot_partition_read() {
    let b = bootstrap();
    let s = Setup::new("probes", &b, 3);
    banditflow::kafka::admin::create_topics(&b, &[(&s.snapshots, 3, true)]).expect("snapshot topic");
    // 120 MB in front of partition 0's state: its restore and its reading take a while.
    write_filler(&b, &s.snapshots, 0, 120_000, 1_000);
    let shop = s.shop_with(banditflow::generate::ShopSpec { impressions: 1500, ..Default::default() });
    s.produce(shop.records.clone());

    // The processor: 503 while it restores, 200 once every assigned partition is.
    let (mut p, addr) = processor_with_probes(&s, "0", &[]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = get(addr, "/readyz");
        if status != 0 && seen.last().is_none_or(|(st, b): &(u16, String)| *st != status || *b != body) {
            seen.push((status, body));
        }
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not ready within 120 s: {seen:?}\n{}", p.log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        seen.iter().any(|(st, b)| *st == 503 && b.contains("restoring assigned partitions")),
        "not ready while restoring: {seen:?}"
    );
    let restored = p.log_text().matches("partition assigned and restored").count();
    assert_eq!(restored, 3, "ready only once all 3 partitions were restored:\n{}", p.log_text());
    promtool_check_metrics(addr, "processor");
    s.wait_caught_up(Duration::from_secs(120));
    let (st, _) = p.terminate();
    assert!(st.success());

    // The serving node: 503 while snapshot partition 0 (120 MB before its model) is read, even
    // once the other partitions' shards are merged; 200 with all 3.
    let node = serve(&s, &[]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let (status, body) = get(node.addr, "/readyz");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status == 200 {
            break v;
        }
        seen.push((status, v));
        assert!(Instant::now() < deadline, "node not ready within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    let partial = seen.iter().find(|(st, v)| {
        *st == 503 && v["models"].as_array().is_some_and(|ms| ms.iter().any(|m| m["loaded"] == true))
    });
    assert!(
        partial.is_some(),
        "expected 503 while a merge of some partitions was already loaded; saw {} answers, last {:?}",
        seen.len(),
        seen.last()
    );
    let partial = &partial.expect("checked").1;
    assert!(
        partial["reason"].as_str().is_some_and(|r| r.contains("snapshot topic") || r.contains("partitions")),
        "{partial}"
    );
    let models = ready["models"].as_array().expect("models");
    assert!(models.iter().all(|m| m["partitions"] == 3 && m["missing_partitions"] == json!([])), "{ready}");
    let total: i64 = s.end_offsets().iter().sum();
    assert!(models.iter().all(|m| m["model_version"] == total), "every record learned: {ready} vs {total}");
    promtool_check_metrics(node.addr, "serving node");
}

/// A Prometheus server on 127.0.0.1, killed on drop.
struct PrometheusServer {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- prometheus log (tail):");
            for l in text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Prometheus scraping `processors` (the processors and the aggregator: job "banditflow") and
/// `node` (job "banditflow-serving"), with the rules loaded.
fn prometheus(dir: &Path, processors: &[SocketAddr], node: SocketAddr) -> PrometheusServer {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let rules = root().join("deploy/prometheus/rules.yml");
    let targets: Vec<String> = processors.iter().map(|a| format!("'{a}'")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  \
         - job_name: banditflow\n    static_configs:\n      - targets: [{}]\n  \
         - job_name: banditflow-serving\n    static_configs:\n      - targets: ['{node}']\n",
        rules.display(),
        targets.join(", ")
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).expect("config");
    let log = dir.join("prometheus.log");
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("prometheus starts");
    let server = PrometheusServer { child: Some(child), addr, log };
    wait_until("Prometheus to be ready", Duration::from_secs(30), || get(addr, "/-/ready").0 == 200);
    server
}

/// An instant query through Prometheus' HTTP API: the result vector (an error fails).
fn query(addr: SocketAddr, promql: &str) -> Vec<Value> {
    let body: String = url_encode(promql);
    let (status, _, text) = http(
        addr,
        "POST",
        "/api/v1/query",
        Some("application/x-www-form-urlencoded"),
        format!("query={body}").as_bytes(),
    );
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert!(status == 200 && v["status"] == "success", "query failed ({status}): {promql}\n{text}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every panel query of the dashboard: (panel title, expression), rows included.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("deploy/grafana/banditflow.json")).expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
    }
    out
}

#[test]
fn a_real_prometheus_answers_every_dashboard_panel_and_recording_rule() {
    let b = bootstrap();
    let s = Setup::new("prom", &b, 2);
    let (mut p, paddr) = processor_with_probes(&s, "0", &[]);
    wait_until("the processor to be ready", Duration::from_secs(60), || get(paddr, "/readyz").0 == 200);
    let node = serve(
        &s,
        &[("BANDITFLOW__SERVING__COLD_START", "true"), ("BANDITFLOW__SERVING__HOLDOUT_SHARE", "0.25")],
    );
    let dir = tempfile::tempdir().expect("tmp");
    // The merged-model stage too: the dashboard has a row for it.
    let aaddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let aggregator = s.start_aggregator(&[], &[("BANDITFLOW__KAFKA__METRICS_ADDRESS", &aaddr.to_string())]);
    let prom = prometheus(dir.path(), &[paddr, aaddr], node.addr);

    // Traffic: shoppers ranked by the node, a third of them clicking the first item, for
    // long enough that every rate has several scrapes in its window.
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(25) {
        let body = json!({"model": "home", "segment": "women", "user_key": format!("u{n}"),
            "candidates": (0..8).map(|i| format!("sku-{:04}", (n + i) % 40)).collect::<Vec<_>>(), "slate_size": 4});
        let (status, _, r) = post(node.addr, "/v1/rank", &body);
        assert_eq!(status, 200, "{r}");
        if n % 3 == 0 {
            let fb = json!({"impression_id": r["impression_id"], "item_id": r["slate"][0]["item_id"], "position": 1, "kind": "click"});
            assert_eq!(post(node.addr, "/v1/feedback", &fb).0, 202);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    // The node must have seen its own records learned (freshness) before the queries.
    wait_until("the node's freshness histogram", Duration::from_secs(30), || {
        get(node.addr, "/metrics").1.lines().any(|l| {
            l.starts_with("banditflow_serving_event_to_visible_seconds_count")
                && l.split_whitespace().last().is_some_and(|v| v != "0")
        })
    });
    // …and Prometheus has scraped it.
    wait_until("Prometheus to hold the node's freshness samples", Duration::from_secs(30), || {
        !query(prom.addr, "sum(banditflow_serving_event_to_visible_seconds_count) > 0").is_empty()
    });

    let mut failures = Vec::new();
    let mut answered = BTreeMap::new();
    for (title, expr) in dashboard_queries() {
        let promql =
            expr.replace("$__rate_interval", "15s").replace("$instance", ".+").replace("$model", ".+");
        let result = query(prom.addr, &promql);
        if result.is_empty() {
            failures.push(format!("panel `{title}`: no series for {promql}"));
        }
        answered.insert(format!("{title}: {promql}"), result);
    }
    // Every rule evaluates without error, and every recording rule has produced series.
    let (_, _, text) = http(prom.addr, "GET", "/api/v1/rules", None, b"");
    let rules: Value = serde_json::from_str(&text).expect("rules JSON");
    let mut recorded = 0;
    for g in rules["data"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            if r["health"] != "ok" {
                failures.push(format!("rule {} is {}: {}", r["name"], r["health"], r["lastError"]));
            }
            if r["type"] == "recording" {
                recorded += 1;
                let name = r["name"].as_str().expect("name");
                if query(prom.addr, name).is_empty() {
                    failures.push(format!("recording rule {name}: no series"));
                }
            }
        }
    }
    assert!(recorded >= 20, "recording rules loaded: {recorded}");
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
    // One answer for the record: events per second and the lift the rules compute.
    let rate = query(prom.addr, "sum(rate(banditflow_records_total[15s]))");
    let lift = query(prom.addr, "model:banditflow_lift:estimate");
    eprintln!(
        "{} panel queries answered; events/s {}; lift {}",
        answered.len(),
        rate[0]["value"],
        json!(lift)
    );
    promtool_check_metrics(paddr, "processor under traffic");
    promtool_check_metrics(node.addr, "serving node under traffic");
    promtool_check_metrics(aaddr, "aggregator under traffic");
    let (st, _) = p.terminate();
    assert!(st.success());
    let mut aggregator = aggregator;
    let (st, _) = aggregator.terminate();
    assert!(st.success(), "the aggregator exits 0 on SIGTERM");
    // A clean start and run logs no warnings: each librdkafka client got only the properties
    // that apply to it (no CONFWARN), and nothing of banditflow's own warned.
    let node_log = std::fs::read_to_string(&node.log).expect("node log");
    for (what, log) in
        [("processor", p.log_text()), ("serving node", node_log), ("aggregator", aggregator.log_text())]
    {
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("CONFWARN")
                    || ((l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains(" banditflow"))
            })
            .collect();
        assert!(bad.is_empty(), "{what} warned on a clean run:\n{}", bad.join("\n"));
    }
}
