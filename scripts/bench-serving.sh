#!/usr/bin/env bash
# HTTP load on a ranking node, with impression logging on: wrk (Debian's package, installed when
# missing) on 127.0.0.1 against `banditflow serve` on the development broker, beside a same-run
# baseline (GET /healthz on the same node: the HTTP stack alone). For each case: requests/s,
# latency percentiles (wrk --latency), the CPU time per request of the node and of the broker
# (from /proc/<pid>/stat), and how busy the machine's cores were (from /proc/stat).
#
#   scripts/bench-serving.sh [SECONDS_PER_CASE] [CONNECTIONS]
#
# The node ranks by the configured prior (serving.cold_start): every candidate is unseen, so the
# Thompson cases draw the most Monte Carlo rankings a request can need (the worst case).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
conns=${2:-32}
if ! command -v wrk > /dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) > /dev/null
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/target}
cargo build --release --locked --quiet
bin=$CARGO_TARGET_DIR/release/banditflow
bootstrap=$(scripts/kafka.sh start | tail -1)
broker=$(scripts/kafka.sh status | sed -n 's/.*pid \([0-9]*\).*/\1/p')
work=$(mktemp -d)
trap 'kill $node 2> /dev/null || true; rm -rf "$work"' EXIT
topic=bench-serving-$(date +%s)
"$bin" create-topics --bootstrap "$bootstrap" --partitions 4 "$topic" > /dev/null
cat > "$work/config.toml" << EOF
[input]
topics = [{ name = "$topic", role = "combined", encoding = "protobuf" }]
[kafka]
bootstrap_servers = "$bootstrap"
snapshot_topic = "$topic-snapshots"
[serving]
listen = "127.0.0.1:18080"
cold_start = true
EOF

candidates() { # n → JSON list of n item ids
  python3 -c "import json,sys; print(json.dumps(['sku-%04d' % i for i in range(int(sys.argv[1]))]))" "$1"
}

cpu_ticks() { # utime + stime of a pid, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

machine_ticks() { # busy and total clock ticks of all cores
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat
}

run_case() { # name strategy method path body
  local name=$1 strategy=$2 method=$3 path=$4 body=$5
  BANDITFLOW__POLICY__STRATEGY=$strategy BANDITFLOW_LOG=warn "$bin" serve --config "$work/config.toml" &
  node=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:18080/readyz > /dev/null && break; sleep 0.1; done
  cat > "$work/req.lua" << EOF
wrk.method = "$method"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$body'
EOF
  wrk -t1 -c"$conns" -d2s -s "$work/req.lua" "http://127.0.0.1:18080$path" > /dev/null # warm-up
  local t0 b0 m0 t1 b1 m1
  t0=$(cpu_ticks $node)
  b0=$(cpu_ticks "$broker")
  m0=$(machine_ticks)
  wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$work/req.lua" "http://127.0.0.1:18080$path" > "$work/out.txt"
  t1=$(cpu_ticks $node)
  b1=$(cpu_ticks "$broker")
  m1=$(machine_ticks)
  kill $node
  wait $node || true
  local rps p50 p90 p99 errors total
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/out.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/out.txt")
  p90=$(awk '$1 == "90%" {print $2}' "$work/out.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/out.txt")
  total=$(awk '/requests in/ {print $1}' "$work/out.txt")
  errors=$(awk '/Non-2xx/ {print $5}' "$work/out.txt")
  local cpu
  cpu=$(python3 -c "
n = max($total, 1)
busy = ($(echo $m1 | cut -d' ' -f1) - $(echo $m0 | cut -d' ' -f1)) / max($(echo $m1 | cut -d' ' -f2) - $(echo $m0 | cut -d' ' -f2), 1)
print(f'node {($t1 - $t0) / 100 / n * 1e6:4.0f} µs/req  broker {($b1 - $b0) / 100 / n * 1e6:4.0f} µs/req  cores busy {busy * 100:3.0f} %')")
  printf '%-40s %9s req/s  p50 %8s  p90 %8s  p99 %8s  %s  non-2xx %s\n' \
    "$name" "$rps" "$p50" "$p90" "$p99" "$cpu" "${errors:-0}"
}

c20=$(candidates 20)
c100=$(candidates 100)
echo "wrk: 1 thread, $conns connections, ${secs} s per case; node: banditflow serve (release), broker $bootstrap"
run_case "baseline: GET /healthz" thompson GET /healthz ""
run_case "rank greedy, 100 candidates -> 10" greedy POST /v1/rank \
  "{\"model\": \"home\", \"segment\": \"women\", \"slate_size\": 10, \"candidates\": $c100}"
run_case "rank UCB, 100 candidates -> 10" ucb POST /v1/rank \
  "{\"model\": \"home\", \"segment\": \"women\", \"slate_size\": 10, \"candidates\": $c100}"
run_case "rank Thompson, 20 candidates -> 10" thompson POST /v1/rank \
  "{\"model\": \"home\", \"segment\": \"women\", \"slate_size\": 10, \"candidates\": $c20}"
run_case "rank Thompson, 100 candidates -> 10" thompson POST /v1/rank \
  "{\"model\": \"home\", \"segment\": \"women\", \"slate_size\": 10, \"candidates\": $c100}"
