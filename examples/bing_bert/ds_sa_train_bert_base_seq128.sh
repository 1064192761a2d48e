#!/usr/bin/env bash
# BERT-base, sequence 128, block-sparse attention (fixed block 16), config
# configs/bing_bert/ds_sa_bert_base_seq128.json. NUM_GPUS=8 bash $0 for eight GPUs.
exec bash "$(dirname "${BASH_SOURCE[0]}")/ds_sa_train_bert_gpu.sh" base 128 "$@"
