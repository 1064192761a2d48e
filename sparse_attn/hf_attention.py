"""What transformers calls for a model switched to block-sparse attention: the attention
function and the mask builder registered as ``"block_sparse"`` (in ``AttentionInterface`` and
``AttentionMaskInterface``), and the sparse settings they read from ``config.sparse_attention``.
Registered on import. The model-level API (``enable_sparse_attention`` ...) is ``sparse_attn.hf``.

The same function is registered a second time, as ``"block_sparse_ulysses"``: the name that
``sparse_attn.hf.enable_sequence_parallel`` hands to DeepSpeed's Ulysses, which replaces that
name's entry process-wide with its all-to-all wrapper. A model on ``"block_sparse"`` never goes
through the wrapper, whatever else the process runs. Under Ulysses the function receives the
full sequence of ``heads / P`` heads and a ``SequenceParallelForward`` (the rank's place and the
gathered key padding mask) in its keyword arguments; see ``sparse_attention_forward``.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import sparsity_config as _sc
from .sequence_parallel import HeadSliceLayout
from .sparse_self_attention import SparseSelfAttention, squeeze_key_padding_mask
from .sparsity_config import SparsityConfig

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "sparse_attn.hf needs transformers>=5: pip install 'transformers>=5,<6'") from err

ATTN_IMPLEMENTATION = "block_sparse"
# The name given to DeepSpeed's Ulysses as its core attention (it wraps that name's entry).
SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION = "block_sparse_ulysses"
SPARSE_ATTN_IMPLEMENTATIONS = (ATTN_IMPLEMENTATION, SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION)
# The keyword argument that carries a SequenceParallelForward down to the attention function.
SEQUENCE_PARALLEL_KWARG = "sparse_attention_sequence_parallel"
CONFIG_KEY = "sparse_attention"
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")

_DEFAULT_MAX_SEQ_LENGTH = 2048
logger = logging.getLogger(__name__)
_told_about_dropout = False
_told_about_attentions = False


# -- sparsity config <-> JSON ----------------------------------------------------------------
def sparsity_config_to_dict(config: SparsityConfig) -> Dict[str, Any]:
    """A JSON-ready description of ``config``: ``{"class": name, **constructor arguments}``.

    Classes of :mod:`sparse_attn.sparsity_config` are stored by name; a user-defined subclass
    as ``"module.QualName"`` (its module must be importable when the model is loaded, and its
    constructor arguments must be stored as attributes of the same names).
    """
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"expected a SparsityConfig, got {type(config).__name__}")
    cls = type(config)
    if getattr(_sc, cls.__name__, None) is cls:
        name = cls.__name__
    else:
        name = f"{cls.__module__}.{cls.__qualname__}"
    params = {k: v for k, v in vars(config).items() if k != "num_layout_heads"}
    params = json.loads(json.dumps(params))  # tuples -> lists; fails early if not JSON
    return {"class": name, **params}


def sparsity_config_from_dict(data: Dict[str, Any]) -> SparsityConfig:
    """Inverse of :func:`sparsity_config_to_dict`."""
    data = dict(data)
    name = data.pop("class", None)
    if not isinstance(name, str):
        raise ValueError(f"a stored sparsity config needs a 'class' name, got {name!r}")
    if "." not in name:
        cls = getattr(_sc, name, None)
    else:
        module, _, qualname = name.rpartition(".")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, SparsityConfig)):
        raise ValueError(f"{name!r} is not a SparsityConfig class")
    return cls(**data)


# -- the settings stored in the model config -------------------------------------------------
class _Settings:
    """Parsed ``config.sparse_attention`` with its (shared) ``SparseSelfAttention``."""

    def __init__(self, data: Dict[str, Any]):
        self.sparsity_config = sparsity_config_from_dict(data["sparsity_config"])
        self.max_seq_length = int(data.get("max_seq_length") or _DEFAULT_MAX_SEQ_LENGTH)
        layers = data.get("layers")
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.attention = SparseSelfAttention(self.sparsity_config, key_padding_mask_mode="add",
                                             max_seq_length=self.max_seq_length)
        self._head_slices: Dict[Tuple[int, int], SparseSelfAttention] = {}

    def head_slice(self, rank: int, size: int) -> SparseSelfAttention:
        """The attention over heads ``[rank * H / size, (rank + 1) * H / size)`` of the layout
        (built once, at ``max_seq_length``, and cut from that very tensor; cached)."""
        key = (rank, size)
        attention = self._head_slices.get(key)
        if attention is None:
            heads = self.sparsity_config.num_heads // size
            local = HeadSliceLayout(self.attention.master_layout, self.sparsity_config.block,
                                    rank * heads, (rank + 1) * heads,
                                    self.sparsity_config.attention)
            attention = self._head_slices[key] = SparseSelfAttention(
                local, key_padding_mask_mode="add", max_seq_length=self.max_seq_length)
        return attention


@dataclass(frozen=True)
class SequenceParallelForward:
    """What one forward pass under DeepSpeed Ulysses tells the attention function, passed as
    the keyword argument ``sparse_attention_sequence_parallel`` (set by the forward pre-hook
    that ``sparse_attn.hf.enable_sequence_parallel`` installs).

    ``rank`` of ``size`` (``P``) in the sequence process group: after the all-to-all this rank
    holds heads ``[rank * H / P, (rank + 1) * H / P)`` of the full sequence.
    ``key_padding_mask``: the FULL sequence's padding mask gathered from the ranks' shards,
    additive float32 ``[batch, 1, 1, seq]`` (0 keeps, float32's minimum drops), or None when
    no rank has padding.
    """

    rank: int
    size: int
    key_padding_mask: Optional[torch.Tensor] = None


_SETTINGS_CACHE: Dict[str, _Settings] = {}
_BY_CONFIG: Dict[int, Tuple[Any, dict, _Settings]] = {}


def _settings(config) -> _Settings:
    data = getattr(config, CONFIG_KEY, None)
    if not isinstance(data, dict):
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs config.{CONFIG_KEY}; use "
            f"sparse_attn.hf.enable_sparse_attention(model, sparsity_config)")
    # fast path: the same config, its block unchanged since it was parsed. Keyed on the config
    # object: torch.compile (2.11) cannot trace id() of a dict. Under compile the equality
    # check is left to dynamo's guards.
    hit = _BY_CONFIG.get(id(config))
    if hit is not None and hit[0] is config and (torch.compiler.is_compiling() or
                                                 hit[1] == data):
        settings = hit[2]
    else:
        key = json.dumps(data, sort_keys=True)
        settings = _SETTINGS_CACHE.get(key)
        if settings is None:
            if len(_SETTINGS_CACHE) > 64:
                _SETTINGS_CACHE.clear()
            settings = _SETTINGS_CACHE[key] = _Settings(data)
        if len(_BY_CONFIG) > 256:
            _BY_CONFIG.clear()
        _BY_CONFIG[id(config)] = (config, copy.deepcopy(data), settings)
    return settings


# -- the functions registered with transformers ----------------------------------------------
def _sparse_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function=bidirectional_mask_function,
                 attention_mask: Optional[torch.Tensor] = None, dtype=torch.float32,
                 **kwargs) -> Optional[torch.Tensor]:
    """Mask builder for ``AttentionMaskInterface``: the 2-D padding mask as BERT's additive
    extended mask ``[batch, 1, 1, kv]`` (0 keeps, float32's minimum drops), or None.

    float32 whatever the model's dtype: the kernels read the mask in float32, so a mask in
    the model's dtype would be converted again in every layer."""
    if mask_function is not bidirectional_mask_function or q_offset or kv_offset:
        raise ValueError(
            "block-sparse attention supports bidirectional encoder self-attention only (no "
            "causal/decoder masks, custom mask functions or caches)")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"expected a [batch, seq] padding mask, got shape {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    mask = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
    mask = mask.masked_fill(~keep, torch.finfo(torch.float32).min)
    return mask[:, None, None, :]


def _hf_key_padding(attention_mask: Optional[torch.Tensor], batch: int, seq: int):
    """Any mask transformers hands to the attention function -> additive float [batch, seq]."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4 and m.shape[-2] not in (1,):
        # a per-query mask is accepted only when it is a key padding mask in disguise
        first = m[..., :1, :]
        if not torch.equal(m, first.expand_as(m)):
            raise ValueError(
                "block-sparse attention takes key padding masks only; this 4-D attention mask "
                "differs between queries")
        m = first
    m = squeeze_key_padding_mask(m, batch, seq)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(
            ~m, float("-inf"))
    return m.float()


def _dense_attention(module, query, key, value, attention_mask, scaling, dropout):
    """Full attention for layers left dense (``layers`` names a subset)."""
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:  # float32 (_sparse_mask): keep it finite
        mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                         dropout_p=dropout if module.training else 0.0,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def sparse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             scaling: Optional[float] = None, dropout: float = 0.0,
                             **kwargs) -> Tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: ``[batch, heads, seq, dim]`` in,
    ``[batch, seq, heads, dim]`` out (the dtype of ``query``); any ``seq`` (padded to the
    block inside).

    Under DeepSpeed Ulysses (``sparse_attn.hf.enable_sequence_parallel``) ``query``, ``key``
    and ``value`` hold the full sequence of ``H / P`` heads, and ``kwargs`` hold a
    ``SequenceParallelForward`` under ``"sparse_attention_sequence_parallel"``: the function
    attends with the layout rows of this rank's heads and with the gathered key padding mask
    of the full sequence (DeepSpeed's wrapper passes ``attention_mask=None``; a mask that
    transformers built would cover only this rank's shard anyway). With fewer heads than the
    layout and no ``SequenceParallelForward`` it cannot tell which heads it holds and raises
    ``ValueError``.
    """
    settings = _settings(module.config)
    sp = kwargs.pop(SEQUENCE_PARALLEL_KWARG, None)
    heads, layout_heads = query.shape[1], settings.sparsity_config.num_heads
    ssa = settings.attention
    if sp is not None:
        if heads * sp.size != layout_heads:
            raise ValueError(
                f"sequence parallelism over {sp.size} ranks: the attention got {heads} heads "
                f"but the layout has {layout_heads} heads, and {heads} * {sp.size} != "
                f"{layout_heads}; is {type(module).__name__} running under the Ulysses "
                f"wrapper that enable_sequence_parallel registered?")
        ssa = settings.head_slice(sp.rank, sp.size)
        attention_mask = sp.key_padding_mask
    elif heads != layout_heads:
        raise ValueError(
            f"the attention got {heads} heads but the layout has {layout_heads}, and no "
            f"sequence-parallel group says which heads these are (after DeepSpeed Ulysses' "
            f"all-to-all rank r of P holds heads [r * H / P, (r + 1) * H / P)); enable "
            f"sequence parallelism with sparse_attn.hf.enable_sequence_parallel(model, ...) "
            f"rather than with DeepSpeed's register_with_transformers alone")
    if settings.layers is not None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx to match "
                             f"config.{CONFIG_KEY}['layers']")
        if layer_idx not in settings.layers:
            return _dense_attention(module, query, key, value, attention_mask, scaling, dropout)
    if getattr(module, "is_causal", False) or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"block-sparse attention is for bidirectional self-attention; "
            f"{type(module).__name__} is causal or cross-attention")
    batch, _, seq, _ = query.shape
    kpm = _hf_key_padding(attention_mask, batch, seq)
    block = ssa.block
    pad = (-seq) % block
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        tail = torch.full((batch, pad), float("-inf"), device=query.device)
        if kpm is None:
            kpm = torch.zeros(batch, seq, device=query.device)
        kpm = torch.cat([kpm, tail], dim=1)
    if seq + pad > ssa.max_seq_length:
        raise ValueError(
            f"sequence length {seq} (padded to {seq + pad}) exceeds the sparse attention's "
            f"max_seq_length={ssa.max_seq_length}; extend the model "
            f"(SparseAttentionUtils.extend_position_embedding) and enable sparse attention "
            f"with a larger max_seq_length")
    global _told_about_dropout, _told_about_attentions
    if kwargs.get("output_attentions") and not _told_about_attentions:
        _told_about_attentions = True
        warnings.warn("output_attentions=True: block-sparse layers never form the attention "
                      "probabilities, so they return none (their entries of `attentions` are "
                      "missing)", UserWarning, stacklevel=2)
    if dropout and module.training and not _told_about_dropout:
        _told_about_dropout = True
        logger.info("block-sparse attention applies no dropout to the attention probabilities "
                    "(attention_probs_dropout_prob=%s is ignored on sparse layers)", dropout)
    out = ssa.attend(query, key, value, key_padding_mask=kpm, scale=scaling)
    if pad:
        out = out[:, :, :seq]
    return out.transpose(1, 2).contiguous(), None


