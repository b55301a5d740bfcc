//! A real three-broker cluster (`scripts/kafka.sh cluster-start`: KRaft, every node broker and
//! controller, replication factor 3 and `min.insync.replicas=2` for every topic, the
//! transaction state log included). Under steady traffic the test SIGKILLs, one after another,
//! the leader of the snapshot topic's partition 0, the processor's transaction coordinator and
//! the active controller, bringing each node back before the next. Asserted: the learned
//! totals equal the generator's truth (nothing lost or doubled) and processing resumes after
//! each kill; the times to resume are printed (BENCHMARKS.md, "A three-broker cluster").
//! The traffic is sized by time: its last records trickle out until every kill is done, and
//! each kill must see a commit while records are still arriving. The suite runs one round;
//! `scripts/cluster-chaos.sh` runs `BANDITFLOW_CLUSTER_ROUNDS` rounds of the three kills.

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
    // Sized by time, not by count: the last records trickle out (rate / 20) for up to 300 s per
    // round until every kill is done, so each kill happens under traffic however slow the
    // machine is.
    let hold = (rate / 20.0 * 300.0) as usize * rounds;
    assert!(shop.records.len() > 2 * hold, "{} records cannot hold back {hold}", shop.records.len());
    let traffic = s.traffic(shop.records.clone(), rate, hold);
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
        // Read before the kill (0 would be a failed read, which any later read would "beat").
        let mut at = 0;
        wait_until("the committed offsets", Duration::from_secs(60), || {
            at = s.committed_total();
            at > 0
        });
        kafka_sh(&["cluster-kill", &node]);
        let killed = Instant::now();
        wait_until(&format!("progress after killing the {role}"), Duration::from_secs(180), || {
            s.committed_total() > at
        });
        let resumed = killed.elapsed().as_secs_f64();
        // A commit after the kill proves a resume only if records were still arriving.
        let left = traffic.remaining();
        assert!(left > 0, "the traffic ran out before the {role} kill was resumed from; hold back more");
        kafka_sh(&["cluster-node", &node]);
        figures.push(format!("{role} (node {node}) killed: committing again after {resumed:.1} s ({left} records still to send)"));
    }
    traffic.finish().expect("produced");
    s.wait_caught_up(Duration::from_secs(300));
    for f in &figures {
        eprintln!("cluster: {f}");
    }
    s.assert_totals_match_truth(&shop.events);
}
