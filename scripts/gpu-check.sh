#!/usr/bin/env bash
# The one-shot GPU check: builds Cohort with `--features candle-cuda` for this machine's GPU and
# runs every GPU check, in order, within a time budget (8 minutes by default, enough on one
# H100 or H200), writing one report with the device names and every figure. This script's
# step table is the list of GPU checks; README.md ("GPU nodes") and docs/benchmarks.md point
# here.
#
#   bash scripts/gpu-check.sh                  build, then run every check (the default)
#   bash scripts/gpu-check.sh build            build only: cohort and the GPU test binaries,
#                                              stripped, into .gpu-check/ with a manifest
#   bash scripts/gpu-check.sh run              run the checks with the binaries in .gpu-check/
#                                              (building first when they are absent and cargo
#                                              is here); needs no cargo and no nvcc
#   options: --report FILE (default gpu-check-report.txt)  --budget-s SECONDS (default 480)
#
# The build needs cargo, nvcc (from scripts/cuda-toolkit.sh, which prefers the machine's own
# toolkit) and the GPU's compute capability, read from nvidia-smi or given as CUDA_COMPUTE_CAP
# (90 for H100 and H200), which allows building on a machine without a GPU and carrying
# .gpu-check/ to one. `.gpu-check/data` holds the demos' data sets, found here at build time.
# COHORT_GPU_CHECK_DIR overrides where the binaries are kept.
#
# Every step prints a header line and ends with one line, `PASS step (N s)` or
# `FAIL step: reason`; a step whose prerequisites are missing (no driver, no GPU, no binary, a
# shared library the binary needs) fails at once naming them. Exit status 0 when every step
# passed, 1 otherwise, 2 for a usage error.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
check_dir="${COHORT_GPU_CHECK_DIR:-$repo/.gpu-check}"

# The GPU checks, in the order they run: name, function, longest time it may take (seconds; the
# remaining budget may cut it shorter), and what it shows.
readonly STEPS='
nccl-conformance  step_nccl_conformance 150 NCCL conformance: every Nccl test of the conformance suite (cohort-collective, cuda), one rank per GPU, at most 4
gpu-training      step_gpu_training     150 GPU training tests (cohort-trainer, candle-cuda, gpu_training): GPU runs follow the CPU runs within 1e-4 of the largest parameter
demo-fashion-mlp  step_demo_fashion_mlp 120 demo examples/fashion-mlp-gpu.toml on one GPU, bf16: test accuracy of at least 85 %
demo-shakespeare  step_demo_shakespeare 120 demo examples/shakespeare-transformer-gpu.toml on one GPU, bf16: the loss falls
bench-allreduce   step_bench_allreduce   60 cohort bench allreduce --backend nccl: busbw per size over every local GPU
bench-train       step_bench_train      120 cohort bench train --device gpu: MLP samples/s and transformer tokens/s, fp32 and bf16
'

usage() {
  cat >&2 <<'EOF'
usage: bash scripts/gpu-check.sh [all | build | run] [--report FILE] [--budget-s SECONDS]
  all (default)  build, then run every GPU check
  build          build cohort and the GPU test binaries into .gpu-check/ (needs cargo, nvcc)
  run            run the checks with the binaries in .gpu-check/
  --report FILE  where the report goes (default gpu-check-report.txt in the repository)
  --budget-s N   seconds all the checks may take together (default 480)
EOF
  exit 2
}

# ---------------------------------------------------------------------------------------------
# Shared state of the run and small helpers.

report_file="$repo/gpu-check-report.txt"
budget_s=480
gpu_count=0
gpu_missing=""     # what is missing for any GPU step, empty when a GPU is usable
work_dir=""        # scratch directory of this run (logs, demo clusters)
run_deadline=0     # $SECONDS value by which the run steps must end
step_name=""
step_log=""
step_reason=""     # why the current step failed, when it says
step_timeout=0
missing=()         # what the current step needs and lacks
passed=0
failed=0

# Appends a line to the report.
report() { printf '%s\n' "$*" >>"$report_file"; }

# Records one figure of the current step in the report.
figure() { printf '  %s\n' "$*" >>"$report_file"; }

# Shows a path under the repository relative to it, in messages.
shown() { local path="$1"; printf '%s' "${path#"$repo"/}"; }

# Joins the arguments with "; ".
join_items() {
  local joined="" item
  for item in "$@"; do joined="${joined:+$joined; }$item"; done
  printf '%s' "$joined"
}

