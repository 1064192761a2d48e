#!/usr/bin/env bash
# One call on the GPU machine: GPU tests of the module layer and the fused kernel, the BERT
# training benchmark (issue 6), and a short bf16 BERT-base training run at sequence 4096
# through the deepspeed launcher. Results go under $OUT (default out/gpu).
#   bash scripts/dev/gpu_check.sh            # everything
#   STAGES="bench tests" bash scripts/dev/gpu_check.sh
#   STAGES="launch split" bash scripts/dev/gpu_check.sh   # launch cost; host vs GPU per step
#   STAGES="ptests cprofile" bash scripts/dev/gpu_check.sh # tests in 6 parallel groups; host profile
#   STAGES="ptests table" bash scripts/dev/gpu_check.sh   # tests, then the attention table
#     (TABLE_ARGS, default "--graph --no-flex --compare-packing --rounds 1"; FlexAttention's
#     fine block masks take minutes per row to build)
#   STAGES="fixed16 headdim" bash scripts/dev/gpu_check.sh  # issue 21 targets 4 and 5: the BERT
#     step at 16384 with the tutorial's Fixed 16 and 64 (eager, compiled); head_dim 128 and 32
#     tile sweeps and rows (HEAD_DIMS, default "128 32")
#   STAGES=longseq bash scripts/dev/gpu_check.sh         # BERT-base at 262144 tokens (LONG_SEQ)
#     on one GPU, needs .whl/ and out/longcorpus/ carried; LONG_DENSE_STEPS=N adds N steps
#     of dense attention at the same length
#   STAGES=ncu bash scripts/dev/gpu_check.sh             # Nsight Compute, fused kernels at
#     head_dim 64 and 128 (NCU_DIMS), BigBird 64 at 16384
#   STAGES=multigpu bash scripts/dev/gpu_check.sh        # deepspeed --num_gpus <all GPUs>, ZeRO-2/3
#   STAGES=tests TESTS=tests/ops/test_three_kernel_attention.py bash scripts/dev/gpu_check.sh
#   STAGES=bench BENCH_ARGS="--seqs 4096 16384 --compile reduce-overhead" bash scripts/dev/gpu_check.sh
#   STAGES=gaps bash scripts/dev/gpu_check.sh            # where the bing_bert step's GPU waits
#   STAGES=fusednorm bash scripts/dev/gpu_check.sh       # the example's own kernels: tests, speed
#   STAGES=mixorder bash scripts/dev/gpu_check.sh        # compiled step, inductor mix-order on/off
#   STAGES=bingbert bash scripts/dev/gpu_check.sh        # the bing_bert example's tokens/s (issue 22)
#     (BBB_ARGS, default "--models base --seqs 4096 16384 --profile": eager, about 8 minutes
#     on an H100; e.g. BBB_ARGS="--models base --seqs 4096 16384 --compile")
# DeepSpeed and its small dependencies may come as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
STAGES=${STAGES:-"bench tests train"}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
date -u +%FT%TZ >> "$OUT/device.txt"
for stage in $STAGES; do
  case $stage in
    bench)
      timeout "${BENCH_TIMEOUT:-240}" python3 scripts/bench_bert_training.py ${BENCH_ARGS:-} \
        --out "$OUT/bench_bert_training.json" 2>&1 | tee "$OUT/bench_bert_training.log" ;;
    bingbert)  # needs DeepSpeed (.whl/); no new batch after BBB_BUDGET s (the JSON is
      # rewritten after each sequence); the full log in $OUT, the summary on stdout
      timeout "${BBB_TIMEOUT:-570}" python3 scripts/bench_bing_bert.py \
        ${BBB_ARGS:---models base --seqs 4096 16384 --profile} \
        --time_budget "${BBB_BUDGET:-450}" --out "$OUT/bing_bert.json" > "$OUT/bing_bert.log" 2>&1
      echo "bingbert exit $?"; grep -vE "^\[20|^\[sparse_attn|^optimizer:" "$OUT/bing_bert.log" | tail -n 40 ;;
    fusednorm)  # the example's own kernels (fused residual add + dropout + LayerNorm, the
      # masked-LM cross-entropy): their tests on the GPU, the kernels against the plain ops,
      # then BERT-base 4096 x32 eager with both and with neither (FUSED_FLAGS: a row per flag, e.g.
      # "--no_fused_loss"; FUSED_ARGS changes them); about 6 minutes
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/example/test_residual_norm.py \
        tests/example/test_cross_entropy.py 2>&1 | tail -4
      timeout 150 python3 scripts/dev/bench_example_kernels.py 2>&1 | tee "$OUT/example_kernels.md"
      for flags in "" "--no_fused_norm --no_fused_loss" ${FUSED_FLAGS:-}; do
        tag=$(echo "fused $flags" | tr -d '-' | tr ' ' '_')
        timeout "${FUSED_TIMEOUT:-200}" python3 scripts/bench_bing_bert.py \
          ${FUSED_ARGS:---models base --seqs 4096 --batches 32 --profile} --rounds 2 $flags \
          --out "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
        echo "bing_bert ${flags:-(both fused)} exit $?"; grep -E "^(base|large) " "$OUT/$tag.log"
      done ;;
    mixorder)  # the compiled step with inductor's mix-order reduction on (its default) and
      # off: its fused LayerNorm backward took 57 of 266 ms at 4096 x32
      for mix in 1 0; do
        TORCHINDUCTOR_MIX_ORDER_REDUCTION=$mix timeout "${FUSED_TIMEOUT:-240}" python3 \
          scripts/bench_bing_bert.py --models base --seqs 4096 --batches 32 --variants dense \
          bigbird64 --compile --rounds 2 --profile --out "$OUT/compiled_mix$mix.json" \
          > "$OUT/compiled_mix$mix.log" 2>&1
        echo "compiled, mix-order reduction $mix: exit $?"; grep -E "^(base|large) " "$OUT/compiled_mix$mix.log"
      done ;;
    gaps)  # where the eager bing_bert step's GPU waits (issue 22): one profiled step per row
      # as a Chrome trace (GAPS_ARGS, default BERT-base 4096 x32; e.g. "--models base --seqs
      # 65536 --batches 2 --profile"), read by
      # scripts/dev/trace_gaps.py; then the same 4096 row with --sync_positions (the model's
      # own nonzero) beside it
      timeout "${GAPS_TIMEOUT:-300}" python3 scripts/bench_bing_bert.py \
        ${GAPS_ARGS:---models base --seqs 4096 --batches 32 --profile} --rounds 2 \
        --trace "$OUT/trace" --out "$OUT/gaps.json" > "$OUT/gaps.log" 2>&1
      echo "gaps exit $?"; grep -E "^(base|large) " "$OUT/gaps.log"
      timeout "${GAPS_TIMEOUT:-300}" python3 scripts/bench_bing_bert.py --models base \
        --seqs 4096 --batches 32 --variants dense bigbird64 --rounds 2 --profile \
        --sync_positions --out "$OUT/gaps_sync.json" > "$OUT/gaps_sync.log" 2>&1
      echo "gaps --sync_positions exit $?"; grep -E "^(base|large) " "$OUT/gaps_sync.log"
      # the caching allocator as a cause: the same row with expandable segments (no retry
      # that frees the cache; cudaMalloc'd segments grow in place)
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${GAPS_TIMEOUT:-300}" \
        python3 scripts/bench_bing_bert.py --models base --seqs 4096 --batches 32 --variants \
        dense bigbird64 --rounds 2 --profile --out "$OUT/gaps_expandable.json" \
        > "$OUT/gaps_expandable.log" 2>&1
      echo "gaps expandable_segments exit $?"; grep -E "^(base|large) " "$OUT/gaps_expandable.log"
      for t in "$OUT"/trace/*.json.gz; do
        python3 scripts/dev/trace_gaps.py "$t" --top 12 | cut -c1-220
      done ;;
    longseq)  # BERT-base at LONG_SEQ (262144) on one GPU, BigBird 64 (issue 22): the corpus
      # comes as out/longcorpus/{corpus.txt.gz,vocab.txt} (carry it: the standard library's
      # docstrings hold two such sequences); LONG_STEPS steps, loss and peak memory per 10
      L=${LONG_SEQ:-262144}; LD=/tmp/long$L; mkdir -p $LD
      gunzip -c out/longcorpus/corpus.txt.gz > $LD/corpus.txt
      cfg=configs/bing_bert/ds_sa_bert_base_seq262144.json
      python3 - "$cfg" "${LONG_STEPS:-200}" "$LD/ds.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["scheduler"]["params"]["total_num_steps"] = int(sys.argv[2])
cfg["tensorboard"]["enabled"] = False
json.dump(cfg, open(sys.argv[3], "w"), indent=2)
PY
      long_run() {  # long_run OUT_NAME STEPS TIMEOUT [extra flags]: the example at length L
        INPUT=$LD/corpus.txt VOCAB=out/longcorpus/vocab.txt DATA_DIR=$LD/data OUT_DIR=$LD/$1 \
          DS_CONFIG=$LD/ds.json STEPS=$2 timeout "$3" \
          bash examples/bing_bert/ds_sa_train_bert_gpu.sh base $L --activation_checkpointing \
          --tiled_mlp 16 --tiled_loss 16 --lamb ${LONG_LAMB:-auto} --eval_every 0 --save_every 0 --no_progress_bar "${@:4}"
      }
      long_run run ${LONG_STEPS:-200} ${LONG_TIMEOUT:-400} > "$OUT/longseq_$L.log" 2>&1
      echo "longseq $L exit $?"; grep -E "instances|model:|error|Error" "$OUT/longseq_$L.log" | head -8
      cp $LD/run/metrics.jsonl "$OUT/longseq_${L}_metrics.jsonl" && \
        python3 -c "import json,sys; [print(r) for r in map(json.loads, open(sys.argv[1]))]" \
        "$OUT/longseq_${L}_metrics.jsonl" | tail -n 30
      if [ "${LONG_DENSE_STEPS:-0}" -gt 0 ]; then  # dense attention at the same length
        DENSE=1 long_run dense $LONG_DENSE_STEPS ${LONG_DENSE_TIMEOUT:-300} --log_every 1 \
          > "$OUT/longseq_dense_$L.log" 2>&1
        echo "longseq dense $L exit $?"; grep -E "error|Error" "$OUT/longseq_dense_$L.log" | head -5
        cp $LD/dense/metrics.jsonl "$OUT/longseq_dense_${L}_metrics.jsonl" && cat "$_"
      fi ;;
    launch)
      python3 scripts/dev/bench_launch.py 2>&1 | tee "$OUT/bench_launch.log" ;;
    split)
      for seq in 4096 16384; do
        timeout "${SPLIT_TIMEOUT:-150}" python3 scripts/dev/profile_bert_step.py --seq $seq --split
      done 2>&1 | tee "$OUT/host_gpu_split.log" ;;
    tests)
      timeout "${TESTS_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider \
        ${TESTS:-tests/ops tests/modules} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    ptests)  # the same tests in six parallel groups (kernel compiles are CPU-bound): the
      # fused and packed-tile tests split four ways by test id (one group of them took over 4
      # minutes), then MatMul + Softmax, then the rest
      python3 -m pytest --collect-only -q -p no:cacheprovider tests/ops/test_fused_attention.py \
        tests/ops/test_packed_tiles.py | grep :: > "$OUT/fused_ids.txt"
      split -n r/4 "$OUT/fused_ids.txt" "$OUT/fused_ids_"
      i=0
      for ids in "$OUT"/fused_ids_a?; do
        i=$((i + 1))
        timeout "${TESTS_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider $(cat "$ids") \
          > "$OUT/gpu_tests_$i.log" 2>&1 &
      done
      for group in "tests/ops/test_matmul.py tests/ops/test_softmax.py tests/ops/test_deepspeed_contract.py" \
          "tests/ops/test_three_kernel_attention.py tests/ops/test_torch_backend.py tests/modules"; do
        i=$((i + 1))
        timeout "${TESTS_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider $group \
          > "$OUT/gpu_tests_$i.log" 2>&1 &
      done
      wait
      for f in "$OUT"/gpu_tests_*.log; do echo "== $f"; grep -E "^(FAILED|ERROR)" "$f" | head -20; tail -2 "$f"; done ;;
    table)
      TORCHDYNAMO_CACHE_SIZE_LIMIT=64 timeout "${TABLE_TIMEOUT:-300}" python3 \
        scripts/bench_attention.py ${TABLE_ARGS:---graph --no-flex --compare-packing --rounds 1} \
        --tag "${TABLE_TAG:-h100}" --outdir "$OUT" > "$OUT/bench_attention.log" 2>&1
      grep -E "^N=" "$OUT/bench_attention.log" | cut -c1-220; tail -n 2 "$OUT/bench_attention.log" ;;
    fixed16)
      for mode in none default; do
        timeout "${BENCH_TIMEOUT:-240}" python3 scripts/bench_bert_training.py --seqs 16384 \
          --variants dense_sdpa sparse_fixed16 sparse_fixed64 --compile $mode \
          --out "$OUT/bert_fixed16_$mode.json" > "$OUT/bert_fixed16_$mode.log" 2>&1
        tail -n 6 "$OUT/bert_fixed16_$mode.log"
      done ;;
    headdim)
      for d in ${HEAD_DIMS:-128 32}; do
        timeout "${TABLE_TIMEOUT:-300}" python3 scripts/bench_attention.py --head-dim $d \
          --rows 16384-bigbird-64 --sweep 16384-bigbird-64 --no-flex --graph --tag "hd$d" \
          --outdir "$OUT" > "$OUT/bench_attention_hd$d.log" 2>&1
        grep -E "^(sweep|N=)" "$OUT/bench_attention_hd$d.log" | cut -c1-400
      done ;;
    ncu)  # Nsight Compute on one fwd, dq and dk/dv launch per head_dim (NCU_DIMS, "64 128"),
      # BigBird 64 at 16384 (issue 21 target 5); the tables in $OUT/ncu_hd*.txt. ncu flushes
      # the caches before each replay by default: NCU_EXTRA="--cache-control none" keeps L2
      # as the previous kernels left it (the L2 hit rate a training step sees)
      for d in ${NCU_DIMS:-64 128}; do
        python3 scripts/dev/ncu_fused.py --head-dim $d | tee -a "$OUT/ncu_times.txt"
        timeout "${NCU_TIMEOUT:-240}" ncu --clock-control none --kernel-name regex:fused_attn \
          ${NCU_EXTRA:-} --profile-from-start off --section SpeedOfLight --section Occupancy \
          --section LaunchStats --section WarpStateStats --section SchedulerStats \
          --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
          python3 scripts/dev/ncu_fused.py --head-dim $d --no-time > "$OUT/ncu_hd$d.txt" 2>&1
        echo "ncu hd$d exit $?"; grep -E "fused_attn|Duration|Registers Per|Achieved Occ|Theoretical Occ|Compute \(SM\) Thr|Memory Thr|Eligible Warps|Issued Warp|No Eligible" "$OUT/ncu_hd$d.txt" | head -60
      done ;;
    cprofile)
      for v in dense_sdpa sparse_bigbird; do
        timeout 120 python3 scripts/dev/profile_bert_step.py --seq 4096 --variant $v --cprofile
      done > "$OUT/cprofile_step_4096.log" 2>&1
      grep -A45 "ordered by: internal time" "$OUT/cprofile_step_4096.log" | head -100 ;;
    multigpu)  # the example under `deepspeed --num_gpus N` (default: every GPU): BERT-base,
      # seq 4096, ZeRO-2 bf16 for MG_STEPS (200) steps, a resume from step 100, then ZeRO-3 fp16
      NG=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      MD=/tmp/multigpu; mkdir -p $MD
      MG_STEPS=${MG_STEPS:-200}  # ZeRO-2 steps (a checkpoint at 100, resumed to 106)
      python3 - "$MD" "$MG_STEPS" <<'PY'
import json, sys
md = sys.argv[1]
cfg = json.load(open("configs/bing_bert/ds_sa_bert_base_seq4096_zero2.json"))
cfg["scheduler"]["params"].update(total_num_steps=int(sys.argv[2]), warmup_num_steps=20)
cfg["tensorboard"]["enabled"] = False
json.dump(cfg, open(f"{md}/zero2_bf16.json", "w"), indent=2)
cfg["zero_optimization"] = {"stage": 3}
cfg["bf16"]["enabled"], cfg["fp16"]["enabled"] = False, True
json.dump(cfg, open(f"{md}/zero3_fp16.json", "w"), indent=2)
PY
      TRAIN=examples/bing_bert/ds_sa_train_bert_base_seq4096.sh
      NUM_GPUS=$NG DS_CONFIG=$MD/zero2_bf16.json OUT_DIR=$MD/zero2 STEPS=$MG_STEPS timeout 300 \
        bash $TRAIN --save_every 100 --log_every 1 --eval_every 100 --no_progress_bar \
        > "$OUT/multigpu_zero2.log" 2>&1; echo "zero2 exit $?"
      NUM_GPUS=$NG DS_CONFIG=$MD/zero2_bf16.json OUT_DIR=$MD/zero2_resumed STEPS=106 timeout 200 \
        bash $TRAIN --log_every 1 --eval_every 0 --no_progress_bar \
        --load_checkpoint_dir $MD/zero2/checkpoints --load_checkpoint_tag step_100 \
        > "$OUT/multigpu_zero2_resumed.log" 2>&1; echo "zero2 resume exit $?"
      NUM_GPUS=$NG DS_CONFIG=$MD/zero3_fp16.json OUT_DIR=$MD/zero3 STEPS=40 timeout 200 \
        bash $TRAIN --log_every 1 --eval_every 0 --no_progress_bar \
        > "$OUT/multigpu_zero3_fp16.log" 2>&1; echo "zero3 exit $?"
      cp $MD/zero2/metrics.jsonl "$OUT/multigpu_zero2_metrics.jsonl"
      cp $MD/zero2_resumed/metrics.jsonl "$OUT/multigpu_zero2_resumed_metrics.jsonl"
      cp $MD/zero3/metrics.jsonl "$OUT/multigpu_zero3_fp16_metrics.jsonl"
      python3 scripts/dev/check_two_gpu_run.py --world "$NG" --log "$OUT/multigpu_zero2.log" \
        --metrics $MD/zero2/metrics.jsonl --resumed-log "$OUT/multigpu_zero2_resumed.log" \
        --resumed-metrics $MD/zero2_resumed/metrics.jsonl --out "$OUT/multigpu_zero2_check.json"
      python3 scripts/dev/check_two_gpu_run.py --world "$NG" --log "$OUT/multigpu_zero3_fp16.log" \
        --metrics $MD/zero3/metrics.jsonl --out "$OUT/multigpu_zero3_fp16_check.json"
      (cd "$OUT" && tar czf multigpu.tgz multigpu_* && rm -f multigpu_*) ;;  # few files come back
    train)
      python3 - <<'PY'
import json
cfg = json.load(open("configs/bing_bert/ds_sa_bert_base_seq4096.json"))
cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] = 4
cfg["scheduler"]["params"]["total_num_steps"] = 200
cfg["scheduler"]["params"]["warmup_num_steps"] = 20
cfg["tensorboard"]["enabled"] = False  # tensorboard is not on the GPU image
json.dump(cfg, open("/tmp/ds_base_seq4096_short.json", "w"), indent=2)
PY
      DS_CONFIG=/tmp/ds_base_seq4096_short.json OUT_DIR=/tmp/train_base_seq4096 \
        timeout "${TRAIN_TIMEOUT:-200}" bash examples/bing_bert/ds_sa_train_bert_base_seq4096.sh \
        --lamb ${TRAIN_LAMB:-auto} --save_every 100000 > "$OUT/train_base_seq4096.log" 2>&1
      echo "train exit $?"; grep -E "step +[0-9]+|eval|loss" "$OUT/train_base_seq4096.log" | tail -12
      cp /tmp/train_base_seq4096/metrics.jsonl "$OUT/train_base_seq4096_metrics.jsonl" ;;
  esac
done
