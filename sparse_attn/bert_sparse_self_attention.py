"""``BertSparseSelfAttention``: a BERT self-attention layer (query/key/value projections) whose
attention is block-sparse. A drop-in for the ``attention.self`` module of a user's own BERT
(as in DeepSpeed's bing_bert example), called as ``layer(hidden_states, attention_mask)``.

For Hugging Face transformers models use :mod:`sparse_attn.hf` (or
``SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention``, which routes
transformers models there): it keeps the model's own modules and weights and plugs the sparse
attention into transformers' attention interface.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .sparse_self_attention import SparseSelfAttention
from .sparsity_config import FixedSparsityConfig, SparsityConfig


class BertSparseSelfAttention(nn.Module):
    """BERT self-attention with block-sparse attention.

    Args:
        config: any object with ``hidden_size``, ``num_attention_heads`` and (optionally)
            ``max_position_embeddings`` (the longest sequence, default 2048), e.g. a
            ``transformers.BertConfig`` or bing_bert's config.
        sparsity_config: the layout; its ``num_heads`` must equal
            ``config.num_attention_heads``.

    ``forward(hidden_states, attention_mask=None)`` takes ``[batch, seq, hidden]`` and BERT's
    additive extended mask (``[batch, 1, 1, seq]`` or ``[batch, seq]``: 0 keeps, a large
    negative value drops; a bool mask means ``True`` keeps) and returns the context layer
    ``[batch, seq, hidden]``. ``seq`` must be a multiple of ``sparsity_config.block``
    (``SparseAttentionUtils.pad_to_block_size``). There is no dropout on the attention
    probabilities (the block-sparse kernels never form them), as in DeepSpeed.
    """

    def __init__(self, config, sparsity_config: SparsityConfig = FixedSparsityConfig(num_heads=4)):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        if hidden % heads != 0:
            raise ValueError(
                f"the hidden size ({hidden}) is not a multiple of the number of attention heads "
                f"({heads})")
        if sparsity_config.num_heads != heads:
            raise ValueError(
                f"sparsity_config has num_heads={sparsity_config.num_heads} but the model has "
                f"num_attention_heads={heads}; build the SparsityConfig with num_heads={heads}")
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = hidden

        self.query = nn.Linear(hidden, self.all_head_size)
        self.key = nn.Linear(hidden, self.all_head_size)
        self.value = nn.Linear(hidden, self.all_head_size)

        max_seq_length = getattr(config, "max_position_embeddings", None) or 2048
        self.sparse_self_attention = SparseSelfAttention(
            sparsity_config, key_padding_mask_mode="add", max_seq_length=max_seq_length)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> ``[batch, heads, seq, head_dim]``."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        context = self.sparse_self_attention(query_layer, key_layer, value_layer,
                                             key_padding_mask=attention_mask)
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.all_head_size)
