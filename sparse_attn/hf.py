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

Supported model types: ``SUPPORTED_MODEL_TYPES`` (BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
CamemBERT, and their task heads). Other models, decoders (``is_decoder``) and
cross-attention are rejected with a ``ValueError``.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import sparsity_config as _sc
from .sparse_self_attention import SparseSelfAttention, squeeze_key_padding_mask
from .sparsity_config import SparsityConfig

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "sparse_attn.hf needs transformers>=5: pip install 'transformers>=5,<6'") from err

ATTN_IMPLEMENTATION = "block_sparse"
CONFIG_KEY = "sparse_attention"
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")

_DEFAULT_MAX_SEQ_LENGTH = 2048
logger = logging.getLogger(__name__)
_told_about_dropout = False


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
    ``[batch, seq, heads, dim]`` out; any ``seq`` (padded to the block inside)."""
    settings = _settings(module.config)
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
    ssa = settings.attention
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
    global _told_about_dropout
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
        if isinstance(out.get(CONFIG_KEY), dict) and \
                getattr(self, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            out["attn_implementation"] = ATTN_IMPLEMENTATION
        return out

    to_dict.__doc__, to_dict.__wrapped__ = original.__doc__, original
    to_dict._sparse_attn_marker = True
    cls.to_dict = to_dict


def register() -> None:
    """Register ``"block_sparse"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _sparse_mask)
    _keep_marker_when_saved()


register()


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
            and config._attn_implementation == ATTN_IMPLEMENTATION:
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
    return (config is not None and config._attn_implementation == ATTN_IMPLEMENTATION
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
            and model.config._attn_implementation == ATTN_IMPLEMENTATION:
        _settings(model.config)
    return model
