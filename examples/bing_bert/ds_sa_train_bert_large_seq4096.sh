#!/usr/bin/env bash
# BERT-large, sequence 4096, block-sparse attention (bigbird block 64), config
# configs/bing_bert/ds_sa_bert_large_seq4096.json. NUM_GPUS=8 bash $0 for eight GPUs.
exec bash "$(dirname "${BASH_SOURCE[0]}")/ds_sa_train_bert_gpu.sh" large 4096 "$@"
