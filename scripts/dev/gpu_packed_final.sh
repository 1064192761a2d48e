#!/usr/bin/env bash
# The packed-tile and fused GPU tests, then the attention table at 4096 and 16384 (FlexAttention
# from the earlier run of the card: `--flex` to time it again, minutes per fine row), under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
ROWS= TESTS_TIMEOUT=${TESTS_TIMEOUT:-150} OUT=$OUT bash scripts/dev/gpu_packed.sh 2>&1 | grep -E "passed|failed|FAILED|ERROR" | head -20
export PYTHONPATH=. TORCHDYNAMO_CACHE_SIZE_LIMIT=64
timeout ${TBENCH:-240} python3 scripts/bench_attention.py --graph $([ -n "${FLEX:-}" ] || echo --no-flex) \
  --compare-packing --rounds 1 --tag h100 --outdir $OUT > $OUT/bench_all.log 2>&1
grep -hE "^N=" $OUT/bench_all.log | cut -c1-250; tail -n 2 $OUT/bench_all.log
