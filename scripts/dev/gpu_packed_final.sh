#!/usr/bin/env bash
# The packed-tile GPU tests, then the attention table at 4096 (with FlexAttention) and 16384
# (without: its fine block masks take minutes to build), under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
ROWS= TESTS_TIMEOUT=${TESTS_TIMEOUT:-240} OUT=$OUT bash scripts/dev/gpu_packed.sh 2>&1 | grep -E "passed|failed|FAILED|ERROR" | head -20
export PYTHONPATH=. TORCHDYNAMO_CACHE_SIZE_LIMIT=64
timeout ${T4096:-250} python3 scripts/bench_attention.py --rows 4096 --graph --compare-packing --rounds 1 --tag run_4096 --outdir $OUT > $OUT/b4096.log 2>&1
timeout ${T16384:-150} python3 scripts/bench_attention.py --rows 16384 --graph --no-flex --compare-packing --rounds 1 --tag run_16384 --outdir $OUT > $OUT/b16384.log 2>&1
grep -hE "^N=" $OUT/b4096.log $OUT/b16384.log | cut -c1-250; tail -n 2 $OUT/b4096.log $OUT/b16384.log
