#!/usr/bin/env bash
# Tiny BERT (2 layers, hidden 128, 2 heads) pre-training with block-sparse attention on CPU:
# sequence 512, Fixed layout with block 16 (configs/bing_bert/ds_sa_bert_tiny_cpu.json),
# 500 steps, a few minutes on 2 cores. Data: docstrings of Python's standard library
# (prepared on first use). Pass extra training arguments after the script name, e.g.
#   bash ds_sa_train_bert_tiny_cpu.sh --max_steps 100
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SEQ=512
DATA_DIR="${DATA_DIR:-$ROOT/out/bing_bert/data/stdlib_seq$SEQ}"
OUT_DIR="${OUT_DIR:-$ROOT/out/bing_bert/tiny_cpu_seq$SEQ}"
DS_CONFIG="${DS_CONFIG:-$ROOT/configs/bing_bert/ds_sa_bert_tiny_cpu.json}"
export DS_ACCELERATOR=cpu
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "$DATA_DIR/meta.json" ]; then
  python "$HERE/prepare_data.py" --output_dir "$DATA_DIR" --max_seq_length $SEQ
fi
mkdir -p "$OUT_DIR"
case " $* " in
  *" --load_checkpoint_dir"*) ;;            # resuming: keep the curve so far
  *) rm -f "$OUT_DIR/metrics.jsonl" ;;
esac
deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29517}" "$HERE/deepspeed_train.py" \
  --deepspeed_sparse_attention \
  --deepspeed_config "$DS_CONFIG" \
  --bert_config "$HERE/bert_config_tiny.json" \
  --data_dir "$DATA_DIR" \
  --output_dir "$OUT_DIR" \
  --max_seq_length $SEQ \
  --max_steps 500 \
  --log_every 10 \
  --eval_every 100 \
  --save_every 100 \
  "$@" 2>&1 | tee -a "$OUT_DIR/train.log"
