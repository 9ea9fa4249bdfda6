#!/usr/bin/env bash
# The test command: installs what is missing, lints, type-checks, then runs every test against a private,
# real LXD (started and stopped by the tests themselves) through real FUSE mounts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check lxdimagefs tests scripts
.venv/bin/mypy                        # the package (pyproject.toml), and the stand-in is an ImageServer
.venv/bin/mypy tests/fakelxd.py
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
