#!/usr/bin/env bash
# Soak: a processor and a serving node under steady traffic on the development broker, the
# processor SIGKILLed every few minutes (tests/it/soak.rs), then a plot of the samples.
#
#   scripts/soak.sh                      # 30 min at 600 events/s, a kill every 4 min, ~60 days of
#                                        # event time (SOAK_GAP_MS=10000 between impressions)
#   SOAK_SECONDS=3600 SOAK_RATE=1000 scripts/soak.sh
#
# Writes target/soak/samples.csv and docs/soak.svg; the figures go into BENCHMARKS.md ("Soak").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/target}"
out="$root/target/soak"
mkdir -p "$out"
BANDITFLOW_KAFKA_BOOTSTRAP="${BANDITFLOW_KAFKA_BOOTSTRAP:-$("$here/kafka.sh" start | tail -n 1)}"
export BANDITFLOW_KAFKA_BOOTSTRAP
# Build first, then run the test binary outside cargo (a build may run meanwhile).
bin="$(cargo test --test it --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "it" and m.get("executable"):
        print(m["executable"])' | tail -n 1)"
[ -x "$bin" ] || { echo "soak: could not build the test binary" >&2; exit 1; }
BANDITFLOW_SOAK_SECONDS="${SOAK_SECONDS:-1800}" \
BANDITFLOW_SOAK_KILL_EVERY="${SOAK_KILL_EVERY:-240}" \
BANDITFLOW_SOAK_RATE="${SOAK_RATE:-600}" \
BANDITFLOW_SOAK_GAP_MS="${SOAK_GAP_MS:-10000}" \
BANDITFLOW_SOAK_CSV="$out/samples.csv" \
  "$bin" soak:: --nocapture --test-threads=1 2>&1 | tee "$out/soak.log" | grep -E "^soak:|^test |panicked|test result"
python3 "$here/soak_plot.py" "$out/samples.csv" "$root/docs/soak.svg"
