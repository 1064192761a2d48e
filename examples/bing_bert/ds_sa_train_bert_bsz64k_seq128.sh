#!/bin/bash

# DeepSpeedExamples' bing_bert ds_sa_train_bert_bsz64k_seq128.sh (BERT-large, sequence 128,
# sparse attention, LAMB, bing_bert's "EE" learning-rate schedule) with only the paths
# changed: the same deepspeed_train.py command line, here on this example.
#
#   bash ds_sa_train_bert_bsz64k_seq128.sh                 # GPUs; data in /data/bert
#   TINY_CPU=1 bash ds_sa_train_bert_bsz64k_seq128.sh      # tiny BERT on CPU, 20 steps
#
# Environment (each has a default): CF (bing_bert config file), DS_CONFIG, DATA_PATH_PREFIX
# (prepare_data.py output at that folder or at <folder>/seq<MAX_SEQ_LENGTH>), OUTPUT_DIR,
# JOB_NAME, MAX_SEQ_LENGTH (128), MAX_STEPS (default: total_training_steps of the CF file),
# PRINT_STEPS (100), NUM_GPUS and MASTER_PORT (for the deepspeed launcher), LOG (the log file).
# TINY_CPU=1 switches the defaults to the tiny model on CPU (bert_tiny_lamb.json,
# configs/bing_bert/ds_sa_bert_tiny_cpu.json, stdlib data prepared on first use, 20 steps).
# Extra arguments go to deepspeed_train.py.
set -euo pipefail

base_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$base_dir/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-128}"

if [ "${TINY_CPU:-0}" = "1" ]; then
  export DS_ACCELERATOR=cpu
  CF="${CF:-$base_dir/bert_tiny_lamb.json}"
  DS_CONFIG="${DS_CONFIG:-$ROOT/configs/bing_bert/ds_sa_bert_tiny_cpu.json}"
  DATA_PATH_PREFIX="${DATA_PATH_PREFIX:-$ROOT/out/bing_bert/data/stdlib}"
  OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/out/bing_bert/tiny_lamb_seq$MAX_SEQ_LENGTH}"
  JOB_NAME="${JOB_NAME:-lamb_tiny_seq$MAX_SEQ_LENGTH}"
  MAX_STEPS="${MAX_STEPS:-20}"
  PRINT_STEPS="${PRINT_STEPS:-5}"
  NUM_GPUS="${NUM_GPUS:-1}"
  if [ ! -f "$DATA_PATH_PREFIX/meta.json" ] && [ ! -f "$DATA_PATH_PREFIX/seq$MAX_SEQ_LENGTH/meta.json" ]; then
    python "$base_dir/prepare_data.py" --output_dir "$DATA_PATH_PREFIX/seq$MAX_SEQ_LENGTH" \
      --max_seq_length "$MAX_SEQ_LENGTH"
  fi
fi

# Where should we save checkpoints and tensorboard events?
JOB_NAME="${JOB_NAME:-lamb_64k_seq128}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/out/bing_bert/bert_model_outputs}"
LOG="${LOG:-$OUTPUT_DIR/${JOB_NAME}.log}"

mkdir -p "$OUTPUT_DIR"

LAUNCHER=(deepspeed)
if [ -n "${NUM_GPUS:-}" ]; then LAUNCHER+=(--num_gpus "$NUM_GPUS"); fi
if [ -n "${MASTER_PORT:-}" ]; then LAUNCHER+=(--master_port "$MASTER_PORT"); fi
EXTRA=()
if [ -n "${MAX_STEPS:-}" ]; then EXTRA+=(--max_steps "$MAX_STEPS"); fi

NCCL_TREE_THRESHOLD=0 "${LAUNCHER[@]}" "${base_dir}/deepspeed_train.py" \
--cf "${CF:-${base_dir}/bert_large_lamb.json}" \
--max_seq_length "$MAX_SEQ_LENGTH" \
--output_dir "$OUTPUT_DIR" \
--deepspeed \
--deepspeed_sparse_attention \
--print_steps "${PRINT_STEPS:-100}" \
--lr_schedule "EE" \
--lr_offset 10e-4 \
--job_name "$JOB_NAME" \
--deepspeed_config "${DS_CONFIG:-$ROOT/configs/bing_bert/deepspeed_bsz64k_lamb_config_seq128.json}" \
--data_path_prefix "${DATA_PATH_PREFIX:-/data/bert}" \
${EXTRA[@]+"${EXTRA[@]}"} "$@" \
&> "$LOG" || { status=$?; tail -n 20 "$LOG" >&2; echo "failed (exit $status); log: $LOG" >&2; exit $status; }
echo "done; log: $LOG"
