"""The ``"sparse_attention"`` block of a DeepSpeed JSON config, validated with pydantic 2.

One model per ``mode``; a block without ``mode`` is ``fixed``, as in DeepSpeed. A key of another
mode is ignored with one warning (DeepSpeed read the keys of the chosen mode, and its
documented example lists every mode's keys under ``"mode": "fixed"``); a key of no mode is an
error with a did-you-mean suggestion; a key given twice in the JSON is an error, as in
DeepSpeed's loader. The defaults are DeepSpeed's config defaults (which differ from some class
defaults: ``num_random_blocks`` is 0 here, also for ``bigbird``).

    model = parse_sparse_attention({"mode": "bigbird", "block": 64})
    sparsity_config = model.build(num_heads=12)
    model, ds_config = split_deepspeed_config("ds.json")   # ds_config has no block left
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import warnings
from typing import Annotated, Any, List, Literal, Optional, Tuple, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from . import sparsity_config as sc
from .layout_parts import check_global_indices

KEY = "sparse_attention"

Attention = Literal["bidirectional", "unidirectional"]
BLOCK_SIZES = (16, 32, 64, 128)


def _check_block(value: int) -> int:
    if value not in BLOCK_SIZES:
        raise ValueError(f"must be one of {', '.join(map(str, BLOCK_SIZES))}")
    return value


# An int (strict: 16.0, "16" and true are rejected) from a fixed set.
Block = Annotated[int, AfterValidator(_check_block),
                  Field(json_schema_extra={"enum": list(BLOCK_SIZES)})]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class SparseAttentionConfigError(ValueError):
    """A ``sparse_attention`` block (or the config holding it) is invalid."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    block: Block = Field(16, description="Side of the square attention blocks, in tokens.")
    different_layout_per_head: bool = Field(
        False, description="Give each head its own layout (else every head uses head 0's).")

    _cls: Any = None

    def _class_kwargs(self) -> dict:
        return self.model_dump(exclude={"mode"})

    def build(self, num_heads: int) -> sc.SparsityConfig:
        """The ``SparsityConfig`` this block describes, for a layer of ``num_heads`` heads."""
        return self._cls(num_heads=num_heads, **self._class_kwargs())


class DenseBlock(_Block):
    """Full attention (every block), for testing and comparison."""

    mode: Literal["dense"]
    _cls = sc.DenseSparsityConfig


class FixedBlock(_Block):
    """Local windows and global representatives (Sparse Transformers)."""

    mode: Literal["fixed"]
    num_local_blocks: PositiveInt = Field(4, description="Blocks per local window.")
    num_global_blocks: PositiveInt = Field(1, description="Representative blocks per window.")
    attention: Attention = "bidirectional"
    horizontal_global_attention: bool = Field(
        False, description="Representatives also attend to all blocks (bidirectional only).")
    num_different_global_patterns: PositiveInt = Field(
        1, description="Distinct representative positions across heads.")
    _cls = sc.FixedSparsityConfig

    @model_validator(mode="after")
    def _rules(self):
        if self.num_local_blocks % self.num_global_blocks:
            raise ValueError(
                f"num_local_blocks: {self.num_local_blocks} must be divisible by "
                f"num_global_blocks: {self.num_global_blocks}")
        if self.horizontal_global_attention and self.attention != "bidirectional":
            raise ValueError(
                "horizontal_global_attention: true needs attention: \"bidirectional\"")
        if self.num_different_global_patterns > 1 and not self.different_layout_per_head:
            raise ValueError(
                f"num_different_global_patterns: {self.num_different_global_patterns} needs "
                f"different_layout_per_head: true")
        most = self.num_local_blocks // self.num_global_blocks
        if self.num_different_global_patterns > most:
            raise ValueError(
                f"num_different_global_patterns: {self.num_different_global_patterns} can be "
                f"at most num_local_blocks // num_global_blocks = {most}")
        return self


