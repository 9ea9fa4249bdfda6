"""The manual page and completions in share/ are what the argument parser says today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_manual_and_completions_are_generated_from_the_parser():
    done = subprocess.run([sys.executable, str(ROOT / "scripts/manual.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (ROOT / "share/man/lxdimagefs.1").read_text()
    assert page.startswith(".TH LXDIMAGEFS") and "\\-\\-log\\-format" in page
    bash = ROOT / "share/completion/lxdimagefs.bash"
    assert "--log-format" in bash.read_text() and "--all-remotes" in bash.read_text()
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(bash)]).returncode == 0
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", str(ROOT / "share/man/lxdimagefs.1")], capture_output=True,
                               text=True, env={"MANPAGER": "cat", "PAGER": "cat", "PATH": "/usr/bin:/bin"})
        assert shown.returncode == 0 and "MOUNTPOINT" in shown.stdout, shown.stderr
