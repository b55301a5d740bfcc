#!/usr/bin/env bash
# The learning benchmark, end to end (figures and plots in BENCHMARKS.md, "Learning against
# Vowpal Wabbit and MABWiser"):
#   1. banditflow's policies on the simulated shops (cargo bench --bench learning; writes the
#      shop and banditflow's curves into $BENCH_OUT);
#   2. the Python peers on the same simulator, installed from PyPI into their own venv
#      (scripts/learning_bench.py; prints the table on the common prefix);
#   3. the PNG curves into docs/learning/ (cargo bench --bench plots).
# Environment: BENCH_IMPRESSIONS (1,000,000) and BENCH_SEEDS (10) for banditflow,
# PEER_IMPRESSIONS (200,000) and PEER_SEEDS (3) for the peers (a slow peer runs a common
# prefix), BENCH_OUT (target/learning). Takes about 45 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/target}"
export BENCH_OUT="${BENCH_OUT:-target/learning}"
mkdir -p "$BENCH_OUT"
# The two halves run side by side, one core each.
cargo bench --bench learning --no-run
python3 scripts/learning_bench.py --install
BENCH_ONLY_EXPORT=1 cargo bench --bench learning
python3 scripts/learning_bench.py --dir "$BENCH_OUT" --impressions "${PEER_IMPRESSIONS:-200000}" \
  --seeds "${PEER_SEEDS:-3}" --no-report &
peers=$!
cargo bench --bench learning
wait "$peers"
python3 scripts/learning_bench.py --dir "$BENCH_OUT" --impressions "${PEER_IMPRESSIONS:-200000}" \
  --seeds "${PEER_SEEDS:-3}"
cargo bench --bench plots
