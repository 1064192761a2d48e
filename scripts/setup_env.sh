#!/usr/bin/env bash
# Create .venv in the checkout and install everything the example and the tests need.
# CPU by default: torch 2.13.0 (CPU build). On a CUDA machine set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.11.0" bash scripts/setup_env.sh
# Re-running is cheap: an existing .venv is reused and pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=23" setuptools wheel
# torch first and pinned: packages built below (DeepSpeed) import it at build time, and an
# unpinned resolution could pull a multi-GB CUDA build.
pip install "$TORCH_SPEC"
echo "$TORCH_SPEC" > .venv/torch-constraint.txt
pip install --no-build-isolation -c .venv/torch-constraint.txt -e ".[dev]"
python -c "import torch, triton, sparse_attn; print('ready: torch', torch.__version__, '| triton', triton.__version__, '| sparse_attn', sparse_attn.__version__)"
