"""Block-sparse attention for Hugging Face transformers 5.x encoders.

transformers 5 models compute attention through a registry, ``AttentionInterface``: every
self-attention module projects query/key/value itself and then calls the function registered
under ``config._attn_implementation``. Importing this module registers one more entry,
``"block_sparse"`` (and the matching mask builder in ``AttentionMaskInterface``). A model
switched to it keeps all its modules and weights; only the attention computation changes.

    import sparse_attn.hf as sahf
    from sparse_attn import BigBirdSparsityConfig

    model = RobertaForSequenceClassification(config)          # or .from_pretrained(...)
    sahf.enable_sparse_attention(model, BigBirdSparsityConfig(num_heads=12, block=16))
    model(input_ids, attention_mask=mask)                      # any sequence length
    model.save_pretrained(path)
    model = sahf.from_pretrained(RobertaForSequenceClassification, path)   # sparse again

What a switched model does:

* It takes any sequence length: query, key and value are padded to a multiple of the block
  inside the attention function (padded keys are masked) and the output is cut back, so
  every output has the original length.
* The sparse settings live in ``config.sparse_attention`` (the layout class and its
  parameters, ``max_seq_length``, the sparse ``layers``) and ``config.json`` also records
  ``"attn_implementation": "block_sparse"``. Loading the saved model with plain
  ``cls.from_pretrained(path)`` in a process that imported ``sparse_attn.hf`` gives the
  sparse model again; without that import transformers refuses the unknown implementation
  (it never silently falls back to dense). ``from_pretrained(cls, path)`` here does the same
  and imports nothing else.
* The padding mask is the only mask honoured (encoders need no other); attention-probability
  dropout is not applied on sparse layers (the kernels never form the probabilities), as in
  DeepSpeed.

Sequences longer than one GPU holds: ``enable_sequence_parallel(model, P, micro_batch_size)``
runs the sparse attention under DeepSpeed's Ulysses sequence parallelism (each of ``P`` ranks
holds ``seq / P`` tokens); see ``sparse_attn.hf_sequence_parallel``.

Supported model types: ``SUPPORTED_MODEL_TYPES`` (BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
CamemBERT, and their task heads). Other models, decoders (``is_decoder``) and
cross-attention are rejected with a ``ValueError``.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

from torch import nn

from .hf_attention import (  # noqa: F401 (public here too)
    ATTN_IMPLEMENTATION, CONFIG_KEY, SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION,
    SPARSE_ATTN_IMPLEMENTATIONS, SUPPORTED_MODEL_TYPES, _DEFAULT_MAX_SEQ_LENGTH, _settings,
    _sparse_mask, register, sparse_attention_forward, sparsity_config_from_dict,
    sparsity_config_to_dict)
from .hf_sequence_parallel import (  # noqa: F401 (public here)
    enable_sequence_parallel, sequence_parallel_dataloader, sequence_parallel_loss_part,
    sequence_position_ids)
from .sparsity_config import SparsityConfig

import transformers  # after hf_attention, whose import names the version needed
from transformers import PreTrainedModel


# -- model-level helpers ---------------------------------------------------------------------
def _model_type(config) -> str:
    return getattr(config, "model_type", "") or ""


def check_supported(model: nn.Module) -> None:
    """Raise ValueError (with the reason) unless ``model`` can use block-sparse attention."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; use "
            f"SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention for "
            f"your own BERT")
    config = model.config
    mtype = _model_type(config)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"block-sparse attention supports the model types {SUPPORTED_MODEL_TYPES} "
            f"(encoders whose self-attention goes through transformers' AttentionInterface); "
            f"{type(model).__name__} has model_type {mtype!r}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            f"{type(model).__name__} is configured as a decoder (is_decoder / "
            f"add_cross_attention); block-sparse attention here supports bidirectional "
            f"encoders only")
    if not type(model)._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not dispatch through AttentionInterface")


def position_offset(embeddings: nn.Module) -> int:
    """Rows of the position table before position 0 (RoBERTa: ``padding_idx + 1``)."""
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def _base(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PreTrainedModel) else model


