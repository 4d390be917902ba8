#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs Cohort's whole test suite: formatting, lints, unit
# and property tests, the collective conformance suite, and the multi-process cluster tests.
# Usage: bash scripts/test.sh          (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "test: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi

step() { printf '\n== %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy with --features cuda (builds without CUDA installed)"
cargo clippy --locked -p cohort-worker -p cohort-cli --features cohort-cli/cuda --all-targets -- -D warnings

step "build the cohort executable the cluster tests run"
cargo build --locked -p cohort-cli

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo nextest run --locked -p cohort-worker --features cuda --no-fail-fast
else
  echo "test: cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --locked --no-fail-fast
  cargo test --locked -p cohort-worker --features cuda --no-fail-fast
fi
