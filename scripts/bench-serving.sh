#!/usr/bin/env bash
# HTTP load on a ranking node, with impression logging on: wrk (Debian's package, installed when
# missing) on 127.0.0.1 against `banditflow serve` on the development broker, beside a same-run
# baseline (GET /healthz on the same node: the HTTP stack alone). For each case: requests/s,
# latency percentiles (wrk --latency), the CPU time per request of the node and of the broker
# (from /proc/<pid>/stat), and how busy the machine's cores were (from /proc/stat).
#
#   scripts/bench-serving.sh [SECONDS_PER_CASE] [CONNECTIONS]
#
# Greedy and UCB are then run again at half the peak rate wrk found, at a fixed rate (Vegeta,
# installed from the Go module proxy into the cache when missing; at most CONNECTIONS requests
# in flight, so a node that falls behind shows as an achieved rate below the target), for the
# latency at a load the node can carry. With
# BENCH_BASELINE_BIN=<banditflow binary> the health and Thompson cases also run on that binary,
# in the same run, against the same broker.
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
vegeta_version=v12.13.0
vegeta="$HOME/.cache/banditflow/vegeta-$vegeta_version/bin/vegeta"
if [ ! -x "$vegeta" ]; then
  echo "installing Vegeta $vegeta_version from the Go module proxy" >&2
  base=$(dirname "$(dirname "$vegeta")")
  mkdir -p "$base/bin"
  GOBIN="$base/bin" GOPATH="$base/gopath" GOFLAGS=-modcacherw \
    go install "github.com/tsenart/vegeta/v12@$vegeta_version" >&2
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
[kafka.properties]
# librdkafka's statistics: the rate cases split Kafka's acknowledgement into the producer's
# queue (linger included) and the broker's round trip.
"statistics.interval.ms" = "5000"
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

start_node() { # strategy [binary]; the node's log goes to $work/node.log
  BANDITFLOW__POLICY__STRATEGY=$1 BANDITFLOW_LOG=warn,rdkafka::client=info "${2:-$bin}" serve \
    --config "$work/config.toml" > "$work/node.log" 2>&1 &
  node=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:18080/readyz > /dev/null && break; sleep 0.1; done
}

cpu_report() { # node-ticks-before node-ticks-after broker-before broker-after machine-before machine-after requests
  python3 -c "
n = max($7, 1)
busy = ($(echo "$6" | cut -d' ' -f1) - $(echo "$5" | cut -d' ' -f1)) / max($(echo "$6" | cut -d' ' -f2) - $(echo "$5" | cut -d' ' -f2), 1)
print(f'node {($2 - $1) / 100 / n * 1e6:4.0f} µs/req  broker {($4 - $3) / 100 / n * 1e6:4.0f} µs/req  cores busy {busy * 100:3.0f} %')"
}

run_case() { # name strategy method path body [binary]; sets rps
  local name=$1 strategy=$2 method=$3 path=$4 body=$5
  start_node "$strategy" "${6:-}"
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
  local p50 p90 p99 errors total
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/out.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/out.txt")
  p90=$(awk '$1 == "90%" {print $2}' "$work/out.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/out.txt")
  total=$(awk '/requests in/ {print $1}' "$work/out.txt")
  errors=$(awk '/Non-2xx/ {print $5}' "$work/out.txt")
  local cpu
  cpu=$(cpu_report "$t0" "$t1" "$b0" "$b1" "$m0" "$m1" "$total")
  printf '%-44s %9s req/s  p50 %8s  p90 %8s  p99 %8s  %s  non-2xx %s\n' \
    "$name" "$rps" "$p50" "$p90" "$p99" "$cpu" "${errors:-0}"
}

buckets() { # the node's latency histograms' buckets, from /metrics
  curl -sf 127.0.0.1:18080/metrics | grep -E '^banditflow_serving_(request|kafka_ack)_seconds_bucket' || true
}

