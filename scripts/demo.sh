#!/usr/bin/env bash
# Set up (first time) and run the demo on the embedded shapes-world model: dreamtune demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/dreamtune demo "$@"
