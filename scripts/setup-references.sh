#!/usr/bin/env bash
# Optionally installs the reference implementations `cohort bench allreduce` and
# `cohort bench train` compare Cohort with in the same run, on Debian 12:
#   - Open MPI (mpirun) and mpi4py, for MPI_Allreduce over shared memory and over TCP;
#   - PyTorch and NumPy, for DistributedDataParallel training of the same MLP over gloo;
#   - OpenBLAS: Debian's PyTorch calls whichever libblas.so.3 the alternatives system selects,
#     and without OpenBLAS that is the reference BLAS, some twenty times slower at the MLP's
#     matrix products than what PyTorch users run, which would flatter Cohort.
# Never needed to build or test Cohort: setup.sh, test.sh and CI do not call it, and the
# benchmarks print why they skip a reference that is not installed. Idempotent.
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev python3-mpi4py python3-torch python3-numpy
  libopenblas0-pthread)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup-references: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The packages land in Debian's python3 (/usr/bin/python3), which the benchmarks find even
# when another python3 comes first on PATH.
/usr/bin/python3 -c "import mpi4py, torch, numpy; print('setup-references: mpi4py', mpi4py.__version__, '/ torch', torch.__version__)"