class VariableBlock(_Block):
    """Random blocks, variable-size local windows, global blocks or ranges."""

    mode: Literal["variable"]
    num_random_blocks: NonNegativeInt = Field(0, description="Random blocks per block-row.")
    local_window_blocks: Annotated[List[PositiveInt], Field(min_length=1)] = Field(
        default_factory=lambda: [4], description="Window sizes in order; the last repeats.")
    global_block_indices: List[NonNegativeInt] = Field(default_factory=lambda: [0])
    global_block_end_indices: Optional[List[NonNegativeInt]] = None
    attention: Attention = "bidirectional"
    horizontal_global_attention: bool = False
    seed: int = Field(0, description="Seed of the random blocks (same layout on every rank).")
    _cls = sc.VariableSparsityConfig

    @model_validator(mode="after")
    def _rules(self):
        check_global_indices(self.global_block_indices, self.global_block_end_indices)
        if self.horizontal_global_attention and self.attention != "bidirectional":
            raise ValueError(
                "horizontal_global_attention: true needs attention: \"bidirectional\"")
        return self


class BigBirdBlock(_Block):
    """Random, sliding-window and global blocks (BigBird)."""

    mode: Literal["bigbird"]
    num_random_blocks: NonNegativeInt = Field(0, description="Random blocks per block-row.")
    num_sliding_window_blocks: PositiveInt = Field(3, description="Sliding window width.")
    num_global_blocks: NonNegativeInt = Field(1, description="Leading global blocks.")
    attention: Attention = "bidirectional"
    seed: int = Field(0, description="Seed of the random blocks (same layout on every rank).")
    _cls = sc.BigBirdSparsityConfig


class BSLongformerBlock(_Block):
    """Sliding window and global blocks or ranges (block-sparse Longformer)."""

    mode: Literal["bslongformer"]
    num_sliding_window_blocks: PositiveInt = Field(3, description="Sliding window width.")
    global_block_indices: List[NonNegativeInt] = Field(default_factory=lambda: [0])
    global_block_end_indices: Optional[List[NonNegativeInt]] = None
    attention: Attention = "bidirectional"
    _cls = sc.BSLongformerSparsityConfig

    @model_validator(mode="after")
    def _rules(self):
        check_global_indices(self.global_block_indices, self.global_block_end_indices)
        return self


class LocalSlidingWindowBlock(_Block):
    """A sliding window only; unidirectional by default."""

    mode: Literal["local_sliding_window"]
    num_sliding_window_blocks: PositiveInt = Field(3, description="Sliding window width.")
    attention: Attention = "unidirectional"
    _cls = sc.LocalSlidingWindowSparsityConfig

    @model_validator(mode="after")
    def _rules(self):
        if self.different_layout_per_head:
            raise ValueError(
                "different_layout_per_head: true is not allowed for mode "
                "\"local_sliding_window\" (one layout for all heads)")
        return self

    def _class_kwargs(self) -> dict:
        return self.model_dump(exclude={"mode", "different_layout_per_head"})


SparseAttentionBlock = Annotated[
    Union[DenseBlock, FixedBlock, VariableBlock, BigBirdBlock, BSLongformerBlock,
          LocalSlidingWindowBlock],
    Field(discriminator="mode"),
]
_ADAPTER = TypeAdapter(SparseAttentionBlock)
MODES = ("dense", "fixed", "variable", "bigbird", "bslongformer", "local_sliding_window")


_MODELS = {"dense": DenseBlock, "fixed": FixedBlock, "variable": VariableBlock,
           "bigbird": BigBirdBlock, "bslongformer": BSLongformerBlock,
           "local_sliding_window": LocalSlidingWindowBlock}
ALL_KEYS = frozenset(k for model in _MODELS.values() for k in model.model_fields)