def _default_max_seq_length(model: nn.Module, block: int) -> int:
    length = _position_table_length(model)
    if length is None:
        length = getattr(model.config, "max_position_embeddings", _DEFAULT_MAX_SEQ_LENGTH)
    return max(block, -(-length // block) * block)


def self_attention_modules(model: nn.Module) -> List[nn.Module]:
    """The self-attention modules (``...SelfAttention``) of a supported model, in order."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("SelfAttention") and hasattr(m, "query")]


def _store(config, sparsity_config: SparsityConfig, max_seq_length: int,
           layers: Optional[Iterable[int]]) -> None:
    heads = config.num_attention_heads
    if sparsity_config.num_heads != heads:
        raise ValueError(
            f"sparsity_config has num_heads={sparsity_config.num_heads} but the model has "
            f"num_attention_heads={heads}; build the SparsityConfig with num_heads={heads}")
    if max_seq_length % sparsity_config.block:
        max_seq_length += sparsity_config.block - max_seq_length % sparsity_config.block
    data = {
        "sparsity_config": sparsity_config_to_dict(sparsity_config),
        "max_seq_length": int(max_seq_length),
        "layers": None if layers is None else sorted({int(i) for i in layers}),
    }
    setattr(config, CONFIG_KEY, data)
    _settings(config)  # validates the stored description and sets the load marker


def _position_table_length(model: nn.Module) -> Optional[int]:
    """Positions the model can embed (None: no learned position table found)."""
    emb = getattr(_base(model), "embeddings", None)
    table = getattr(emb, "position_embeddings", None) if emb is not None else None
    if isinstance(table, nn.Embedding):
        return table.num_embeddings - position_offset(emb)
    return None


def _check_layers(model: nn.Module, layers: Iterable[int]) -> List[int]:
    count = getattr(model.config, "num_hidden_layers", None)
    layers = list(layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or count is None \
                or not 0 <= i < count:
            raise ValueError(f"layers: {i!r} is not a layer of this model; it has {count} "
                             f"layers (0..{(count or 1) - 1})")
    if len(set(layers)) != len(layers):
        dup = sorted({i for i in layers if layers.count(i) > 1})
        raise ValueError(f"layers: {dup} given more than once (the model has {count} layers)")
    return layers


def enable_sparse_attention(model: nn.Module, sparsity_config,
                            max_seq_length: Optional[int] = None,
                            layers: Optional[Iterable[int]] = None) -> nn.Module:
    """Switch a transformers encoder (base model or any task head) to block-sparse attention.

    Args:
        model: a ``PreTrainedModel`` of one of ``SUPPORTED_MODEL_TYPES``.
        sparsity_config: the layout: a ``SparsityConfig`` whose ``num_heads`` is
            ``config.num_attention_heads``, or a ``"sparse_attention"`` JSON block (a dict,
            validated as the DeepSpeed config's block is, built for the model's heads).
        max_seq_length: longest sequence, at most the position table's length (default: that
            length).
        layers: indices of the layers made sparse (default: all); the others stay dense.

    The model is changed in place (weights untouched) and returned.
    """
    check_supported(model)
    if isinstance(sparsity_config, dict):
        from .config import parse_sparse_attention
        sparsity_config = parse_sparse_attention(sparsity_config).build(
            model.config.num_attention_heads)
    elif not isinstance(sparsity_config, SparsityConfig):
        raise TypeError(f"sparsity_config must be a SparsityConfig or a \"sparse_attention\" "
                        f"block (dict), got {type(sparsity_config).__name__}")
    if layers is not None:
        layers = _check_layers(model, layers)
    table = _position_table_length(model)
    if max_seq_length is None:
        max_seq_length = _default_max_seq_length(model, sparsity_config.block)
    elif table is not None and max_seq_length > table:
        raise ValueError(
            f"max_seq_length {max_seq_length} is above the model's {table} positions; extend "
            f"the position table first: SparseAttentionUtils.extend_position_embedding(model, "
            f"{max_seq_length})")
    _store(model.config, sparsity_config, max_seq_length, layers)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def enable_on_layers(config, layers: Iterable[nn.Module], sparsity_config: SparsityConfig,
                     max_seq_length: Optional[int] = None) -> None:
    """Make the given transformers layers (``...Layer`` modules of one model, sharing
    ``config``) sparse; the model's other layers keep dense attention."""
    indices = []
    for layer in layers:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        idx = getattr(attn, "layer_idx", None)
        if attn is None or idx is None:
            raise ValueError(f"{type(layer).__name__} has no attention.self with a layer_idx")
        if getattr(attn, "config", None) is not config:
            raise ValueError("the layers do not belong to a model with this config")
        indices.append(idx)
    if _model_type(config) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"block-sparse attention supports the model types {SUPPORTED_MODEL_TYPES}; got "
            f"{_model_type(config)!r}")
    if getattr(config, "is_decoder", False):
        raise ValueError("block-sparse attention here supports bidirectional encoders only")
    old = getattr(config, CONFIG_KEY, None)
    if isinstance(old, dict) and old.get("layers") is not None \
            and config._attn_implementation in SPARSE_ATTN_IMPLEMENTATIONS:
        indices = set(indices) | set(old["layers"])
    _store(config, sparsity_config, max_seq_length or _DEFAULT_MAX_SEQ_LENGTH, indices)
    config._attn_implementation = ATTN_IMPLEMENTATION


def disable_sparse_attention(model: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """Back to dense attention (``attn_implementation``); removes the stored settings."""
    config = model.config
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    config.__dict__.pop("attn_implementation", None)
    model.set_attn_implementation(attn_implementation)
    return model


def is_sparse(model: nn.Module) -> bool:
    """Whether ``model`` runs block-sparse attention."""
    config = getattr(model, "config", None)
    return (config is not None and config._attn_implementation in SPARSE_ATTN_IMPLEMENTATIONS
            and isinstance(getattr(config, CONFIG_KEY, None), dict))


def get_sparsity_config(model: nn.Module) -> Optional[SparsityConfig]:
    """The ``SparsityConfig`` a sparse model uses (None for a dense one)."""
    return _settings(model.config).sparsity_config if is_sparse(model) else None


def from_pretrained(cls, path, *args, **kwargs):
    """``cls.from_pretrained(path, ...)`` that restores block-sparse attention when the saved
    config holds ``sparse_attention`` settings (and loads a dense model as it was saved)."""
    if "attn_implementation" not in kwargs:
        config = kwargs.get("config")
        if config is None:
            config = transformers.AutoConfig.from_pretrained(path)
        if isinstance(getattr(config, CONFIG_KEY, None), dict):
            kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
    model = cls.from_pretrained(path, *args, **kwargs)
    if isinstance(getattr(model.config, CONFIG_KEY, None), dict) \
            and model.config._attn_implementation in SPARSE_ATTN_IMPLEMENTATIONS:
        _settings(model.config)
    return model
