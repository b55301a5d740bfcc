#!/usr/bin/env bash
# The long version of the cluster test (tests/it/cluster.rs): a three-node KRaft cluster
# (scripts/kafka.sh cluster-start) under steady traffic; ROUNDS times, SIGKILL the snapshot
# topic's partition leader, then the transaction coordinator, then the active controller, each
# brought back before the next; the learned totals must equal the generator's truth. Prints the
# time to resume after each kill (BENCHMARKS.md, "A three-broker cluster").
#
#   scripts/cluster-chaos.sh            # 5 rounds (15 kills)
#   ROUNDS=10 scripts/cluster-chaos.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/target}"
BANDITFLOW_CLUSTER_ROUNDS="${ROUNDS:-5}" cargo test --test it cluster:: -- --nocapture 2>&1 \
  | grep -E "^cluster:|^test |panicked|test result"
