"""Random sequences of changes through the mount; after each, the mount and LXD agree."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from lxd_sandbox import make_unified

from lxdimagefs.names import alias_to_filename

pytestmark = pytest.mark.lxd  # a real LXD and /dev/fuse, as root

NAMES = st.sampled_from(["a", "b", "deb/12", "c.d", "..", "x y"])
_seq = itertools.count()


@pytest.fixture()
def machine(deleting_mnt, sandbox):
    mnt = deleting_mnt  # the machine deletes images too
    work = Path(tempfile.mkdtemp(prefix="stateful-"))
    before = {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")}

    class ImagesThroughTheMount(RuleBasedStateMachine):
        """The model is LXD itself: every step is checked against its own listing."""

        def __init__(self) -> None:
            super().__init__()
            self.made: list[str] = []

        def lxd(self) -> tuple[set[str], dict[str, str]]:
            images = {r["fingerprint"] for r in sandbox.rest("/1.0/images?recursion=1")} - before
            aliases = {a["name"]: a["target"] for a in sandbox.rest("/1.0/images/aliases?recursion=1")
                       if a["target"] not in before}
            return images, aliases

        @rule()
        def import_image(self) -> None:
            tarball = make_unified(work / f"s{next(_seq)}.tar.gz", rootfs_bytes=256)
            subprocess.run(["cp", str(tarball), str(mnt.path / "import")], check=True)
            self.made.append(hashlib.sha256(tarball.read_bytes()).hexdigest())
            tarball.unlink()

        @precondition(lambda self: self.lxd()[0])
        @rule(name=NAMES, pick=st.integers(0, 100))
        def create_alias(self, name: str, pick: int) -> None:
            images, aliases = self.lxd()
            fp = sorted(images)[pick % len(images)]
            link = mnt.path / "by-alias" / alias_to_filename(name)
            if name in aliases:
                with pytest.raises(FileExistsError):
                    os.symlink(f"../by-fingerprint/{fp}", link)
            else:
                os.symlink(f"../by-fingerprint/{fp}", link)
                assert self.lxd()[1][name] == fp

        @precondition(lambda self: self.lxd()[1])
        @rule(new=NAMES, pick=st.integers(0, 100))
        def rename_alias(self, new: str, pick: int) -> None:
            aliases = self.lxd()[1]
            old = sorted(aliases)[pick % len(aliases)]
            target = aliases[old]
            folder = mnt.path / "by-alias"
            os.rename(folder / alias_to_filename(old), folder / alias_to_filename(new))
            after = self.lxd()[1]
            assert after[new] == target
            assert old == new or old not in after

        @precondition(lambda self: self.lxd()[1] and self.lxd()[0])
        @rule(pick=st.integers(0, 100), to=st.integers(0, 100))
        def retarget_alias(self, pick: int, to: int) -> None:
            images, aliases = self.lxd()
            name = sorted(aliases)[pick % len(aliases)]
            fp = sorted(images)[to % len(images)]
            subprocess.run(["ln", "-sfn", f"../by-fingerprint/{fp}",
                            str(mnt.path / "by-alias" / alias_to_filename(name))], check=True)
            assert self.lxd()[1][name] == fp

        @precondition(lambda self: self.lxd()[1])
        @rule(pick=st.integers(0, 100))
        def delete_alias(self, pick: int) -> None:
            aliases = self.lxd()[1]
            name = sorted(aliases)[pick % len(aliases)]
            os.unlink(mnt.path / "by-alias" / alias_to_filename(name))
            assert name not in self.lxd()[1]

        @precondition(lambda self: self.lxd()[0])
        @rule(pick=st.integers(0, 100))
        def delete_image(self, pick: int) -> None:
            images = self.lxd()[0]
            fp = sorted(images)[pick % len(images)]
            subprocess.run(["rm", "-r", str(mnt.path / "by-fingerprint" / fp)], check=True)
            assert fp not in self.lxd()[0]

        @invariant()
        def the_mount_shows_what_lxd_holds(self) -> None:
            images, aliases = self.lxd()
            listed = set(os.listdir(mnt.path / "by-fingerprint")) - before
            assert listed == images
            links = {}
            for entry in os.listdir(mnt.path / "by-alias"):
                target = os.readlink(mnt.path / "by-alias" / entry).rsplit("/", 1)[1]
                if target not in before:
                    links[entry] = target
            assert links == {alias_to_filename(n): fp for n, fp in aliases.items()}
            assert os.listdir(mnt.path / "import") == []

        def teardown(self) -> None:
            for fp in self.lxd()[0]:
                sandbox.lxc("image", "delete", fp, check=False)

    yield ImagesThroughTheMount
    os.rmdir(work)


def test_random_changes_keep_the_mount_and_lxd_in_step(machine):
    # Each step is real LXD work (imports, alias calls): slow by hypothesis's measure, and the
    # machine is a session fixture; every other health check stays on. No shrinking: the model is
    # the live LXD, so a replay cannot draw what the failing run drew, and hypothesis would report
    # its replay as a flaky strategy instead of the failure (seen once under a full suite's load).
    machine.TestCase.settings = settings(max_examples=30, stateful_step_count=10, deadline=None,
                                         phases=[Phase.explicit, Phase.reuse, Phase.generate],
                                         suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
    machine.TestCase().runTest()
