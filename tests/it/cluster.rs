//! A real three-broker cluster (`scripts/kafka.sh cluster-start`: KRaft, every node broker and
//! controller, replication factor 3 and `min.insync.replicas=2` for every topic, the
//! transaction state log included). Under steady traffic the test SIGKILLs, one after another,
//! the leader of the snapshot topic's partition 0, the processor's transaction coordinator and
//! the active controller, bringing each node back before the next. Asserted: the learned
//! totals equal the generator's truth (nothing lost or doubled) and processing resumes after
//! each kill; the times to resume are printed (BENCHMARKS.md, "A three-broker cluster").
//! `scripts/cluster-chaos.sh` runs it (`BANDITFLOW_CLUSTER_ROUNDS` rounds of the three
//! kills, with traffic for all of them). It is not in the default suite yet: under the whole
//! suite's load on two cores it timed out after the controller kill in 2 of 4 runs, with the
//! processor restored, ready and silent. The likely cause is the test's own: on a loaded
//! machine the traffic had ended and was all committed before the last kill, so nothing was
//! left to commit. The wait now accepts "caught up after the traffic ended"; the test goes back
//! into the suite once it has passed under load.

use std::process::Command;
use std::time::{Duration, Instant};

use banditflow::generate::ShopSpec;

use crate::kafka::{wait_until, Setup};

fn kafka_sh(args: &[&str]) -> String {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out =
        Command::new("bash").arg(root.join("scripts/kafka.sh")).args(args).output().expect("kafka.sh runs");
    assert!(
        out.status.success(),
        "kafka.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stops the cluster when the test ends, however it ends.
struct Cluster(String);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = kafka_sh(&["cluster-stop"]);
    }
}

/// (active controller, transaction coordinator of `txn`, leader of partition 0 of `topic`).
fn roles(txn: &str, topic: &str) -> (String, String, String) {
    let line = kafka_sh(&["cluster-roles", txn, topic]);
    let field = |name: &str| -> String {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    let leader =
        field("leaders").split(',').next().and_then(|p| p.split_once(':')).map(|(_, id)| id.to_string());
    (field("controller"), field("coordinator"), leader.unwrap_or_default())
}

#[test]
#[ignore = "run by scripts/cluster-chaos.sh until it has passed under the whole suite's load (it timed out after the controller kill in 2 of 4 loaded runs; see the module doc)"]
fn killing_the_leader_the_coordinator_and_the_controller_loses_nothing() {
    let cluster = Cluster(kafka_sh(&["cluster-start"]));
    let b = cluster.0.clone();
    let s = Setup::replicated("cluster", &b, 3, 3);
    let env = [("BANDITFLOW__KAFKA__REPLICATION_FACTOR", "3")];
    let txn = format!("{}-0", s.config().kafka.group_id);
    let rounds: usize =
        std::env::var("BANDITFLOW_CLUSTER_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let rate = 1500.0;
    let shop = s.shop_with(ShopSpec {
        seed: 93,
        impressions: 50_000 * rounds,
        malformed_share: 0.001,
        ..ShopSpec::default()
    });
    let producer = s.produce_paced(shop.records.clone(), rate);
    let _processor = s.start_with("0", "info", &env);
    wait_until("a first commit", Duration::from_secs(120), || s.committed_total() > 0);

    let mut figures = Vec::new();
    let kills = ["snapshot partition leader", "transaction coordinator", "active controller"];
    for role in kills.iter().cycle().take(3 * rounds) {
        let (controller, coordinator, leader) = roles(&txn, &s.snapshots);
        let node = match *role {
            "snapshot partition leader" => leader,
            "transaction coordinator" => coordinator,
            _ => controller,
        };
        let at = s.committed_total();
        kafka_sh(&["cluster-kill", &node]);
        let killed = Instant::now();
        // Progress, or, once the traffic has ended, everything committed (a slow machine may
        // have produced and processed all of it before this kill: nothing is left to resume).
        let ends = || s.end_offsets();
        wait_until(&format!("progress after killing the {role}"), Duration::from_secs(180), || {
            s.committed_total() > at || (producer.is_finished() && s.committed_offsets() == ends())
        });
        let traffic = if producer.is_finished() { " (traffic had ended)" } else { "" };
        let resumed = killed.elapsed().as_secs_f64();
        kafka_sh(&["cluster-node", &node]);
        figures.push(format!("{role} (node {node}) killed: committing again after {resumed:.1} s{traffic}"));
    }
    producer.join().expect("producer thread").expect("produced");
    s.wait_caught_up(Duration::from_secs(300));
    for f in &figures {
        eprintln!("cluster: {f}");
    }
    s.assert_totals_match_truth(&shop.events);
}
