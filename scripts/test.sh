#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script): format, lint, and
# every test — the broker tests against a real Apache Kafka broker that this script starts on
# 127.0.0.1 (scripts/kafka.sh fetches it from Maven Central once and caches it) and stops.
#
# It also checks everything under deploy/ (scripts/deploy-check.sh installs prometheus and
# promtool from Debian's packages and the validators from PyPI when missing).
#
# Builds go to a target directory outside the checkout (override with CARGO_TARGET_DIR), so a
# fresh clone on a machine that built before reuses the compiled dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/target}"
export CARGO_TERM_COLOR=never
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
# Informational only: sed reads its whole input, so no writer dies of SIGPIPE under pipefail.
cargo --version
rustc --version
java -version 2>&1 | sed -n 1p || true
mvn -B -version 2>/dev/null | sed -n '1{s/\x1b\[[0-9;]*m//g;p}' || true

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --all-targets --locked -- -D warnings

step "build"
cargo test --locked --no-run

step "deploy/ (promtool rules and unit tests, Kubernetes manifests, dashboard schema, a real Prometheus answering every panel)"
# Installs prometheus/promtool (Debian) and the Python validators (PyPI) when missing; the
# broker tests below use the same prometheus and promtool on real processes.
scripts/deploy-check.sh

step "off-policy evaluation cross-check tools (obp 0.5.7 and its dependencies from PyPI, once)"
python3 scripts/ope_crosscheck.py --install

step "kafka broker"
started=0
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start --fresh >/dev/null
  started=1
fi
cleanup() { if [ "$started" = 1 ]; then scripts/kafka.sh stop || true; fi; }
trap cleanup EXIT
BANDITFLOW_KAFKA_BOOTSTRAP="$(scripts/kafka.sh bootstrap)"
export BANDITFLOW_KAFKA_BOOTSTRAP
echo "broker at $BANDITFLOW_KAFKA_BOOTSTRAP"

step "tests"
cargo test --locked -- --test-threads=2