def _keep_marker_when_saved() -> None:
    """Make every saved config of a sparse model record ``attn_implementation``.

    transformers moves ``attn_implementation`` out of a loaded config's attributes, so a
    model loaded and saved again before any forward pass would write its sparse settings
    without the marker, and the next plain ``from_pretrained`` would build it dense: a
    silent change of results. Serialising the config puts the marker back.
    """
    cls = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    original = cls.to_dict
    if getattr(original, "_sparse_attn_marker", False):
        return

    def to_dict(self):
        out = original(self)
        # A model trained under sequence parallelism saves as a plain sparse model: the
        # Ulysses name is a property of the running process, not of the weights.
        if isinstance(out.get(CONFIG_KEY), dict) and \
                getattr(self, "_attn_implementation", None) in SPARSE_ATTN_IMPLEMENTATIONS:
            out["attn_implementation"] = ATTN_IMPLEMENTATION
        return out

    to_dict.__doc__, to_dict.__wrapped__ = original.__doc__, original
    to_dict._sparse_attn_marker = True
    cls.to_dict = to_dict


def register() -> None:
    """Register ``"block_sparse"`` and ``"block_sparse_ulysses"`` with transformers (done on
    import; idempotent). DeepSpeed's Ulysses later overrides the second name's entry in
    ``ALL_ATTENTION_FUNCTIONS`` (an instance-level override) with its wrapper, which calls
    the function registered here."""
    for name in SPARSE_ATTN_IMPLEMENTATIONS:
        AttentionInterface.register(name, sparse_attention_forward)
        AttentionMaskInterface.register(name, _sparse_mask)
    _keep_marker_when_saved()


register()
