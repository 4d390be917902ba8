#!/usr/bin/env bash
# Prints the directory of a CUDA compiler toolchain (nvcc, its headers and libdevice) able to
# build candle's CUDA kernels, installing one from PyPI into the per-user cache when the machine
# has none. This is what `--features candle-cuda` needs at build time; it is not a driver, so it
# runs nothing on a GPU. Used by scripts/test.sh to type-check the GPU training code on machines
# without CUDA, and usable on GPU machines that lack the toolkit:
#   export PATH="$(bash scripts/cuda-toolkit.sh)/bin:$PATH"
# A machine's own toolkit wins: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc on the PATH.
set -euo pipefail

for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then
    echo "$root"
    exit 0
  fi
done
if command -v nvcc >/dev/null 2>&1; then
  dirname "$(dirname "$(command -v nvcc)")"
  exit 0
fi

version=13.0.88
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cohort/cuda-$version"
toolkit="$cache/nvidia/cu13"
if [ -x "$toolkit/bin/nvcc" ] && [ -x "$toolkit/nvvm/bin/cicc" ]; then
  echo "$toolkit"
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "cuda-toolkit: installing python3-pip" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Pinned by hash: the compiler driver, the device compiler (cicc, libdevice), the runtime and
# CRT headers, and CCCL (libcu++'s <nv/target>, which cuda_fp16.h includes).
cat > "$work/requirements.txt" <<EOF
nvidia-cuda-nvcc==$version --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==$version --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-runtime==$version --hash=sha256:422a38f7c739ecbdd3a4b6ec7ed0a1d74db43d8e9bc26685f3d845638922b178
nvidia-cuda-crt==$version --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
EOF
echo "cuda-toolkit: installing nvcc $version from PyPI into $cache (about 100 MB)" >&2
python3 -m pip install --quiet --no-deps --no-compile --require-hashes \
  --target "$work/install" -r "$work/requirements.txt" >&2
if [ ! -x "$work/install/nvidia/cu13/bin/nvcc" ]; then
  echo "cuda-toolkit: the wheels did not provide nvidia/cu13/bin/nvcc" >&2
  exit 1
fi
mkdir -p "$(dirname "$cache")"
rm -rf "$cache"
mv "$work/install" "$cache"
echo "$toolkit"
