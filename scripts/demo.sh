#!/usr/bin/env bash
# The main job: installs what is missing, then mounts a real LXD's images at MOUNTPOINT
# (default ./mnt). The system's LXD if one answers; else a private sandbox LXD seeded with
# sample images. `scripts/demo.sh stop [MOUNTPOINT]` unmounts and stops the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.demo-sandbox
if [ "${1:-}" = stop ]; then
  MNT=$(realpath -m "${2:-mnt}")
  if mountpoint -q "$MNT"; then fusermount -u "$MNT"; fi
  if [ -f "$STATE" ]; then .venv/bin/python scripts/lxd_sandbox.py stop "$(cat "$STATE")"; rm -f "$STATE"; fi
  echo "unmounted $MNT"
  exit 0
fi
MNT=$(realpath -m "${1:-mnt}")
scripts/install.sh
mkdir -p "$MNT"
if mountpoint -q "$MNT"; then
  echo "$MNT is already mounted; run: scripts/demo.sh stop $MNT" >&2
  exit 1
fi
if env -u LXD_DIR -u LXD_SOCKET -u INCUS_DIR -u INCUS_SOCKET .venv/bin/lxdimagefs "$MNT" 2>/dev/null; then
  echo "Mounted the system's LXD at $MNT"
else
  eval "$(.venv/bin/python scripts/lxd_sandbox.py start --seed)"
  echo "$SANDBOX" > "$STATE"
  .venv/bin/lxdimagefs --socket "$LXD_DIR/unix.socket" "$MNT"
  echo "No system LXD answered: mounted a private sandbox LXD (LXD_DIR=$LXD_DIR) with sample images at $MNT"
fi
fp=""
for d in "$MNT"/by-fingerprint/*/; do  # a unified image: its one export hashes to its fingerprint
  if [ "$(ls "$d" | wc -l)" -eq 2 ]; then fp=$(basename "$d"); break; fi
done
cat <<TIPS

Try:
  ls -l $MNT/by-alias/
  ls -l $MNT/by-fingerprint/
  cat $MNT/by-fingerprint/${fp:-<fp>}/metadata.json
  sha256sum $MNT/by-fingerprint/${fp:-<fp>}/*.tar*      # prints the fingerprint itself
  tar -tvf $MNT/by-fingerprint/${fp:-<fp>}/*.tar*
  getfattr -d $MNT/by-fingerprint/${fp:-<fp>}                # the record as user.lxd.* attributes
  df -h $MNT                                                # the storage LXD keeps images on
  cat $MNT/contents/by-fingerprint/${fp:-<fp>}/rootfs/etc/hostname       # inside the image, not unpacked
When done:
  scripts/demo.sh stop $MNT
TIPS
