"""--all-projects: one folder per LXD project, each a whole tree, following LXD's projects.

Runs on the session's private LXD, in projects of its own (deleted afterwards).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers import within as shows_within
from lxd_sandbox import Sandbox, make_unified
from mounts import Mount, mounted

pytestmark = pytest.mark.lxd

TREE = ["by-alias", "by-fingerprint", "contents", "import"]


def fps(sandbox: Sandbox, project: str) -> set[str]:
    return {r["fingerprint"] for r in sandbox.rest(f"/1.0/images?recursion=1&project={project}")}


def aliases(sandbox: Sandbox, project: str) -> set[str]:
    return {a["name"] for a in sandbox.rest(f"/1.0/images/aliases?recursion=1&project={project}")}


@pytest.fixture(scope="module")
def projects(sandbox: Sandbox, images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`own` keeps its images; `shared` (features.images=false) shows the default project's."""
    work = tmp_path_factory.mktemp("projects")
    sandbox.lxc("project", "create", "own")
    sandbox.lxc("project", "create", "shared", "-c", "features.images=false")
    out = sandbox.lxc("image", "import", str(make_unified(work / "own.tar.gz")), "--project", "own",
                      "--alias", "only-in-own").stdout.decode()
    try:
        yield {"own": out.strip().rsplit(" ", 1)[-1]}
    finally:
        for fp in fps(sandbox, "own"):
            sandbox.lxc("image", "delete", fp, "--project", "own", check=False)
        for project in ("own", "shared"):
            sandbox.lxc("project", "delete", project, check=False)


@pytest.fixture(scope="module")
def pm(sandbox: Sandbox, projects, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(sandbox, tmp_path_factory.mktemp("pm") / "mnt", "--all-projects") as m:
        yield m


def test_one_folder_per_project_each_a_whole_tree(sandbox, images, projects, pm):
    assert {"default", "own", "shared"} <= set(os.listdir(pm.path))
    for project in ("default", "own", "shared"):
        assert sorted(os.listdir(pm.path / project)) == TREE
    assert set(os.listdir(pm.path / "own" / "by-fingerprint")) == fps(sandbox, "own") == {projects["own"]}
    assert set(os.listdir(pm.path / "default" / "by-fingerprint")) == fps(sandbox, "default")
    assert projects["own"] not in os.listdir(pm.path / "default" / "by-fingerprint")
    assert os.listdir(pm.path / "own" / "by-alias") == ["only-in-own"]
    fp = projects["own"]
    data = (pm.path / "own" / "by-alias" / "only-in-own" / f"{fp}.tar.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == fp


def test_a_project_without_its_own_images_shows_the_default_projects(sandbox, images, projects, pm):
    assert set(os.listdir(pm.path / "shared" / "by-fingerprint")) == fps(sandbox, "default")
    shared, default = pm.path / "shared" / "by-alias", pm.path / "default" / "by-alias"
    assert sorted(os.listdir(shared)) == sorted(os.listdir(default))
    # Writable, as LXD takes it: an alias made through it is the default project's, and every
    # folder that shows the default project's images hears of it at once.
    os.listdir(pm.path / "default" / "by-alias")  # cached now
    os.symlink(f"../by-fingerprint/{images.fps['gz']}", pm.path / "shared" / "by-alias" / "via-shared")
    try:
        assert "via-shared" in aliases(sandbox, "default")
        shows_within(lambda: "via-shared" in os.listdir(pm.path / "default" / "by-alias"))
    finally:
        sandbox.lxc("image", "alias", "delete", "via-shared", check=False)


def test_an_alias_made_elsewhere_in_a_project_shows_within_a_second(sandbox, projects, pm):
    os.listdir(pm.path / "own" / "by-alias")  # cached now
    sandbox.lxc("image", "alias", "create", "made-by-lxc", projects["own"], "--project", "own")
    try:
        shows_within(lambda: "made-by-lxc" in os.listdir(pm.path / "own" / "by-alias"))
        assert "made-by-lxc" not in os.listdir(pm.path / "default" / "by-alias")
    finally:
        sandbox.lxc("image", "alias", "delete", "made-by-lxc", "--project", "own")


def test_projects_made_or_deleted_while_mounted_come_and_go_within_a_second(sandbox, pm):
    os.listdir(pm.path)
    sandbox.lxc("project", "create", "newcomer")
    try:
        shows_within(lambda: "newcomer" in os.listdir(pm.path))
        assert sorted(os.listdir(pm.path / "newcomer")) == TREE
    finally:
        sandbox.lxc("project", "delete", "newcomer")
    shows_within(lambda: "newcomer" not in os.listdir(pm.path))
    assert not (pm.path / "newcomer").exists()


def test_an_import_lands_in_the_project_whose_import_folder_it_was_written_to(sandbox, images, projects, pm,
                                                                              tmp_path):
    image = make_unified(tmp_path / "for-own.tar.xz")
    fp = hashlib.sha256(image.read_bytes()).hexdigest()
    shutil.copyfile(image, pm.path / "own" / "import" / "for-own.tar.xz")
    try:
        assert fp in fps(sandbox, "own")
        assert fp not in fps(sandbox, "default")
        assert fp in os.listdir(pm.path / "own" / "by-fingerprint")
    finally:
        sandbox.lxc("image", "delete", fp, "--project", "own", check=False)


def test_all_projects_and_one_project_together_is_a_usage_error(sandbox, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lxdimagefs", "--socket", sandbox.socket, "--all-projects",
                           "--project", "own", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--all-projects" in done.stderr
    assert not os.path.ismount(tmp_path)


def test_without_events_the_list_of_projects_lives_metadata_ttl(sandbox, images, projects, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "--all-projects", "-o", "no_events,metadata_ttl=1") as m:
        assert "later" not in os.listdir(m.path)
        sandbox.lxc("project", "create", "later")
        try:
            shows_within(lambda: "later" in os.listdir(m.path), seconds=2.5)  # no event: the lifetime
        finally:
            sandbox.lxc("project", "delete", "later")


def test_a_mount_of_a_project_without_its_own_images_hears_the_default_projects_changes(sandbox, images,
                                                                                          projects, tmp_path):
    """LXD tags the events of the images a features.images=false project shows with `default`: a
    mount of that project alone must listen there (the kernel keeps names for an hour)."""
    with mounted(sandbox, tmp_path / "mnt", "--project", "shared") as m:
        deadline = time.monotonic() + 20
        while "listening to LXD's lifecycle events" not in m.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.listdir(m.path / "by-alias")  # cached now
        sandbox.lxc("image", "alias", "create", "made-in-default", images.fps["plain"])
        try:
            shows_within(lambda: "made-in-default" in os.listdir(m.path / "by-alias"))
        finally:
            sandbox.lxc("image", "alias", "delete", "made-in-default")
        shows_within(lambda: not os.path.lexists(m.path / "by-alias" / "made-in-default"))
