#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs Cohort's main job: a local cluster (a coordinator
# and 4 worker processes) training a 784-512-256-10 MLP on Fashion-MNIST with 4 data-parallel
# ranks, showing progress and the final test accuracy. Checkpoints go to cohort-output/.
# Usage: bash scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked -p cohort-cli
data_dir=$(mktemp -d -t cohort-run-XXXXXX)
trap 'rm -rf "$data_dir"' EXIT
./target/release/cohort up --workers 4 --cpu-slots 1 --listen 127.0.0.1:0 --data-dir "$data_dir" \
  --run examples/fashion-mlp-dp.toml
