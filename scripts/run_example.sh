#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the main job: bing_bert pre-training of a tiny BERT
# with block-sparse attention (Fixed layout, block 16, sequence 512) through the real
# `deepspeed` launcher on CPU. Extra arguments go to the training script, e.g. --max_steps 100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec bash examples/bing_bert/ds_sa_train_bert_tiny_cpu.sh "$@"
