#!/usr/bin/env bash
# One call on the GPU machine for packed tiles: a quick packed-vs-contiguous timing of the
# fine rows, and the packed-tile and fused tests in parallel groups. Results under $OUT.
#   OUT=/tmp/gpu ROWS="16384-fixed-16 ..." GROUPS_N=4 bash scripts/dev/gpu_packed.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
ROWS=${ROWS-"16384-fixed-16 16384-tutorial-16 16384-fixed-32 16384-tutorial-32 16384-fixed-64 4096-tutorial-16 16384-bigbird-16"}
if [ -n "$ROWS" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 scripts/bench_attention.py --rows $ROWS --no-flex \
    --rounds 1 --compare-packing --graph ${BENCH_ARGS:-} --tag quick --outdir "$OUT" \
    > "$OUT/bench.log" 2>&1 &
fi
TESTS=${TESTS-"tests/ops/test_packed_tiles.py tests/ops/test_fused_attention.py"}
if [ -n "$TESTS" ]; then
  python3 -m pytest --collect-only -q -p no:cacheprovider $TESTS | grep :: > "$OUT/ids.txt"
  split -n r/"${GROUPS_N:-4}" "$OUT/ids.txt" "$OUT/ids_"
  i=0
  for ids in "$OUT"/ids_a?; do
    i=$((i + 1))
    timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider $(cat "$ids") \
      > "$OUT/tests_$i.log" 2>&1 &
  done
fi
wait
for f in "$OUT"/tests_*.log; do echo "== $f"; grep -E "^(FAILED|ERROR)" "$f" | head -20; tail -2 "$f"; done
grep -E "^N=|error|Error" "$OUT/bench.log" | head -40
