"""Put sparse self-attention into a BERT model and pad/unpad around its encoder.

* transformers 5 ``Bert*``/``Roberta*`` models (any task head): switched to the
  ``"block_sparse"`` attention implementation of :mod:`sparse_attn.hf`, which takes any
  sequence length (it pads to the block inside the attention and cuts back).
* user BERT classes in the style of bing_bert (``model[.bert|.roberta].encoder.layer[i]
  .attention.self`` with ``query``/``key``/``value`` Linear layers, and a ``config`` with
  ``hidden_size``/``num_attention_heads``): each self-attention becomes
  ``BertSparseSelfAttention`` with the same weights, and the encoder gets hooks that pad its
  input (``hidden_states``, the attention mask) to a multiple of the block before it runs and
  cut its outputs back after, so neither the model's forward nor the training loop changes.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("sparse_attn.launcher")

_HOOK_FLAG = "_sparse_attn_padding_hooks"


def _is_transformers_model(model) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _sparse_layers(model: nn.Module):
    from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention

    return [m for m in model.modules() if isinstance(m, BertSparseSelfAttention)]


def find_encoder(model: nn.Module) -> nn.Module:
    """The module whose ``layer`` ModuleList holds the sparse self-attention layers."""
    from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention

    for module in model.modules():
        layers = getattr(module, "layer", None)
        if isinstance(layers, nn.ModuleList) and any(
                isinstance(m, BertSparseSelfAttention) for m in layers.modules()):
            return module
    raise ValueError(
        f"cannot find the encoder of {type(model).__name__}: expected a module with a "
        f"'layer' ModuleList holding BertSparseSelfAttention layers")


def _pad_mask(mask: torch.Tensor, seq: int, pad: int) -> torch.Tensor:
    """Pad an attention mask's key (and query) dimension; padded keys are dropped."""
    if mask.dtype == torch.bool:
        drop = False
    elif not mask.is_floating_point():
        drop = 0
    elif mask.dim() == 2 and bool(((mask == 0) | (mask == 1)).all()) \
            and not bool((mask == 0).all()):
        drop = 0.0  # a 0/1 keep mask
    else:
        drop = torch.finfo(mask.dtype).min  # additive (BERT's extended mask)
    if mask.shape[-1] != seq:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match the "
                         f"sequence length {seq}")
    mask = F.pad(mask, (0, pad), value=drop)
    if mask.dim() >= 3 and mask.shape[-2] == seq:  # a per-query mask: padded queries keep
        mask = F.pad(mask, (0, 0, 0, pad), value=0 if drop is not False else True)
    return mask


def _unpad(obj, padded: int, seq: int):
    if torch.is_tensor(obj):
        if obj.dim() >= 2 and obj.shape[1] == padded:
            return obj[:, :seq]
        return obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_unpad(o, padded, seq) for o in obj)
    if isinstance(obj, dict):
        for key in list(obj.keys()):
            obj[key] = _unpad(obj[key], padded, seq)
        return obj
    return obj


def add_encoder_padding(encoder: nn.Module, block: int) -> nn.Module:
    """Hooks on ``encoder`` (``forward(hidden_states, attention_mask, ...)``) that pad the
    sequence to a multiple of ``block`` (zero hidden states, masked keys) and cut every
    ``[batch, seq, ...]`` output back. Idempotent."""
    if getattr(encoder, _HOOK_FLAG, None) is not None:
        return encoder
    pending = []

    def pre_hook(module, args, kwargs):
        args = list(args)
        if args:
            hidden = args[0]
        else:
            hidden = kwargs.get("hidden_states")
        if not torch.is_tensor(hidden) or hidden.dim() != 3:
            pending.append(None)
            return None
        batch, seq = hidden.shape[:2]
        pad = (-seq) % block
        if pad == 0:
            pending.append(None)
            return None
        hidden = F.pad(hidden, (0, 0, 0, pad))
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden
        if len(args) > 1:
            mask = args[1]
        else:
            mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.zeros(batch, 1, 1, seq, dtype=hidden.dtype, device=hidden.device)
        mask = _pad_mask(mask, seq, pad)
        if len(args) > 1:
            args[1] = mask
        else:
            kwargs["attention_mask"] = mask
        pending.append((seq + pad, seq))
        return tuple(args), kwargs

    def post_hook(module, args, kwargs, output):
        job = pending.pop() if pending else None
        if job is None:
            return None
        return _unpad(output, *job)

    handles = (encoder.register_forward_pre_hook(pre_hook, with_kwargs=True),
               encoder.register_forward_hook(post_hook, with_kwargs=True))
    setattr(encoder, _HOOK_FLAG, handles)
    return encoder


def patch_bert_model(model: nn.Module, sparsity_config, *, pad_token_id: Optional[int] = None,
                     max_position: Optional[int] = None) -> nn.Module:
    """Make ``model``'s BERT self-attention block-sparse (in place); returns the model.

    ``max_position``: the longest sequence the model will see, where its layout is built
    (default: its position table). A model that already has ``BertSparseSelfAttention`` layers
    keeps them as they are. ``pad_token_id`` is accepted for symmetry with ``pad_to_block_size``; the encoder padding
    does not need it (padded positions are masked and cut off).
    """
    from sparse_attn.sparse_attention_utils import SparseAttentionUtils

    if _is_transformers_model(model):
        from sparse_attn import hf

        if max_position is None:
            hf.enable_sparse_attention(model, sparsity_config)
        else:
            SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
                model, max_position, sparsity_config)
        logger.info("%s: %d self-attention layers use block-sparse attention "
                    "(transformers attn_implementation %r)", type(model).__name__,
                    len(hf.self_attention_modules(model)), hf.ATTN_IMPLEMENTATION)
        return model

    if not _sparse_layers(model):
        if max_position is None:
            max_position = getattr(getattr(model, "config", None), "max_position_embeddings",
                                   None) or 2048
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
            model, max_position, sparsity_config)
        logger.info("%s: %d self-attention layers replaced by BertSparseSelfAttention",
                    type(model).__name__, len(_sparse_layers(model)))
    for layer in _sparse_layers(model):
        if layer.sparse_self_attention.sparsity_config.block != sparsity_config.block:
            raise ValueError(
                f"{type(model).__name__} already has sparse layers with block "
                f"{layer.sparse_self_attention.sparsity_config.block}, not "
                f"{sparsity_config.block}")
    add_encoder_padding(find_encoder(model), sparsity_config.block)
    return model
