#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer, nightly Rust) of everything that decodes
# outside data: events (protobuf, JSON) through the whole record path, snapshots and
# checkpoints, snapshot-topic records and chunk reassembly, recording lines.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 600 s each, every target
#
# Installs the nightly toolchain and cargo-fuzz when missing, seeds empty corpora from the
# fixtures (fuzz/seed.rs), runs each target for SECONDS on one core, prints executions and
# findings per target, then minimises the corpus (fuzz/corpus/<target>, committed: the test
# suite replays it in tests/it/fuzz_corpus.rs). A crash leaves its input in
# fuzz/artifacts/<target>/ and makes this script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(event snapshot blob recording)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/fuzz-target}"
for t in "${targets[@]}"; do
  if [ -z "$(ls -A "fuzz/corpus/$t" 2>/dev/null)" ]; then
    cargo +nightly run --release --manifest-path fuzz/Cargo.toml --bin seed -- "$PWD/fuzz"
    break
  fi
done

status=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="$(mktemp)"
  echo "== fuzzing $t for ${seconds}s"
  if cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>"$log"; then
    result="no findings"
  else
    result="FINDING (see fuzz/artifacts/$t and $log)"
    status=1
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
  summary+=("$t: ${execs:-?} executions in ${seconds}s, ${cov:-cov: ?}, $result")
  # Keep the corpus small enough to commit and replay quickly.
  cargo +nightly fuzz cmin --fuzz-dir fuzz "$t" "fuzz/corpus/$t" >/dev/null 2>&1 || true
done
printf '\n== summary\n'
printf '%s\n' "${summary[@]}"
exit "$status"
