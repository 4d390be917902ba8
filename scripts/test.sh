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

step "cargo clippy --features cuda (NCCL and the driver are loaded at run time: no CUDA needed)"
cargo clippy --workspace --all-targets --locked --features cohort-cli/cuda -- -D warnings

step "cargo clippy --features candle-cuda (type-checks GPU training; nvcc from PyPI, no GPU)"
toolkit="$(bash scripts/cuda-toolkit.sh)"
PATH="$toolkit/bin:$PATH" CUDA_HOME="$toolkit" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
  cargo clippy --locked -p cohort-trainer -p cohort-cli --features cohort-cli/candle-cuda \
  --all-targets -- -D warnings

step "build the cohort executable the cluster tests run"
cargo build --locked -p cohort-cli

step "tests"
# Then again with the cuda feature, on a machine without a GPU: the typed errors, the inventory,
# and the GPU tests' skip paths (the conformance suite against NCCL runs where a GPU is present).
cuda_packages=(-p cohort-worker -p cohort-collective -p cohort-trainer)
cuda_features=cohort-worker/cuda,cohort-collective/cuda,cohort-trainer/cuda
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  # The trainer's CPU paths are the same code with or without the feature: only its device and
  # GPU tests run twice.
  cargo nextest run --locked --no-fail-fast "${cuda_packages[@]}" --features "$cuda_features" \
    -E 'not package(cohort-trainer) or test(/gpu|cuda|device/)'
else
  echo "test: cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --locked --no-fail-fast
  cargo test --locked --no-fail-fast "${cuda_packages[@]}" --features "$cuda_features"
fi

step "the --features cuda binary starts without CUDA and says why it cannot use a GPU"
cargo build --locked -p cohort-cli --features cuda
if output=$(target/debug/cohort bench allreduce --backend nccl --sizes 4K 2>&1); then
  echo "$output"   # a machine with GPUs: the benchmark ran
else
  case "$output" in
    *"no CUDA driver found"* | *"no NCCL library found"* | *"no CUDA device found"*)
      echo "ok: $output" ;;
    *)
      echo "test: unexpected failure of the cuda build: $output" >&2
      exit 1 ;;
  esac
fi
