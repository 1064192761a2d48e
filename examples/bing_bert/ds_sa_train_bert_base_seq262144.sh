#!/usr/bin/env bash
# BERT-base at sequence 262144 on one 80 GB GPU: BigBird block 64, micro-batch 1, every layer
# checkpointed, the feed-forward and the masked-LM loss in 16 pieces of the sequence; config
# configs/bing_bert/ds_sa_bert_base_seq262144.json. The BERT config gets 262144 positions.
# The standard library's docstrings hold about two such sequences: give more text with INPUT
# (text files) or DOCSTRINGS_OF (directories of Python modules, e.g. site-packages).
exec bash "$(dirname "${BASH_SOURCE[0]}")/ds_sa_train_bert_gpu.sh" base 262144 \
  --activation_checkpointing --tiled_mlp 16 --tiled_loss 16 "$@"
