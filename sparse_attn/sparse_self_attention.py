"""``SparseSelfAttention``: the module form of block-sparse attention.

The module holds a ``SparsityConfig`` and the mask conventions; the work is done by the
functional op :func:`sparse_attn.ops.attention.block_sparse_attention`, which picks the
fused Triton kernel, the three-kernel Triton path or the pure-PyTorch backend.

The layout is built once, at ``max_seq_length``, the first time the module runs. A sequence
of ``nb`` blocks (``nb * block <= max_seq_length``) uses the top-left ``[:, :nb, :nb]`` corner
of that layout, so a model sees one consistent pattern at every length. The corners are cached
per (device, ``nb``) as contiguous tensors, which keeps the backends' own look-up-table caches
(keyed on the layout tensor) warm across calls. Modules whose layouts are equal (the layers of
one model) share one such tensor, and so one set of look-up tables: at 256k tokens a BigBird-64
layout and its tables take gigabytes, which twelve copies would not leave for the model.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from .ops.attention import block_sparse_attention
from .ops.caching import layout_digest
from . import sparsity_config as _configs
from .sparsity_config import UNIDIRECTIONAL, SparsityConfig

MASK_MODES = ("add", "mul")
# Device layouts by (content, blocks, device), shared by the modules that hold them (a plain
# dict: torch.compile traces the look-up); a module that drops a length drops its entry, and
# past SHARED_LAYOUTS entries the oldest go (their modules keep their own references).
_SHARED_LAYOUTS: dict = {}
SHARED_LAYOUTS = 64
# Lengths whose layout a module keeps (the oldest dropped), and their bytes (at least the
# latest is kept): batches cut to their longest sequence would otherwise keep one layout per
# length ever seen, 1.5 GiB each for BigBird 64 at 262144 tokens.
LAYOUTS_PER_MODULE = 8
LAYOUT_BYTES_PER_MODULE = 2 << 30
# Master layouts of the built-in configs (seeded, so equal settings give equal layouts) by
# (class, settings, length): the layers of a model build theirs once. At 262144 tokens a
# BigBird-64 layout takes 8.5 s to build (2 cores) and 1.5 GiB; a layer each would take
# 12 times both.
_MASTERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_DETERMINISTIC = tuple(getattr(_configs, name) for name in (
    "DenseSparsityConfig", "FixedSparsityConfig", "VariableSparsityConfig",
    "BigBirdSparsityConfig", "BSLongformerSparsityConfig", "LocalSlidingWindowSparsityConfig"))


class _Master:
    """A master layout and its content digest, shared by the modules built alike."""
    __slots__ = ("layout", "digest", "__weakref__")

    def __init__(self, layout: torch.Tensor):
        self.layout, self.digest = layout, layout_digest(layout)


def _check_mode(name: str, mode: str) -> None:
    if mode not in MASK_MODES:
        raise ValueError(f"{name} must be one of {MASK_MODES}, got {mode!r}")


def to_additive_mask(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """A mask in ``mode`` convention -> an additive float32 mask (0 keeps, ``-inf`` drops).

    * bool masks: ``True`` keeps, ``False`` drops (whatever ``mode`` is);
    * ``"add"``: the values are added to the scores as they are (0 keeps; a large negative
      value or ``-inf`` drops; other values bias the scores);
    * ``"mul"``: a nonzero entry keeps, a zero entry drops.
    """
    _check_mode("mask mode", mode)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, float("-inf"))
    if mode == "add":
        if not mask.is_floating_point():
            raise ValueError(
                f"an additive ('add') mask must be floating point or bool, got {mask.dtype}; "
                f"pass a 0/1 keep-mask with mode 'mul'")
        return mask.to(torch.float32)
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        mask == 0, float("-inf"))


def squeeze_key_padding_mask(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]`` from ``[batch, seq]`` or a mask with extra singleton dimensions between
    the batch and the sequence (BERT's extended ``[batch, 1, 1, seq]``); a batch of 1 is
    broadcast to ``batch``."""
    shape = tuple(mask.shape)
    if mask.dim() < 2 or any(s != 1 for s in shape[1:-1]) or shape[0] not in (1, batch) \
            or shape[-1] != seq:
        raise ValueError(
            f"key_padding_mask has shape {shape}; expected [batch, seq] = {(batch, seq)} "
            f"(extra singleton dimensions, as in [batch, 1, 1, seq], are allowed)")
    mask = mask.reshape(shape[0], seq)
    if shape[0] != batch:
        mask = mask.expand(batch, seq)
    return mask


