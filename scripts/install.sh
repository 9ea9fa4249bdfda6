#!/usr/bin/env bash
# Installs everything lxdimagefs, its tests and its benchmarks need on a fresh Debian machine:
# Debian's lxd, fuse3 and libfuse2, Incus (Debian 12: from bookworm-backports), the tools the tests
# make images with, and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES=(lxd lxd-client fuse3 libfuse2 libfuse3-3 squashfs-tools qemu-utils fdisk dosfstools mtools xz-utils zstd curl openssl
              vim-tiny attr rsync python3 python3-venv
              debootstrap restic borgbackup strace  # a real distribution tree for contents/; backup tools;
              # strace: which calls a command makes over contents/
              systemd)  # systemd-analyze verify checks the unit files shipped (no systemd need run)
INCUS_PACKAGES=(incus-base incus-client)  # the daemon without its VM parts, and the client
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${APT_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! installed incus-base || ! installed incus-client; then
  suite=()
  if [ "$(. /etc/os-release; echo "${VERSION_CODENAME:-}")" = bookworm ]; then
    # Debian 12 has Incus 6.0 in bookworm-backports only: add that suite (pinned below the
    # release by Debian itself, so nothing else comes from it) unless it is there already.
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $SUDO tee /etc/apt/sources.list.d/lxdimagefs-backports.sources >/dev/null
    fi
    suite=(-t bookworm-backports)
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${suite[@]}" "${INCUS_PACKAGES[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "lxdimagefs installed: $(.venv/bin/lxdimagefs --version)"