# Reads the GPUs from nvidia-smi into gpu_count, or says in gpu_missing why there are none.
detect_gpus() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    gpu_missing="NVIDIA driver (nvidia-smi not found)"
    return
  fi
  local listing
  if ! listing="$(nvidia-smi -L 2>&1)"; then
    gpu_missing="a working NVIDIA driver (nvidia-smi -L failed: $(head -n 1 <<<"$listing"))"
    return
  fi
  gpu_count="$(grep -c '^GPU ' <<<"$listing" || true)"
  if [ "$gpu_count" -eq 0 ]; then
    gpu_missing="GPU (nvidia-smi lists no device)"
  fi
}

# The lowest compute capability of the GPUs as CUDA_COMPUTE_CAP wants it ("9.0" -> 90), or
# nothing.
gpu_compute_cap() {
  [ -z "$gpu_missing" ] || return 0
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
    tr -d '. ' | grep -E '^[0-9]+$' | sort -n | head -n 1 || true
}

# Prints the directory of a CUDA toolkit already on this machine or in scripts/cuda-toolkit.sh's
# cache, without installing one (that script's search, for reporting what is missing).
local_toolkit() {
  local root
  for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then echo "$root"; return 0; fi
  done
  if command -v nvcc >/dev/null 2>&1; then
    dirname "$(dirname "$(command -v nvcc)")"
    return 0
  fi
  local cached
  for cached in "${XDG_CACHE_HOME:-$HOME/.cache}"/cohort/cuda-*/nvidia/cu*; do
    if [ -x "$cached/bin/nvcc" ]; then echo "$cached"; return 0; fi
  done
  return 1
}

# Prepends the library directories of pip-installed NVIDIA packages (nvidia/*/lib: cuBLAS,
# cuRAND, NVRTC, NCCL on images that get them from PyPI) to LD_LIBRARY_PATH.
add_pip_library_path() {
  command -v python3 >/dev/null 2>&1 || return 0
  local directories
  directories="$(python3 - 2>/dev/null <<'EOF' || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
print(":".join(sorted(p for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "*", "lib")))))
EOF
)"
  if [ -n "$directories" ]; then
    export LD_LIBRARY_PATH="$directories${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
}

# ---------------------------------------------------------------------------------------------
# What a step needs. Each adds to `missing`; `ready` then fails the step naming all of it.

need_gpu() {
  if [ -n "$gpu_missing" ]; then missing+=("$gpu_missing"); fi
}

# Needs the binary NAME of .gpu-check/ and every shared library it links.
need_binary() {
  local binary="$check_dir/$1"
  if [ ! -x "$binary" ]; then
    missing+=("$(shown "$binary") (build it: bash scripts/gpu-check.sh build, with cargo and nvcc)")
    return
  fi
  command -v ldd >/dev/null 2>&1 || return 0
  local library
  while read -r library; do
    missing+=("$library (needed by $(shown "$binary"); install CUDA's libraries or their pip wheels)")
  done < <(ldd "$binary" 2>/dev/null | awk '/not found/ { print $1 }')
}

