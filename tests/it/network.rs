//! Network faults between banditflow and the broker, made by a real fault proxy: Toxiproxy
//! (`scripts/toxiproxy.sh` installs it from the Go module proxy) on the broker's fault listener
//! (`scripts/kafka.sh`: port+2, advertised as port+3, so clients bootstrapped through the proxy
//! keep talking through it). The processor and a serving node reach Kafka only through the
//! proxy; the test's producer and checks go direct. Under steady traffic: added latency
//! (200 ms ± 50 ms), a bandwidth limit, connection resets, and a black hole longer than
//! `kafka.transaction_timeout` and the session timeout, while a second instance that reaches
//! Kafka directly takes the partitions over. Asserted: the learned totals equal the
//! generator's truth (nothing lost or applied twice); the instance cut off gives way;
//! processing resumes after each fault
//! within the bound of its wait (the figures are printed and go into BENCHMARKS.md); while
//! Kafka is unreachable the node answers 503 with `Retry-After`, never 200, and it recovers
//! by itself.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banditflow::generate::ShopSpec;
use banditflow::kafka::admin;
use serde_json::{json, Value};

use crate::kafka::{bootstrap, edit_config, unique, wait_until, Setup};
use crate::serving::{free_port, http, post};

struct Toxiproxy {
    child: Child,
    api: SocketAddr,
}

