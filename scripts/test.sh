#!/usr/bin/env bash
# The test command: installs what is missing, lints, then runs every test against a private,
# real LXD (started and stopped by the tests themselves) through real FUSE mounts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check lxdimagefs tests scripts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
