//! The telemetry catalogue (`src/telemetry/mod.rs`) is the one place metric families are
//! declared. These tests hold it to Prometheus' naming rules, to the README's table, and to
//! the contract `deploy/` (rules, dashboard) is written against; and they hold the rest of
//! the crate to emitting telemetry only through it.

use std::collections::BTreeMap;
use std::path::Path;

use banditflow::telemetry::{Component, Kind, CATALOG};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Label names that would carry ids from the data (unbounded cardinality).
const ID_LABELS: &[&str] =
    &["impression", "impression_id", "item", "item_id", "user", "user_key", "segment", "key", "id"];

#[test]
fn every_family_follows_the_prometheus_naming_rules() {
    let mut seen = std::collections::BTreeSet::new();
    for m in CATALOG {
        assert!(seen.insert(m.name), "{} declared twice", m.name);
        assert!(m.name.starts_with("banditflow_"), "{}: the prefix is banditflow_", m.name);
        assert!(
            m.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{}: snake case",
            m.name
        );
        assert!(m.help.len() > 20 && m.help.ends_with('.'), "{}: help text is a sentence", m.name);
        match m.kind {
            Kind::Counter => assert!(m.name.ends_with("_total"), "{}: counters end in _total", m.name),
            Kind::Gauge => assert!(!m.name.ends_with("_total"), "{}: only counters end in _total", m.name),
            Kind::Histogram(buckets) => {
                assert!(m.name.ends_with("_seconds"), "{}: histograms here are durations in seconds", m.name);
                assert!(buckets.len() >= 8, "{}: explicit buckets", m.name);
                assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{}: buckets ascend", m.name);
            }
        }
        for unit in ["_ms", "_milliseconds", "_kb", "_kbytes", "_percent"] {
            assert!(!m.name.contains(unit), "{}: base units only (seconds, bytes, ratios)", m.name);
        }
        for l in m.labels {
            assert!(!ID_LABELS.contains(l), "{}: label `{l}` would carry ids from the data", m.name);
            assert!(*l != "le" && *l != "quantile", "{}: reserved label `{l}`", m.name);
        }
        let serving = m.name.starts_with("banditflow_serving_");
        match m.component {
            Component::Serving => {
                assert!(serving, "{}: serving families are named banditflow_serving_", m.name)
            }
            Component::Processor => assert!(!serving, "{}", m.name),
            Component::Aggregator => {
                assert!(
                    m.name.starts_with("banditflow_aggregate_"),
                    "{}: aggregator families are named banditflow_aggregate_",
                    m.name
                )
            }
            Component::Both => {}
        }
    }
}

/// The README's metrics table as it must read, one row per family.
fn readme_table() -> String {
    let mut t = String::from("| metric | type | labels | exported by | meaning |\n|---|---|---|---|---|\n");
    for m in CATALOG {
        let labels = if m.labels.is_empty() { "–".to_string() } else { m.labels.join(", ") };
        t.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.name(),
            labels,
            m.component.name(),
            m.help
        ));
    }
    t
}

#[test]
fn the_readme_lists_every_metric_family_as_declared() {
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let (start, end) = ("<!-- metrics:start -->\n", "<!-- metrics:end -->");
    let a = readme.find(start).expect("README has a metrics table between markers") + start.len();
    let b = readme[a..].find(end).expect("end marker") + a;
    let want = readme_table();
    if readme[a..b] != want && std::env::var_os("BANDITFLOW_BLESS").is_some() {
        std::fs::write(&path, format!("{}{want}{}", &readme[..a], &readme[b..])).expect("write README.md");
        return;
    }
    assert_eq!(
        readme[a..b],
        want,
        "README's metrics table differs from src/telemetry (BANDITFLOW_BLESS=1 rewrites it)"
    );
}

#[test]
fn the_deploy_contract_names_exactly_the_declared_families_and_labels() {
    // deploy/check/metrics.py is what the rules, tests and dashboard are checked against.
    let script = "import json, sys; sys.path.insert(0, 'deploy/check'); import metrics as m; \
                  print(json.dumps({**{k: [v[0], list(v[1])] for k, v in m.PROCESSOR.items()}, \
                  **{k: [v[0], list(v[1])] for k, v in m.SERVING.items()}}))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .current_dir(root())
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: BTreeMap<String, (String, Vec<String>)> = serde_json::from_slice(&out.stdout).expect("json");
    let listed: BTreeMap<String, (String, Vec<String>)> =
        listed.into_iter().filter(|(k, _)| k.starts_with("banditflow_")).collect();
    let declared: BTreeMap<String, (String, Vec<String>)> = CATALOG
        .iter()
        .map(|m| {
            (
                m.name.to_string(),
                (m.kind.name().to_string(), m.labels.iter().map(|l| l.to_string()).collect()),
            )
        })
        .collect();
    assert_eq!(listed, declared, "deploy/check/metrics.py and src/telemetry disagree");
}

#[test]
fn only_the_telemetry_module_emits_metrics() {
    let mut problems = Vec::new();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if !path.ends_with("telemetry") {
                    stack.push(path);
                }
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for needle in ["counter!(", "gauge!(", "histogram!(", "describe_counter!", "metrics::"] {
                    if code.contains(needle) {
                        problems.push(format!(
                            "{}:{}: `{needle}` outside src/telemetry",
                            path.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "telemetry goes through src/telemetry events:\n{}", problems.join("\n"));
}