def squeeze_attn_mask(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """``[seq, seq]`` from ``[seq, seq]`` or the same with leading singleton dimensions."""
    shape = tuple(mask.shape)
    if mask.dim() < 2 or any(s != 1 for s in shape[:-2]) or shape[-2:] != (seq, seq):
        raise ValueError(f"attn_mask has shape {shape}; expected [seq, seq] = {(seq, seq)}")
    return mask.reshape(seq, seq)


class SparseSelfAttention(nn.Module):
    """Block-sparse self-attention of ``[batch, heads, seq, head_dim]`` query, key and value.

    Args:
        sparsity_config: the layout (``SparsityConfig`` or a subclass); its ``num_heads`` must
            equal the heads of the inputs and its ``block`` must divide the sequence length.
        key_padding_mask_mode: ``"add"`` (the mask is added to the scores: 0 keeps, a large
            negative value or ``-inf`` drops) or ``"mul"`` (1 keeps, 0 drops).
        attn_mask_mode: the same, for ``attn_mask``.
        max_seq_length: the longest sequence the module accepts; the layout is built once at
            this length (rounded up to a multiple of the block) and shorter sequences use its
            top-left corner.

    The scores are ``q @ k^T * head_dim ** -0.5``; ``rpe`` (broadcastable to
    ``[batch, heads, seq, seq]``) is added, then the masks. Bool masks are accepted in either
    mode (``True`` keeps). A query that sees no key gets zeros. The module has no parameters
    and no buffers: its state dict is empty.
    """

    def __init__(self, sparsity_config: SparsityConfig = SparsityConfig(num_heads=4),
                 key_padding_mask_mode: str = "add", attn_mask_mode: str = "mul",
                 max_seq_length: int = 2048):
        super().__init__()
        if not isinstance(sparsity_config, SparsityConfig):
            raise TypeError(
                f"sparsity_config must be a SparsityConfig, got {type(sparsity_config).__name__}")
        _check_mode("key_padding_mask_mode", key_padding_mask_mode)
        _check_mode("attn_mask_mode", attn_mask_mode)
        self.sparsity_config = sparsity_config
        self.key_padding_mask_mode = key_padding_mask_mode
        self.attn_mask_mode = attn_mask_mode
        self._master: Optional[_Master] = None
        self._layouts: Dict[tuple, torch.Tensor] = {}
        self._add_mask_checked = False
        self.max_seq_length = max_seq_length  # builds the master layout

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_seq_length must be a positive integer, got {value!r}")
        self._max_seq_length = value
        self._master = None
        self._layouts = {}
        # Built now, as DeepSpeed did: building it inside a torch.compile'd forward (random
        # generators, Python loops) would break the graph. The same for its digest.
        self.master_layout

    # -- layout ------------------------------------------------------------------------------
    @property
    def block(self) -> int:
        return self.sparsity_config.block

    @property
    def causal(self) -> bool:
        return getattr(self.sparsity_config, "attention", None) == UNIDIRECTIONAL

    @property
    def master_layout(self) -> torch.Tensor:
        """The ``[heads, nb, nb]`` int64 layout at ``max_seq_length`` (built once, on CPU;
        shared by the modules with the same built-in config: read it, do not write it)."""
        if self._master is None:
            cfg = self.sparsity_config
            length = -(-self.max_seq_length // self.block) * self.block
            key = None
            if type(cfg) in _DETERMINISTIC:
                key = (type(cfg), repr(sorted(vars(cfg).items())), length)
                self._master = _MASTERS.get(key)
            if self._master is None:
                layout = cfg.make_layout(length)
                heads, nb = cfg.num_heads, length // self.block
                if tuple(layout.shape) != (heads, nb, nb):
                    raise ValueError(
                        f"{type(cfg).__name__}.make_layout({length}) returned shape "
                        f"{tuple(layout.shape)}; expected {(heads, nb, nb)}")
                self._master = _Master(layout.to(torch.int64).cpu())
                if key is not None:
                    _MASTERS[key] = self._master
        return self._master.layout

    @property
    def _digest(self) -> tuple:
        self.master_layout
        return self._master.digest

    def get_layout(self, seq_len: int, device=None) -> torch.Tensor:
        """The ``[heads, nb, nb]`` int64 layout used for a sequence of ``seq_len`` tokens, on
        ``device``. Cached, so the backends' look-up tables stay warm: one tensor per length
        and device, shared with every module whose layout is equal (read it, do not write
        it)."""
        key = (seq_len, device)
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        self._check_length(seq_len)
        shared_key = self._shared_key(seq_len, device)
        layout = _SHARED_LAYOUTS.get(shared_key)
        if layout is None:
            nb = seq_len // self.block
            layout = self.master_layout[:, :nb, :nb].contiguous().to(shared_key[2])
            _SHARED_LAYOUTS[shared_key] = layout
            while len(_SHARED_LAYOUTS) > SHARED_LAYOUTS:
                del _SHARED_LAYOUTS[next(iter(_SHARED_LAYOUTS))]
        self._layouts[key] = layout
        while len(self._layouts) > LAYOUTS_PER_MODULE or len(self._layouts) > 1 and sum(
                t.numel() * t.element_size() for t in self._layouts.values()) > \
                LAYOUT_BYTES_PER_MODULE:  # the oldest length goes
            old_key = next(iter(self._layouts))
            old = self._layouts.pop(old_key)
            old_shared = self._shared_key(*old_key)
            if _SHARED_LAYOUTS.get(old_shared) is old:
                del _SHARED_LAYOUTS[old_shared]
        return layout

    def _shared_key(self, seq_len: int, device) -> tuple:
        device = torch.device("cpu") if device is None else torch.device(device)
        return (self._digest, seq_len // self.block, device)

    def _check_length(self, seq_len: int) -> None:
        block = self.block
        if seq_len % block != 0:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of the sparse block size {block}; "
                f"pad the inputs (SparseAttentionUtils.pad_to_block_size) and unpad the output "
                f"(SparseAttentionUtils.unpad_sequence_output)")
        if seq_len > self.max_seq_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_length={self.max_seq_length} of "
                f"this SparseSelfAttention; build it with a larger max_seq_length")

    def _apply(self, fn, *args, **kwargs):
        # Moving the module (.to / .cuda / .half) must not leave stale per-device layouts.
        self._layouts.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rpe: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention context ``[batch, heads, seq, head_dim]`` in the dtype of ``query``.

        Args:
            query, key, value: ``[batch, heads, seq, head_dim]``.
            rpe: relative position embedding added to the scaled scores; broadcastable to
                ``[batch, heads, seq, seq]``.
            key_padding_mask: ``[batch, seq]`` (or with singleton dims, e.g. ``[batch, 1, 1,
                seq]``), in ``key_padding_mask_mode``; bool means ``True`` keeps.
            attn_mask: ``[seq, seq]`` in ``attn_mask_mode``; bool means ``True`` keeps.
        """
        return self.attend(query, key, value, rpe=rpe, key_padding_mask=key_padding_mask,
                           attn_mask=attn_mask)

    def attend(self, query, key, value, *, rpe=None, key_padding_mask=None, attn_mask=None,
               scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
        """``forward`` with a custom score ``scale`` (default ``head_dim ** -0.5``) and an
        explicit ``backend`` (see ``block_sparse_attention``)."""
        if query.dim() != 4:
            raise ValueError(
                f"query must be [batch, heads, seq, head_dim], got shape {tuple(query.shape)}")
        batch, heads, seq, _ = query.shape
        if heads != self.sparsity_config.num_heads:
            raise ValueError(
                f"the inputs have {heads} heads but the sparsity config was built for "
                f"num_heads={self.sparsity_config.num_heads}; build the SparsityConfig with "
                f"num_heads={heads}")
        layout = self.get_layout(seq, query.device)
        if key_padding_mask is not None and not self._add_mask_checked:
            self._check_add_mask_once(key_padding_mask)
        if key_padding_mask is not None and not (
                self.key_padding_mask_mode == "add" and key_padding_mask.dtype == torch.float32
                and key_padding_mask.shape == (batch, seq)):  # else already what the op takes
            key_padding_mask = to_additive_mask(
                squeeze_key_padding_mask(key_padding_mask, batch, seq),
                self.key_padding_mask_mode)
        if attn_mask is not None:
            attn_mask = to_additive_mask(squeeze_attn_mask(attn_mask, seq), self.attn_mask_mode)
        kwargs = dict(scale=scale, causal=self.causal, key_padding_mask=key_padding_mask,
                      rpe=rpe, attn_mask=attn_mask, backend=backend)
        if torch.is_autocast_enabled(query.device.type):
            # The op has its own precision policy (it computes the softmax in float32 for
            # half inputs); autocast inside it would mix dtypes. Its inputs already carry the
            # autocast dtype when they come from autocast Linear layers.
            with torch.autocast(query.device.type, enabled=False):
                return block_sparse_attention(query, key, value, layout, self.block, **kwargs)
        return block_sparse_attention(query, key, value, layout, self.block, **kwargs)

    def _check_add_mask_once(self, mask: torch.Tensor) -> None:
        """In "add" mode a float mask of only 0s and 1s is almost certainly a keep-mask
        (transformers' convention) where an additive one (BERT's extended mask) was meant:
        the padding would not be masked. Looked at once per module (one host sync)."""
        if torch.compiler.is_compiling():
            return
        self._add_mask_checked = True
        if self.key_padding_mask_mode != "add" or not mask.dtype.is_floating_point:
            return
        if bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any()):
            warnings.warn(
                "key_padding_mask holds only 0 and 1 in key_padding_mask_mode='add', so it is "
                "added to the scores and masks nothing: pass an additive mask (0 keeps, -inf "
                "or -10000 drops, e.g. (1.0 - mask) * -10000.0), a bool mask (True keeps), or "
                "build the module with key_padding_mask_mode='mul'", UserWarning, stacklevel=3)

    def extra_repr(self) -> str:
        return (f"sparsity_config={self.sparsity_config!r}, key_padding_mask_mode="
                f"{self.key_padding_mask_mode!r}, attn_mask_mode={self.attn_mask_mode!r}, "
                f"max_seq_length={self.max_seq_length}")
