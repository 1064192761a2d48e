#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the whole test suite. Without a GPU the Triton kernels
# run through Triton's interpreter on CPU tensors and GPU-only tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
set +e
python -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
