#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
#
# Builds go to a target directory outside the checkout (override with CARGO_TARGET_DIR), so a
# fresh clone on a machine that built before reuses the compiled dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/banditflow/target}"
export CARGO_TERM_COLOR=never
# Two cores: one build at a time, two test threads.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --all-targets --locked -- -D warnings

step "tests"
cargo test --locked -- --test-threads=2
