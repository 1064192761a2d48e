"""``SparseAttentionUtils``: adapting pre-trained BERT/RoBERTa models to sparse attention.

The static methods keep DeepSpeed's names and signatures. They work on

* Hugging Face transformers 5.x models (``BertModel``, ``RobertaModel`` and their task heads,
  plus the other families of ``sparse_attn.hf.SUPPORTED_MODEL_TYPES``): these keep their own
  modules and weights and switch to the ``"block_sparse"`` attention implementation
  (:mod:`sparse_attn.hf`), which pads to the block inside, so they take any length;
* a user's own BERT (DeepSpeed's bing_bert style: ``model.bert.encoder.layer[i].attention.self``
  with ``query``/``key``/``value`` Linear layers): the self-attention modules are replaced by
  :class:`BertSparseSelfAttention` holding the same weights; the caller pads the inputs with
  ``pad_to_block_size`` and unpads the output with ``unpad_sequence_output``.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .bert_sparse_self_attention import BertSparseSelfAttention
from .sparsity_config import SparsityConfig

logger = logging.getLogger(__name__)


def _is_transformers_model(model) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _is_transformers_module(module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _base_model(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder`` (BERT/RoBERTa/... or the model)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and hasattr(base, "embeddings"):
        return base
    for name in ("bert", "roberta", "electra", "encoder_model"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module) and hasattr(sub, "embeddings"):
            return sub
    if hasattr(model, "embeddings"):
        return model
    raise ValueError(
        f"cannot find the embeddings of {type(model).__name__}: expected a BERT/RoBERTa model "
        f"(model.bert, model.roberta, or a model with .embeddings)")


def _position_offset(model: nn.Module, embeddings: nn.Module) -> int:
    padding_idx = getattr(embeddings, "padding_idx", None)
    if padding_idx is not None:
        return int(padding_idx) + 1
    return 2 if hasattr(model, "roberta") else 0


def _encoder_layers(model: nn.Module):
    for path in (("bert",), ("roberta",), ()):
        m = model
        for name in path:
            m = getattr(m, name, None)
        encoder = getattr(m, "encoder", None) if m is not None else None
        layers = getattr(encoder, "layer", None) if encoder is not None else None
        if layers is not None:
            return layers
    raise ValueError(
        f"{type(model).__name__} is not a supported model: sparse self-attention can replace "
        f"the self-attention of BERT- and RoBERTa-based models (model.bert.encoder.layer, "
        f"model.roberta.encoder.layer or model.encoder.layer); for another structure replace "
        f"the attention modules with BertSparseSelfAttention yourself")


def _keep_mask_kind(mask: torch.Tensor) -> bool:
    """True if ``mask`` is a keep-mask (1 keeps, 0 drops), False if it is additive."""
    if mask.dtype == torch.bool or not mask.is_floating_point():
        return True
    if bool((mask < 0).any()):
        return False
    if bool((mask == 0).all()):
        return False  # an all-zero additive mask: keeps everything
    return bool(((mask == 0) | (mask == 1)).all())


class SparseAttentionUtils:
    """Utilities to use sparse self-attention in pre-trained BERT/RoBERTa models (static)."""

    @staticmethod
    def extend_position_embedding(model: nn.Module, max_position: int) -> nn.Module:
        """Extend the position embeddings of a BERT/RoBERTa model to ``max_position`` tokens.

        The trained table is repeated to fill the new length (position ``p`` starts from the
        trained embedding of ``p % original_length``), which converges faster than a random
        start. RoBERTa's leading rows (``padding_idx + 1`` of them, 2 for RoBERTa: the padding
        position and the one before position 0) are kept in front and not repeated.
        ``config.max_position_embeddings`` becomes ``max_position`` (+ that offset), and the
        ``position_ids`` / ``token_type_ids`` buffers are rebuilt at the new length. Returns
        the model (changed in place).
        """
        if not isinstance(max_position, int) or max_position < 1:
            raise ValueError(f"max_position must be a positive integer, got {max_position!r}")
        base = _base_model(model)
        emb = base.embeddings
        table = getattr(emb, "position_embeddings", None)
        if not isinstance(table, nn.Embedding):
            raise ValueError(
                f"{type(emb).__name__} has no position_embeddings table (nn.Embedding) to extend")
        offset = _position_offset(model, emb)
        old = table.weight
        original = old.shape[0] - offset
        if max_position < original:
            raise ValueError(
                f"max_position={max_position} is smaller than the current {original} positions; "
                f"extend_position_embedding only extends")
        new_size = max_position + offset
        if max_position > original:
            new = nn.Embedding(new_size, old.shape[1], padding_idx=table.padding_idx,
                               device=old.device, dtype=old.dtype)
            with torch.no_grad():
                new.weight[:offset] = old[:offset]
                index = torch.arange(max_position, device=old.device) % original + offset
                new.weight[offset:] = old[index]
            new.weight.requires_grad_(old.requires_grad)
            emb.position_embeddings = new
            logger.info("extended position embeddings from %d to %d positions (offset %d)",
                        original, max_position, offset)
        for name in ("position_ids", "token_type_ids"):
            buf = emb._buffers.get(name) if hasattr(emb, "_buffers") else None
            if buf is None or buf.shape[-1] == new_size:
                continue
            if name == "position_ids":
                value = torch.arange(new_size, dtype=buf.dtype, device=buf.device).expand(1, -1)
            else:
                value = torch.zeros(1, new_size, dtype=buf.dtype, device=buf.device)
            setattr(emb, name, value)
        for config in {id(c): c for c in (getattr(model, "config", None),
                                          getattr(base, "config", None))
                       if c is not None}.values():
            if hasattr(config, "max_position_embeddings"):
                config.max_position_embeddings = new_size
            sparse = getattr(config, "sparse_attention", None)
            if isinstance(sparse, dict) and sparse.get("max_seq_length", 0) < max_position:
                block = sparse["sparsity_config"].get("block", 16)
                sparse["max_seq_length"] = -(-max_position // block) * block
        return model

    @staticmethod
    def update_tokenizer_model_max_length(tokenizer, max_position: int):
        """Set the tokenizer's ``model_max_length`` (also in what ``save_pretrained`` writes)
        to ``max_position``; returns the tokenizer."""
        tokenizer.model_max_length = max_position
        init_kwargs = getattr(tokenizer, "init_kwargs", None)
        if isinstance(init_kwargs, dict):
            init_kwargs["model_max_length"] = max_position
        return tokenizer

    @staticmethod
    def replace_model_self_attention_with_sparse_self_attention(
            model: nn.Module, max_position: int,
            sparsity_config: SparsityConfig = SparsityConfig(num_heads=4)) -> nn.Module:
        """Make every self-attention layer of a BERT/RoBERTa model block-sparse, keeping the
        trained query/key/value weights; ``max_position`` is the longest sequence.

        * transformers models (any supported family and task head): switched to the
          ``"block_sparse"`` attention implementation (:func:`sparse_attn.hf.enable_sparse_attention`);
          the model then takes any length and saves/loads sparse. If its position table is
          shorter than ``max_position`` it is extended first (``extend_position_embedding``).
        * a user's own BERT (``model.bert``/``model.roberta``/``model``
          ``.encoder.layer[i].attention.self``): those modules become
          ``BertSparseSelfAttention`` with the same weights.

        Returns the model (changed in place).
        """
        if _is_transformers_model(model):
            from . import hf

            hf.check_supported(model)
            emb = _base_model(model).embeddings
            table = getattr(emb, "position_embeddings", None)
            if isinstance(table, nn.Embedding) and \
                    table.num_embeddings - _position_offset(model, emb) < max_position:
                SparseAttentionUtils.extend_position_embedding(model, max_position)
            return hf.enable_sparse_attention(model, sparsity_config, max_seq_length=max_position)
        layers = _encoder_layers(model)
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"{type(model).__name__} has no .config (hidden_size, "
                             f"num_attention_heads)")
        SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
            config, layers, sparsity_config, max_seq_length=max_position)
        return model

    @staticmethod
    def replace_self_attention_layer_with_sparse_self_attention_layer(
            config, layers, sparsity_config: SparsityConfig = SparsityConfig(num_heads=4),
            max_seq_length: Optional[int] = None):
        """Make the self-attention of each layer in ``layers`` block-sparse, keeping its
        query/key/value weights.

        ``layers`` are encoder layers with ``layer.attention.self`` (e.g.
        ``model.bert.encoder.layer``, or a subset of it). transformers layers keep their
        modules: the model (which shares ``config``) switches to the ``"block_sparse"``
        implementation for those layers only (:func:`sparse_attn.hf.enable_on_layers`). Other
        layers get a :class:`BertSparseSelfAttention`. ``max_seq_length`` defaults to
        ``config.max_position_embeddings``. Returns ``layers``.
        """
        given, layers = layers, list(layers)
        if not layers:
            return given
        selfs = [getattr(getattr(layer, "attention", None), "self", None) for layer in layers]
        from_transformers = [_is_transformers_module(m) for m in selfs]
        if all(from_transformers):
            from . import hf

            if max_seq_length is None:
                max_seq_length = getattr(config, "max_position_embeddings", None)
            hf.enable_on_layers(config, layers, sparsity_config, max_seq_length=max_seq_length)
            return given
        if any(from_transformers):
            raise ValueError("the layers mix transformers modules and other modules; pass the "
                             "layers of one model")
        for layer in layers:
            old = getattr(getattr(layer, "attention", None), "self", None)
            if old is None or not all(isinstance(getattr(old, n, None), nn.Linear)
                                      for n in ("query", "key", "value")):
                raise ValueError(
                    f"{type(layer).__name__} has no attention.self with query/key/value Linear "
                    f"layers to replace")
            new = BertSparseSelfAttention(config, sparsity_config)
            if max_seq_length is not None:
                new.sparse_self_attention.max_seq_length = max_seq_length
            ref = old.query.weight
            new.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                for name in ("query", "key", "value"):
                    getattr(new, name).weight.copy_(getattr(old, name).weight)
                    getattr(new, name).bias.copy_(getattr(old, name).bias)
            new.train(old.training)
            layer.attention.self = new
        return given

    @staticmethod
    def pad_to_block_size(block_size: int, input_ids: Optional[torch.Tensor],
                          attention_mask: Optional[torch.Tensor],
                          token_type_ids: Optional[torch.Tensor],
                          position_ids: Optional[torch.Tensor],
                          inputs_embeds: Optional[torch.Tensor], pad_token_id: int,
                          model_embeddings: Optional[nn.Module]) -> Tuple:
        """Pad the sequence dimension to a multiple of ``block_size``.

        Returns ``(pad_len, input_ids, attention_mask, token_type_ids, position_ids,
        inputs_embeds)``. ``input_ids`` are padded with ``pad_token_id``; ``token_type_ids``
        with 0; ``position_ids`` with ``pad_token_id`` (RoBERTa's padding position; the padded
        tokens are masked so their positions do not matter); ``inputs_embeds`` with the word
        embedding of ``pad_token_id`` (``model_embeddings.word_embeddings``, or
        ``model_embeddings`` itself when it is an ``nn.Embedding``).

        ``attention_mask`` may be a keep-mask (bool / integer / 0-1 float, ``[batch, seq]``) or
        an additive mask (BERT's extended ``[batch, 1, 1, seq]``: 0 keeps, negative drops); the
        padded positions are dropped in either convention (0 for keep-masks, the dtype's
        minimum for additive masks). When ``attention_mask`` is None and padding is added, a
        ``[batch, seq + pad_len]`` 0/1 keep-mask (long) is returned so that the padding is
        masked.
        """
        if input_ids is not None:
            batch, seq = input_ids.shape[:2]
            device = input_ids.device
        elif inputs_embeds is not None:
            batch, seq = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        else:
            raise ValueError("pass input_ids or inputs_embeds")
        pad_len = (block_size - seq % block_size) % block_size
        if pad_len == 0:
            return 0, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
        logger.debug("padding sequence length %d to %d (block %d)", seq, seq + pad_len,
                     block_size)
        if input_ids is not None:
            input_ids = F.pad(input_ids, (0, pad_len), value=pad_token_id)
        if inputs_embeds is not None:
            pad_ids = torch.full((batch, pad_len), pad_token_id, dtype=torch.long,
                                 device=device)
            word = getattr(model_embeddings, "word_embeddings", model_embeddings)
            if word is None:
                raise ValueError("padding inputs_embeds needs model_embeddings")
            pad_embeds = word(pad_ids).to(inputs_embeds.dtype)
            inputs_embeds = torch.cat([inputs_embeds, pad_embeds], dim=-2)
        if position_ids is not None:
            position_ids = F.pad(position_ids, (0, pad_len), value=pad_token_id)
        if token_type_ids is not None:
            token_type_ids = F.pad(token_type_ids, (0, pad_len), value=0)
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq + pad_len, dtype=torch.long, device=device)
            attention_mask[:, seq:] = 0
        elif _keep_mask_kind(attention_mask):
            attention_mask = F.pad(attention_mask, (0, pad_len), value=0)
        else:
            attention_mask = F.pad(attention_mask, (0, pad_len),
                                   value=torch.finfo(attention_mask.dtype).min)
        return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

    @staticmethod
    def unpad_sequence_output(pad_len: int, sequence_output: torch.Tensor) -> torch.Tensor:
        """Drop the last ``pad_len`` positions of ``[batch, seq, ...]`` (no-op for 0)."""
        if pad_len > 0:
            sequence_output = sequence_output[:, :-pad_len]
        return sequence_output