def _own_keys(block: dict, mode: str) -> dict:
    """The keys of ``mode``: keys of other modes dropped with one warning, keys of no mode
    refused with the nearest known key."""
    own = _MODELS[mode].model_fields
    unknown = [k for k in block if k not in ALL_KEYS]
    if unknown:
        lines = []
        for key in unknown:
            near = difflib.get_close_matches(str(key), sorted(ALL_KEYS), n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            lines.append(f"{KEY}.{key}: unknown key{hint}")
        raise SparseAttentionConfigError("; ".join(lines))
    ignored = [k for k in block if k not in own]
    if ignored:
        warnings.warn(f"{KEY}: {', '.join(ignored)} belong to other modes and are ignored for "
                      f"mode \"{mode}\"", UserWarning, stacklevel=3)
    return {k: v for k, v in block.items() if k in own}


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] in MODES:  # the union's tag
            loc = loc[1:]
        path = ".".join([KEY] + loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{KEY}.mode: {e['input'].get('mode')!r} is not one of {list(MODES)}")
        elif not loc and ":" in msg:
            lines.append(f"{KEY}.{msg}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: {msg}{shown}")
    return "; ".join(lines)


def parse_sparse_attention(block: Any):
    """Validate a ``sparse_attention`` block and return its model (one class per mode).

    Raises ``SparseAttentionConfigError`` (a ``ValueError``) naming the key and what is
    allowed.
    """
    if not isinstance(block, dict):
        raise SparseAttentionConfigError(
            f"{KEY} must be a JSON object, got {type(block).__name__}: {block!r}")
    if "mode" not in block:
        block = {**block, "mode": "fixed"}
    elif not isinstance(block["mode"], str) or block["mode"] not in MODES:
        raise SparseAttentionConfigError(
            f"{KEY}.mode: {block['mode']!r} is not one of {list(MODES)}")
    block = _own_keys(block, block["mode"])
    try:
        return _ADAPTER.validate_python(block)
    except ValidationError as err:
        raise SparseAttentionConfigError(_format_error(err)) from None


def _no_duplicates(pairs, path) -> dict:
    """A JSON object's pairs as a dict; a key given twice is an error (DeepSpeed's config
    loader refuses them too), never last-one-wins."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            shown = f" (its keys: {', '.join(sorted(map(str, seen)))})" if len(seen) < 12 else ""
            raise SparseAttentionConfigError(
                f"{path}: duplicate key {key!r} in one JSON object{shown}")
        seen[key] = value
    return seen


def load_json(path: str) -> dict:
    """Read a JSON config; malformed JSON raises a ValueError naming the file and line."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise SparseAttentionConfigError(f"cannot read DeepSpeed config {path}: {err}") from None
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, path))
    except json.JSONDecodeError as err:
        raise SparseAttentionConfigError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None


def split_deepspeed_config(path_or_dict) -> Tuple[Optional[_Block], dict]:
    """Split a DeepSpeed config into its validated ``sparse_attention`` block and the rest.

    Returns ``(model or None, config without the block)``. The user's file or dict is never
    modified: the returned dict is a deep copy.
    """
    if isinstance(path_or_dict, dict):
        config = copy.deepcopy(path_or_dict)
    else:
        config = load_json(path_or_dict)
    if not isinstance(config, dict):
        raise SparseAttentionConfigError(
            f"a DeepSpeed config must be a JSON object, got {type(config).__name__}")
    if KEY not in config:
        return None, config
    block = config.pop(KEY)
    return parse_sparse_attention(block), config


def json_schema() -> dict:
    """The JSON Schema of the block, generated from the models, accepting what
    ``parse_sparse_attention`` accepts: a block without ``mode`` is ``fixed``, and the keys
    of other modes are allowed (and ignored)."""
    schema = _ADAPTER.json_schema()
    schema.pop("discriminator", None)  # "mode" may be missing: each branch says its own
    for name, model in _MODELS.items():
        branch = schema["$defs"][model.__name__]
        own = branch["properties"]
        for key in sorted(ALL_KEYS - set(own)):
            own[key] = {"description": "A key of another mode: ignored for this one."}
        if name == "fixed":
            branch["required"] = [k for k in branch.get("required", []) if k != "mode"]
            if not branch["required"]:
                branch.pop("required")
    schema["title"] = "DeepSpeed sparse_attention block"
    schema["description"] = (
        "The \"sparse_attention\" block of a DeepSpeed config, as read by sparse_attn. "
        "A block without \"mode\" is \"fixed\"; keys of other modes are ignored.")
    return schema


def resolved(model) -> dict:
    """Every setting of a block, defaults filled in, as a plain dict."""
    return model.model_dump()
