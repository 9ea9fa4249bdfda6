#!/usr/bin/env bash
# Installs everything lxdimagefs, its tests and its benchmarks need on a fresh Debian machine:
# Debian's lxd, fuse3 and libfuse2, the tools the tests make images with, and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES=(lxd lxd-client fuse3 libfuse2 libfuse3-3 squashfs-tools qemu-utils xz-utils zstd curl openssl vim-tiny python3 python3-venv)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "lxdimagefs installed: $(.venv/bin/lxdimagefs --version)"