split_report() { # before-file after-file: where the requests' time went, from the node's histograms
  python3 - "$1" "$2" << 'PY'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        m = re.match(r'(\w+)_bucket\{(.*)\} (\S+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("endpoint", "rank") != "rank":  # the acknowledgements: every topic (impressions)
            continue
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        out[(m.group(1), le)] = out.get((m.group(1), le), 0.0) + float(m.group(3))
    return out
a, b = read(sys.argv[1]), read(sys.argv[2])
def share_over(name, bound):
    total = b.get((name, float("inf")), 0) - a.get((name, float("inf")), 0)
    under = b.get((name, bound), 0) - a.get((name, bound), 0)
    return 100.0 * (total - under) / max(total, 1)
def quantile(name, q):  # as Prometheus's histogram_quantile: linear within the bucket
    les = sorted(le for (n, le) in b if n == name)
    counts = [b[(name, le)] - a.get((name, le), 0) for le in les]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank, prev_le, prev = q * counts[-1], 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            return prev_le if le == float("inf") else prev_le + (le - prev_le) * (rank - prev) / max(c - prev, 1)
        prev_le, prev = le, c
    return float("nan")
r, k = "banditflow_serving_request_seconds", "banditflow_serving_kafka_ack_seconds"
print(f"  node's histograms: request p99 {1e3 * quantile(r, 0.99):.1f} ms, Kafka ack p99 {1e3 * quantile(k, 0.99):.1f} ms;"
      f" over 5 ms: {share_over(r, 0.005):.2f} % of requests, {share_over(k, 0.005):.2f} % of Kafka acks")
PY
}

rate_case() { # name strategy body rate: POST /v1/rank at a fixed rate (open model)
  local name=$1 strategy=$2 body=$3 rate=$4
  start_node "$strategy"
  printf '%s' "$body" > "$work/body.json"
  local target="POST http://127.0.0.1:18080/v1/rank"
  # At most as many connections and workers as wrk had: a fixed rate, not a growing crowd.
  local attack=(attack -body="$work/body.json" -header="Content-Type: application/json"
    -workers="$conns" -max-workers="$conns" -connections="$conns")
  echo "$target" | "$vegeta" "${attack[@]}" -rate="$rate/s" -duration=2s > /dev/null # warm-up
  buckets > "$work/before.txt"
  local t0 b0 m0 t1 b1 m1
  t0=$(cpu_ticks $node)
  b0=$(cpu_ticks "$broker")
  m0=$(machine_ticks)
  echo "$target" | "$vegeta" "${attack[@]}" -rate="$rate/s" -duration="${secs}s" \
    | "$vegeta" report -type=json > "$work/vegeta.json"
  t1=$(cpu_ticks $node)
  b1=$(cpu_ticks "$broker")
  m1=$(machine_ticks)
  buckets > "$work/after.txt"
  kill $node
  wait $node || true
  local summary total
  summary=$(python3 -c "
import json
r = json.load(open('$work/vegeta.json'))
l = r['latencies']
ms = lambda ns: f'{ns / 1e6:.2f}ms'
print(f\"{r['rate']:9.0f} req/s  p50 {ms(l['50th']):>8}  p90 {ms(l['90th']):>8}  p99 {ms(l['99th']):>8}\", end='  ')
print(r['requests'], 'success', f\"{100 * r['success']:.2f} %\", file=open('$work/vegeta.txt', 'w'))")
  total=$(cut -d' ' -f1 "$work/vegeta.txt")
  printf '%-44s %s%s  %s\n' "$name" "$summary" "$(cpu_report "$t0" "$t1" "$b0" "$b1" "$m0" "$m1" "$total")" \
    "$(cut -d' ' -f2- "$work/vegeta.txt")"
  split_report "$work/before.txt" "$work/after.txt"
  python3 - "$work/node.log" << 'PY'
import re, statistics, sys
# librdkafka's statistics of the node's producer (one window every 5 s; the last ones are the
# measured run): p99 of the time a record waits in the producer's queue (int_latency, µs,
# linger included) and of the broker's round trip for a produce request (rtt, µs).
lines = [l for l in open(sys.argv[1]) if "Client stats" in l and 'client_type: "producer"' in l]
def p99s(field):  # per window, of the broker connection that carried the most requests
    pattern = field + r': Some\(Window \{[^}]*?cnt: (\d+)[^}]*?p99: (\d+)'
    return [max((int(c), int(p)) for c, p in re.findall(pattern, l))[1] for l in lines if re.search(pattern, l)]
queue, rtt = p99s("int_latency")[-2:], p99s("rtt")[-2:]
if queue and rtt:
    print(f"  librdkafka: producer queue p99 {statistics.mean(queue) / 1e3:.1f} ms, broker round trip p99 {statistics.mean(rtt) / 1e3:.1f} ms (last two 5 s windows)")
PY
}

c20=$(candidates 20)
c100=$(candidates 100)
echo "wrk: 1 thread, $conns connections, ${secs} s per case; node: banditflow serve (release), broker $bootstrap"
body100="{\"model\": \"home\", \"segment\": \"women\", \"slate_size\": 10, \"candidates\": $c100}"
body20="{\"model\": \"home\", \"segment\": \"women\", \"slate_size\": 10, \"candidates\": $c20}"
ratio() { python3 -c "print(f'{float(\"$1\") / float(\"$2\"):.3f}')"; }
half() { python3 -c "print(max(1, int(float(\"$1\") / 2)))"; }
run_case "baseline: GET /healthz" thompson GET /healthz ""
health=$rps
run_case "rank greedy, 100 candidates -> 10" greedy POST /v1/rank "$body100"
greedy=$rps
run_case "rank UCB, 100 candidates -> 10" ucb POST /v1/rank "$body100"
ucb=$rps
run_case "rank Thompson, 20 candidates -> 10" thompson POST /v1/rank "$body20"
t20=$rps
run_case "rank Thompson, 100 candidates -> 10" thompson POST /v1/rank "$body100"
t100=$rps
rate_case "greedy, 100 -> 10, at half its peak" greedy "$body100" "$(half "$greedy")"
rate_case "UCB, 100 -> 10, at half its peak" ucb "$body100" "$(half "$ucb")"
echo "Thompson / GET /healthz: 20 candidates $(ratio "$t20" "$health"), 100 candidates $(ratio "$t100" "$health")"
if [ -n "${BENCH_BASELINE_BIN:-}" ]; then
  run_case "baseline binary: GET /healthz" thompson GET /healthz "" "$BENCH_BASELINE_BIN"
  health=$rps
  run_case "baseline binary: Thompson, 20 -> 10" thompson POST /v1/rank "$body20" "$BENCH_BASELINE_BIN"
  t20=$rps
  run_case "baseline binary: Thompson, 100 -> 10" thompson POST /v1/rank "$body100" "$BENCH_BASELINE_BIN"
  t100=$rps
  echo "baseline binary, Thompson / GET /healthz: 20 candidates $(ratio "$t20" "$health"), 100 candidates $(ratio "$t100" "$health")"
fi
