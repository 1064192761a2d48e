#!/usr/bin/env bash
# BERT pre-training with block-sparse attention on GPUs (bing_bert style). Called by the
# ds_sa_train_bert_{base,large}_seq{128,512,4096}.sh scripts:
#   ds_sa_train_bert_gpu.sh MODEL SEQ [extra deepspeed_train.py arguments]
# MODEL: base | large; SEQ: 128 | 512 | 4096 | 262144 (any with DS_CONFIG). Environment:
#   NUM_GPUS (1)  NUM_NODES/HOSTFILE (one node)  STEPS (the config's total_num_steps)
#   DATA_DIR, OUT_DIR, DS_CONFIG  INPUT (text files; default: Python stdlib docstrings)
#   DOCSTRINGS_OF (directories of Python modules whose docstrings are the corpus)
#   VOCAB (a vocab.txt; default: trained on the corpus)
#   DENSE=1: dense attention (no --deepspeed_sparse_attention), to compare against
# A SEQ past the BERT config's max_position_embeddings runs on a copy of the config with SEQ
# positions (OUT_DIR/bert_config.json).
set -euo pipefail
MODEL="$1"; SEQ="$2"; shift 2
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DS_CONFIG="${DS_CONFIG:-$ROOT/configs/bing_bert/ds_sa_bert_${MODEL}_seq${SEQ}.json}"
DATA_DIR="${DATA_DIR:-$ROOT/out/bing_bert/data/stdlib_seq$SEQ}"
OUT_DIR="${OUT_DIR:-$ROOT/out/bing_bert/${MODEL}_seq${SEQ}}"
NUM_GPUS="${NUM_GPUS:-1}"
STEPS="${STEPS:-$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['scheduler']['params']['total_num_steps'])" "$DS_CONFIG")}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "$DATA_DIR/meta.json" ]; then
  PREP=(--output_dir "$DATA_DIR" --max_seq_length "$SEQ")
  if [ -n "${INPUT:-}" ]; then PREP+=(--input $INPUT); fi
  if [ -n "${VOCAB:-}" ]; then PREP+=(--vocab "$VOCAB"); fi
  if [ -n "${DOCSTRINGS_OF:-}" ]; then PREP+=(--docstrings_of $DOCSTRINGS_OF); fi
  # long sequences from short documents: merge modules to about 10 characters x SEQ (4 past
  # 65536: a corpus of 10 x 262144 characters per sequence is more text than there is)
  if [ "$SEQ" -gt 65536 ]; then PREP+=(--min_doc_chars $((SEQ * 4)) --dupe_factor ${DUPE_FACTOR:-2} --eval_fraction 0.1)
  elif [ "$SEQ" -gt 512 ] && [ -z "${INPUT:-}" ]; then PREP+=(--min_doc_chars $((SEQ * 10)) --dupe_factor 10 --eval_fraction 0.1); fi
  python "$HERE/prepare_data.py" "${PREP[@]}"
fi
mkdir -p "$OUT_DIR"
BERT_CONFIG="${BERT_CONFIG:-$HERE/bert_config_${MODEL}.json}"
BERT_CONFIG="$(python - "$BERT_CONFIG" "$SEQ" "$OUT_DIR/bert_config.json" <<'PY'
import json, sys
path, seq, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = json.load(open(path))
if cfg.get("max_position_embeddings", 512) < seq:
    cfg["max_position_embeddings"] = seq
    json.dump(cfg, open(out, "w"), indent=2)
    print(out)
else:
    print(path)
PY
)"
case " $* " in
  *" --load_checkpoint_dir"*) ;;            # resuming: keep the curve so far
  *) rm -f "$OUT_DIR/metrics.jsonl" ;;
esac
SPARSE=(--deepspeed_sparse_attention)
if [ "${DENSE:-0}" = 1 ]; then SPARSE=(); fi
LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29518}")
if [ -n "${HOSTFILE:-}" ]; then LAUNCH=(deepspeed --hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}" --num_gpus "$NUM_GPUS"); fi
"${LAUNCH[@]}" "$HERE/deepspeed_train.py" \
  "${SPARSE[@]}" \
  --deepspeed_config "$DS_CONFIG" \
  --bert_config "$BERT_CONFIG" \
  --data_dir "$DATA_DIR" \
  --output_dir "$OUT_DIR" \
  --max_seq_length "$SEQ" \
  --max_steps "$STEPS" \
  --log_every 10 \
  --eval_every 100 \
  --save_every 500 \
  --job_name "bing_bert_${MODEL}_seq${SEQ}" \
  "$@" 2>&1 | tee -a "$OUT_DIR/train.log"
