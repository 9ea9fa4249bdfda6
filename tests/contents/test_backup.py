"""Backing up a whole mount: contents/ is derived from the exports. It is a link to the connection
that serves it (mount/inside.py), which backup tools keep as a link: each image is read once, not
twice. Served by the mount itself (where that connection cannot be had), its CACHEDIR.TAG tells
tar, restic and borg to leave it out (--exclude-caches)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.lxd


def _tar(mnt: Path, tmp: Path, *flags: str) -> list[str]:
    archive = tmp / "backup.tar"
    subprocess.run(["tar", "-c", *flags, "-f", str(archive), "-C", str(mnt), "."], check=True,
                   capture_output=True)
    names = subprocess.run(["tar", "-tf", str(archive)], check=True, capture_output=True, text=True)
    archive.unlink()
    return [n.removeprefix("./").rstrip("/") for n in names.stdout.splitlines()]


def _restic(mnt: Path, tmp: Path) -> list[str]:
    env = {**os.environ, "RESTIC_REPOSITORY": str(tmp / "restic"), "RESTIC_PASSWORD": "test",
           "RESTIC_CACHE_DIR": str(tmp / "restic-cache")}
    for args in (["init"], ["backup", "--exclude-caches", str(mnt)]):
        subprocess.run(["restic", *args], env=env, check=True, capture_output=True)
    names = subprocess.run(["restic", "ls", "latest"], env=env, check=True, capture_output=True, text=True)
    return [n.removeprefix(f"{mnt}/") for n in names.stdout.splitlines() if n.startswith(f"{mnt}/")]


def _borg(mnt: Path, tmp: Path) -> list[str]:
    env = {**os.environ, "BORG_BASE_DIR": str(tmp / "borg-home"), "BORG_PASSPHRASE": ""}
    repo = str(tmp / "borg")
    subprocess.run(["borg", "init", "-e", "none", repo], env=env, check=True, capture_output=True)
    # borg stores paths without the leading slash; it is run from the mount so that they start at it.
    subprocess.run(["borg", "create", "--exclude-caches", f"{repo}::one", "."], env=env, check=True,
                   capture_output=True, cwd=mnt)
    names = subprocess.run(["borg", "list", "--format", "{path}{NL}", f"{repo}::one"], env=env, check=True,
                           capture_output=True, text=True)
    return names.stdout.splitlines()


@pytest.mark.parametrize("tool", [lambda m, t: _tar(m, t, "--exclude-caches"), _restic, _borg],
                         ids=["tar", "restic", "borg"])
def test_a_backup_keeps_the_exports_and_contents_as_its_link(mnt, images, tmp_path, tool):
    fp = images.fps["gz"]
    names = tool(mnt.path, tmp_path)
    assert any(n.startswith(f"by-fingerprint/{fp}/") and n.endswith(".tar.gz") for n in names), names[:20]
    assert [n for n in names if n.startswith("contents")] == ["contents"]


def test_without_the_flag_tar_keeps_contents_as_its_link(mnt, images, tmp_path):
    """The control: without --exclude-caches, contents/ is in the backup as the link it is (`tar -h`,
    following links, would read every image a second time)."""
    archive = tmp_path / "backup.tar"
    subprocess.run(["tar", "-c", "-f", str(archive), "-C", str(mnt.path), "."], check=True,
                   capture_output=True)
    listed = subprocess.run(["tar", "-tvf", str(archive)], check=True, capture_output=True, text=True).stdout
    link = next(line for line in listed.splitlines() if " ./contents -> " in line)
    assert link.startswith("l") and link.endswith(os.readlink(mnt.path / "contents")), link
    assert "./contents/" not in listed
    assert (mnt.path / "contents/CACHEDIR.TAG").read_bytes().startswith(
        b"Signature: 8a477f597d28d172789f06886806bc55")
