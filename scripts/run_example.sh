#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the main job on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python scripts/demo_cpu.py "$@"
