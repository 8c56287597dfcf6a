#!/usr/bin/env bash
# Set up (first time) and run the test suite (slow tests excluded; add `-m slow` for those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