impl Toxiproxy {
    fn start() -> Toxiproxy {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out =
            Command::new("bash").arg(root.join("scripts/toxiproxy.sh")).arg("path").output().expect("runs");
        assert!(out.status.success(), "installing Toxiproxy: {}", String::from_utf8_lossy(&out.stderr));
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new(bin)
            .args(["-host", "127.0.0.1", "-port", &api.port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("toxiproxy starts");
        let t = Toxiproxy { child, api };
        wait_until("Toxiproxy answers", Duration::from_secs(20), || {
            std::net::TcpStream::connect(api).is_ok() && http(api, "GET", "/version", None, b"").0 == 200
        });
        t
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, text) = http(self.api, method, path, Some("application/json"), bytes.as_bytes());
        assert!((200..300).contains(&status), "{method} {path}: {status} {text}");
    }

    fn toxic(&self, proxy: &str, name: &str, kind: &str, stream: &str, attributes: Value) {
        let body =
            json!({"name": name, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes});
        self.call("POST", &format!("/proxies/{proxy}/toxics"), Some(body));
    }

    fn remove(&self, proxy: &str, name: &str) {
        self.call("DELETE", &format!("/proxies/{proxy}/toxics/{name}"), None);
    }
}

impl Drop for Toxiproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rank request to the node: (status, whether `Retry-After` came with it, seconds taken).
fn rank(node: SocketAddr, user: usize) -> (u16, bool, f64) {
    let started = Instant::now();
    let body = json!({"model": "home", "candidates": ["a", "b", "c", "d"], "slate_size": 3, "user_key": format!("u{user}")});
    let (status, headers, _) = post(node, "/v1/rank", &body);
    (status, headers.contains("retry-after:"), started.elapsed().as_secs_f64())
}

#[test]
fn latency_bandwidth_resets_and_a_black_hole_lose_nothing_and_heal() {
    let direct = bootstrap();
    let port: u16 = direct.rsplit(':').next().and_then(|p| p.parse().ok()).expect("bootstrap port");
    let (upstream, listen) = (port + 2, port + 3);
    let toxi = Toxiproxy::start();
    toxi.call(
        "POST",
        "/proxies",
        Some(json!({"name": "kafka", "listen": format!("127.0.0.1:{listen}"), "upstream": format!("127.0.0.1:{upstream}")})),
    );
    let proxied = format!("127.0.0.1:{listen}");

    let s = Setup::new("faults", &direct, 3);
    edit_config(
        &s,
        &format!("bootstrap_servers = \"{direct}\""),
        &format!("bootstrap_servers = \"{proxied}\""),
    );
    // The node logs its impressions to a topic of its own, so the processor's input stays the
    // shop's and its truth exact.
    let node_topic = unique("faults-node");
    admin::create_topics(&direct, &[(&node_topic, 3, false)]).expect("node topic");
    let node_setup = Setup::new("faults-serve", &direct, 3);
    let text = std::fs::read_to_string(&s.config_path)
        .expect("config")
        .replace(&format!("name = \"{}\"", s.input), &format!("name = \"{node_topic}\""));
    std::fs::write(&node_setup.config_path, text).expect("node config");
    let node = crate::serving::serve(&node_setup, &[("BANDITFLOW__SERVING__COLD_START", "true")]);

    let rate = 1500.0;
    let shop = s.shop_with(ShopSpec {
        seed: 91,
        impressions: 60_000,
        malformed_share: 0.001,
        ..ShopSpec::default()
    });
    let producer = s.produce_paced(shop.records.clone(), rate);
    let proxied_processor = s.start("0");
    wait_until("a first commit through the proxy", Duration::from_secs(120), || s.committed_total() > 0);
    wait_until("the node answers through the proxy", Duration::from_secs(60), || rank(node.addr, 0).0 == 200);

    let mut figures = Vec::new();
    let mut user = 1;
    // Each fault lasts `hold`; afterwards the committed position must move on.
    let mut fault = |name: &str, kind: &str, attributes: Value, hold: Duration, figures: &mut Vec<String>| {
        for stream in ["upstream", "downstream"] {
            toxi.toxic("kafka", &format!("{name}-{stream}"), kind, stream, attributes.clone());
        }
        let before = s.committed_total();
        let until = Instant::now() + hold;
        let mut answers = Vec::new();
        while Instant::now() < until {
            answers.push(rank(node.addr, user));
            user += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        let during = s.committed_total() - before;
        for stream in ["upstream", "downstream"] {
            toxi.remove("kafka", &format!("{name}-{stream}"));
        }
        let removed = Instant::now();
        let at = s.committed_total();
        wait_until(&format!("progress after {name}"), Duration::from_secs(120), || s.committed_total() > at);
        let resumed = removed.elapsed().as_secs_f64();
        let ok = answers.iter().filter(|a| a.0 == 200).count();
        let slowest = answers.iter().map(|a| a.2).fold(0.0, f64::max);
        figures.push(format!(
            "{name}: {} s, {during} records committed meanwhile, committing again {resumed:.1} s after it ended; \
             node {ok}/{} answered 200, slowest {slowest:.1} s",
            hold.as_secs(),
            answers.len()
        ));
        answers
    };
    fault("latency", "latency", json!({"latency": 200, "jitter": 50}), Duration::from_secs(10), &mut figures);
    fault("bandwidth", "bandwidth", json!({"rate": 256}), Duration::from_secs(10), &mut figures);
    fault("reset", "reset_peer", json!({"timeout": 0}), Duration::from_secs(4), &mut figures);
    // A second instance, reaching Kafka directly, shares the partitions; the black hole cuts
    // the first one off for longer than kafka.transaction_timeout (5 s) and session.timeout.ms
    // (6 s): the group gives its partitions to the second, and when the network heals the
    // first, fenced, must give way (its transaction aborted, its session rebuilt).
    let direct_env = [("BANDITFLOW__KAFKA__BOOTSTRAP_SERVERS", direct.as_str())];
    let direct_processor = s.start_with("1", "info", &direct_env);
    wait_until("both instances own partitions", Duration::from_secs(120), || {
        direct_processor.log_text().contains("partition assigned")
    });
    let answers = fault("blackhole", "timeout", json!({"timeout": 0}), Duration::from_secs(15), &mut figures);
    assert!(
        !answers.is_empty() && answers.iter().all(|a| a.0 == 503 && a.1),
        "while Kafka is unreachable the node answers 503 with Retry-After: {answers:?}"
    );
    // Within serving.produce_timeout (5 s), however long the network swallows packets.
    assert!(answers.iter().all(|a| a.2 < 6.5), "a 503 must not wait past the produce timeout: {answers:?}");
    let healed = Instant::now();
    wait_until("the node answers 200 again", Duration::from_secs(60), || rank(node.addr, 0).0 == 200);
    figures.push(format!(
        "node answering 200 again {:.1} s after the black hole",
        healed.elapsed().as_secs_f64()
    ));

    producer.join().expect("producer thread").expect("produced");
    s.wait_caught_up(Duration::from_secs(300));
    let cut_off = proxied_processor.log_text();
    assert!(
        cut_off.contains("session state is no longer stored safely") || cut_off.contains("kind=\"revoke\""),
        "the instance cut off gave its partitions up:\n{cut_off}"
    );
    for f in &figures {
        eprintln!("network faults: {f}");
    }
    s.assert_totals_match_truth(&shop.events);
}