# Fails the step when something is missing or the budget is spent; otherwise sets its timeout.
ready() {
  if [ ${#missing[@]} -gt 0 ]; then
    step_reason="missing: $(join_items "${missing[@]}")"
    return 1
  fi
  local remaining=$((run_deadline - SECONDS)) cap="$1"
  if [ "$remaining" -lt 10 ]; then
    step_reason="budget spent: $budget_s s in all, $remaining s left for this step"
    return 1
  fi
  step_timeout=$((remaining < cap ? remaining : cap))
  echo "(timeout ${step_timeout} s)"
}

# Runs a command under the step's timeout, its output to the console and the step's log.
# Returns its exit status; a timeout becomes the step's reason.
run_logged() {
  local status=0
  timeout --kill-after=15 "$step_timeout" "$@" </dev/null 2>&1 | tee -a "$step_log" ||
    status=${PIPESTATUS[0]}
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    step_reason="timed out after $step_timeout s"
  fi
  return "$status"
}

# Records a test binary's summary line ("test result: ok. 7 passed; 0 failed; ...") and fails
# unless it ran at least one test and every one passed.
check_test_summary() {
  local summary
  summary="$(grep -a '^test result:' "$step_log" | tail -n 1 || true)"
  figure "${summary:-no test summary in the output}"
  if [[ ! "$summary" =~ ^test\ result:\ ok\.\ ([0-9]+)\ passed ]]; then
    step_reason="${step_reason:-tests failed: ${summary:-no summary}}"
    return 1
  fi
  if [ "${BASH_REMATCH[1]}" -eq 0 ]; then
    step_reason="no test ran (the filter matched none)"
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------
# The steps. Each returns 0 when its check passed; otherwise it sets step_reason.

step_nccl_conformance() {
  need_gpu
  need_binary conformance
  ready "$1" || return 1
  if [ "$gpu_count" -eq 1 ]; then
    figure "1 GPU: a single GPU forms a 1-rank NCCL world; the tests of 2 or more ranks skip"
  else
    figure "$gpu_count GPUs: NCCL worlds of 1 to $((gpu_count < 4 ? gpu_count : 4)) ranks (the suite stops at 4)"
  fi
  local status=0
  # One test at a time: concurrent NCCL groups on the same GPUs may wait on each other.
  run_logged "$check_dir/conformance" nccl --test-threads=1 --nocapture || status=$?
  local too_few unexpected
  too_few="$(grep -a -c 'skipping Nccl.*it needs [0-9]* ranks' "$step_log" || true)"
  unexpected="$(grep -a 'skipping Nccl' "$step_log" | grep -v 'it needs [0-9]* ranks' | head -n 1 || true)"
  figure "tests skipped for want of GPUs: $too_few"
  check_test_summary || return 1
  if [ "$status" -ne 0 ]; then step_reason="exit status $status"; return 1; fi
  if [ -n "$unexpected" ]; then
    step_reason="NCCL tests skipped instead of running: ${unexpected#*: }"
    return 1
  fi
}

step_gpu_training() {
  need_gpu
  need_binary gpu_training
  ready "$1" || return 1
  local status=0
  # COHORT_REQUIRE_GPU=1 turns the tests' "no usable GPU" skip into a failure.
  run_logged env COHORT_REQUIRE_GPU=1 "$check_dir/gpu_training" || status=$?
  check_test_summary || return 1
  if [ "$status" -ne 0 ]; then step_reason="exit status $status"; return 1; fi
}

# Runs the demo job file $2 on a local cluster of one worker; records its final state and its
# first and last progress lines.
run_demo() {
  local cap="$1" example="$2"
  need_gpu
  need_binary cohort
  ready "$cap" || return 1
  local cluster="$work_dir/$step_name" status=0
  mkdir -p "$cluster"
  run_logged "$check_dir/cohort" up --workers 1 --data-dir "$cluster/state" \
    --output-dir "$cluster/output" --run "$example" || status=$?
  local progress
  progress="$(grep -a -E '(^|\] +[0-9]+% )step [0-9]+/' "$step_log" || true)"
  figure "first: $(head -n 1 <<<"$progress")"
  figure "last: $(tail -n 1 <<<"$progress")"
  figure "$(grep -a -E '^[a-z0-9-]+-[0-9]+: ' "$step_log" | tail -n 1 || true)"
  if [ "$status" -ne 0 ]; then step_reason="${step_reason:-the job did not succeed}"; return 1; fi
}

# The loss of a progress line ("... loss 0.4321 ...").
loss_of() { sed -n 's/.* loss \([0-9.]*\) .*/\1/p' <<<"$1"; }

step_demo_fashion_mlp() {
  run_demo "$1" examples/fashion-mlp-gpu.toml || return 1
  local accuracy
  accuracy="$(sed -n 's/^final evaluation accuracy: \([0-9.]*\)%.*/\1/p' "$step_log" | tail -n 1)"
  figure "final evaluation accuracy: ${accuracy:-none reported}%"
  if [ -z "$accuracy" ] || ! awk -v a="$accuracy" 'BEGIN { exit !(a >= 85) }'; then
    step_reason="test accuracy ${accuracy:-unknown}%, expected at least 85%"
    return 1
  fi
}

step_demo_shakespeare() {
  run_demo "$1" examples/shakespeare-transformer-gpu.toml || return 1
  local progress first last
  progress="$(grep -a ' loss [0-9.]* ' "$step_log" || true)"
  first="$(loss_of "$(head -n 1 <<<"$progress")")"
  last="$(loss_of "$(tail -n 1 <<<"$progress")")"
  figure "training loss: ${first:-?} -> ${last:-?}"
  if [ -z "$first" ] || [ -z "$last" ] || ! awk -v f="$first" -v l="$last" 'BEGIN { exit !(l < f) }'; then
    step_reason="the loss did not fall (${first:-?} -> ${last:-?})"
    return 1
  fi
}

# Runs a benchmark and records its final JSON line.
run_bench() {
  local cap="$1"
  shift
  need_gpu
  need_binary cohort
  ready "$cap" || return 1
  local status=0 json
  run_logged "$check_dir/cohort" bench "$@" || status=$?
  json="$(grep -a '^{' "$step_log" | tail -n 1 || true)"
  figure "${json:-no JSON line in the output}"
  if [ "$status" -ne 0 ]; then step_reason="${step_reason:-exit status $status}"; return 1; fi
  if [ -z "$json" ]; then step_reason="no JSON line in its output"; return 1; fi
}

step_bench_allreduce() { run_bench "$1" allreduce --backend nccl; }

step_bench_train() { run_bench "$1" train --device gpu; }

# ---------------------------------------------------------------------------------------------
# Build.

# Prints the executable of test target $2 from cargo's JSON messages in file $1.
test_executable() {
  grep -F "\"name\":\"$2\"" "$1" | grep -F '"test":true' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

# Builds cohort and the GPU test binaries, then copies them (stripped), the demos' data sets and
# a manifest into $check_dir. Checks every prerequisite before compiling anything.
build() {
  missing=()
  command -v cargo >/dev/null 2>&1 || missing+=("cargo (install the Rust toolchain with rustup)")
  local compute_cap="${CUDA_COMPUTE_CAP:-$(gpu_compute_cap)}"
  if [ -z "$compute_cap" ]; then
    missing+=("${gpu_missing:-a compute capability from nvidia-smi}, which gives the compute capability to build for (or set CUDA_COMPUTE_CAP: 90 for H100 and H200)")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    local_toolkit >/dev/null || missing+=("nvcc (run scripts/cuda-toolkit.sh)")
    step_reason="missing: $(join_items "${missing[@]}")"
    return 1
  fi
  local toolkit
  if ! toolkit="$(bash "$repo/scripts/cuda-toolkit.sh")"; then
    step_reason="missing: nvcc (scripts/cuda-toolkit.sh found no toolkit and could not install one)"
    return 1
  fi
  export PATH="$toolkit/bin:$PATH" CUDA_HOME="$toolkit" CUDA_COMPUTE_CAP="$compute_cap"
  echo "CUDA_COMPUTE_CAP=$compute_cap, nvcc from $toolkit"

  # (errexit does not apply inside a step: every command's failure is handled where it runs.)
  local messages="$work_dir/cargo-messages.json"
  if ! {
    cargo build --release --locked -p cohort-cli --features candle-cuda &&
      cargo test --release --locked --no-run --message-format=json-render-diagnostics \
        -p cohort-collective --features cuda --test conformance >"$messages" &&
      cargo test --release --locked --no-run --message-format=json-render-diagnostics \
        -p cohort-trainer --features candle-cuda --test gpu_training >>"$messages"
  }; then
    step_reason="cargo failed (its errors are above)"
    return 1
  fi

  local conformance gpu_training
  conformance="$(test_executable "$messages" conformance)"
  gpu_training="$(test_executable "$messages" gpu_training)"
  if [ -z "$conformance" ] || [ -z "$gpu_training" ]; then
    step_reason="cargo named no executable for the conformance or gpu_training tests"
    return 1
  fi
  if ! {
    mkdir -p "$check_dir" &&
      install_binary "$repo/target/release/cohort" cohort &&
      install_binary "$conformance" conformance &&
      install_binary "$gpu_training" gpu_training &&
      copy_data
  }; then
    step_reason="could not fill $(shown "$check_dir")"
    return 1
  fi
  {
    echo "built: $(date -u '+%Y-%m-%d %H:%M:%SZ') on $(hostname 2>/dev/null || uname -n)"
    echo "commit: $(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "CUDA_COMPUTE_CAP: $compute_cap"
    echo "nvcc: $(nvcc --version | tail -n 1)"
    echo "cohort: cargo build --release -p cohort-cli --features candle-cuda"
    echo "conformance: cargo test --release -p cohort-collective --features cuda --test conformance"
    echo "gpu_training: cargo test --release -p cohort-trainer --features candle-cuda --test gpu_training"
    (cd "$check_dir" && du -sh cohort conformance gpu_training data 2>/dev/null) || true
  } >"$check_dir/manifest.txt"
  cat "$check_dir/manifest.txt"
}

# Copies binary $1, stripped, to $check_dir/$2.
install_binary() {
  cp "$1" "$check_dir/$2.tmp" || return 1
  if command -v strip >/dev/null 2>&1; then strip "$check_dir/$2.tmp" || return 1; fi
  mv "$check_dir/$2.tmp" "$check_dir/$2"
}

# Copies the data sets the demos read (Fashion-MNIST, Shakespeare), where they are found here,
# into $check_dir/data, which the run gives the demos as COHORT_DATA.
copy_data() {
  local directory
  for directory in "${COHORT_DATA:-/nonexistent}/fashion-mnist" /usr/share/datasets/fashion-mnist \
    "$repo/../shared/data/fashion-mnist"; do
    if [ -f "$directory/train-images-idx3-ubyte.gz" ]; then
      mkdir -p "$check_dir/data/fashion-mnist" &&
        cp "$directory"/*-ubyte.gz "$check_dir/data/fashion-mnist/" || return 1
      break
    fi
  done
  for directory in "${COHORT_DATA:-/nonexistent}/shakespeare" "$repo/../shared/data/shakespeare" \
    "${XDG_CACHE_HOME:-$HOME/.cache}/cohort/shakespeare"; do
    if [ -f "$directory/shakespeare.txt" ]; then
      mkdir -p "$check_dir/data/shakespeare" &&
        cp "$directory/shakespeare.txt" "$check_dir/data/shakespeare/" || return 1
      break
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# Running the steps and the report.

# Runs one step (label, name, function, cap, description) with its header and PASS/FAIL line.
run_step() {
  local label="$1" function="$3" cap="$4" description="$5"
  step_name="$2"
  step_log="$work_dir/$step_name.log"
  step_reason=""
  missing=()
  : >"$step_log"
  echo "== $label$step_name: $description"
  report ""
  report "== $step_name: $description"
  local start=$SECONDS status=0
  "$function" "$cap" || status=$?
  local line
  if [ "$status" -eq 0 ]; then
    line="PASS $step_name ($((SECONDS - start)) s)"
    passed=$((passed + 1))
  else
    line="FAIL $step_name: ${step_reason:-exit status $status}"
    failed=$((failed + 1))
    if [ -s "$step_log" ]; then
      report "  last lines of its output:"
      tail -n 15 "$step_log" | tr '\r' '\n' | sed 's/^/    /' >>"$report_file"
    fi
  fi
  echo "$line"
  report "$line"
}

build_step() {
  run_step "" build build 0 \
    "cohort and the GPU test binaries, --features candle-cuda, into $(shown "$check_dir")"
}

write_report_header() {
  : >"$report_file"
  report "Cohort GPU check, $(date -u '+%Y-%m-%d %H:%M:%SZ')"
  report "host: $(hostname 2>/dev/null || uname -n)"
  if [ -n "$gpu_missing" ]; then
    report "devices: none (missing: $gpu_missing)"
  else
    report "devices ($gpu_count):"
    nvidia-smi --query-gpu=index,name,memory.total,compute_cap,pci.bus_id --format=csv,noheader 2>/dev/null |
      sed 's/^/  /' >>"$report_file" || true
    report "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
  fi
  report "commit: $(git -C "$repo" describe --always --dirty 2>/dev/null || echo "unknown (no git)")"
  if [ -f "$check_dir/manifest.txt" ]; then
    report "binaries: $(head -n 3 "$check_dir/manifest.txt" | tr '\n' ' ')"
  fi
  report "budget: $budget_s s for the checks below"
}

run_checks() {
  add_pip_library_path
  if [ -z "${COHORT_DATA:-}" ] && [ -d "$check_dir/data" ]; then
    export COHORT_DATA="$check_dir/data"
  fi
  run_deadline=$((SECONDS + budget_s))
  local steps line index=0 name function cap description
  mapfile -t steps < <(grep . <<<"$STEPS")
  for line in "${steps[@]}"; do
    read -r name function cap description <<<"$line"
    index=$((index + 1))
    run_step "[$index/${#steps[@]}] " "$name" "$function" "$cap" "$description"
  done
}

main() {
  local mode=all
  while [ $# -gt 0 ]; do
    case "$1" in
      build | run | all) mode="$1" ;;
      --report) [ $# -ge 2 ] || usage; report_file="$(realpath -m "$2")"; shift ;;
      --budget-s) [[ "${2:-}" =~ ^[0-9]+$ ]] || usage; budget_s="$2"; shift ;;
      -h | --help) usage ;;
      *) echo "gpu-check: unknown argument $1" >&2; usage ;;
    esac
    shift
  done
  cd "$repo"
  work_dir="$(mktemp -d)"
  trap 'rm -rf "$work_dir"' EXIT
  detect_gpus

  if [ "$mode" = build ]; then
    report_file="$work_dir/build-report.txt"
    build_step
  else
    write_report_header
    if [ "$mode" = all ] || { [ ! -x "$check_dir/cohort" ] && command -v cargo >/dev/null 2>&1; }; then
      build_step
    fi
    run_checks
    report ""
    report "result: $passed passed, $failed failed"
    echo "result: $passed passed, $failed failed; report in $(shown "$report_file")"
  fi
  [ "$failed" -eq 0 ]
}

main "$@"
