#!/usr/bin/env bash
# Installs the system packages Cohort needs on a fresh Debian 12 machine.
# Idempotent: packages already present are left alone.
set -euo pipefail

# libprotobuf-dev carries the well-known .proto files (descriptor.proto) that etcd-client needs;
# iproute2 (`ip`, `tc`) and python3 build and probe the multi-host tests' network namespaces;
# prometheus (with promtool) scrapes the coordinator in the observability tests; chromium (with
# fonts-liberation, for its pages' text) loads the web dashboard in the dashboard tests.
packages=(protobuf-compiler libprotobuf-dev etcd-server dataset-fashion-mnist iproute2 python3
  prometheus chromium fonts-liberation)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
bash "$(dirname "$0")/fetch-shakespeare.sh"
