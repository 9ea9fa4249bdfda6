#!/usr/bin/env python3
"""The manual page and shell completions, generated from the argument parser (mount/cli.py) with
argparse-manpage and shtab (both only here, not needed at run time). `scripts/manual.py` writes
them into share/; `--check` fails if what is committed differs (tests/mount/test_manual.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from lxdimagefs import __version__
from lxdimagefs.mount.cli import build_parser

SHARE = Path(__file__).resolve().parent.parent / "share"


def generated() -> dict[Path, str]:
    parser = build_parser()
    page = Manpage(parser)
    page.description = parser.description or ""
    page.project_name = "lxdimagefs"
    page.version = __version__
    page.date = "2026-12-05"
    page.url = "docs/SEMANTICS.md"
    return {
        SHARE / "man" / "lxdimagefs.1": str(page),
        SHARE / "completion" / "lxdimagefs.bash": shtab.complete(parser, "bash"),
        SHARE / "completion" / "_lxdimagefs": shtab.complete(parser, "zsh"),
    }


def main(argv: list[str]) -> int:
    stale = []
    for path, text in generated().items():
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run scripts/manual.py): " + ", ".join(stale), file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
