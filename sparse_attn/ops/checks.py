"""The rules of the attention entry points (``block_sparse_attention``, the fused function
and its custom op), one small check per rule and one message per rule. The entry points call
them once per new call signature; a planned call skips them.

    check_attention_inputs(q, k, v, layout, block, key_padding_mask, rpe, attn_mask)
    reason = fused_limits(q, rpe, attn_mask)    # None when the fused kernel can take it
"""
import weakref
from typing import Optional

import torch

from . import common
from .caching import layout_identity

__all__ = ["ATTENTION_DTYPES", "FUSED_DTYPES", "FUSED_HEAD_DIMS", "check_attention_inputs",
           "check_fused_call", "fused_limits", "fused_supported", "additive_key_padding"]

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSED_DTYPES = (torch.float16, torch.bfloat16)
FUSED_HEAD_DIMS = (32, 64, 128)


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_qkv(q, k, v) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape "
                             f"{_shape(t)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: fp16, bf16, fp32, fp64")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"query, key and value must have the same shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")


def check_block(block, seq) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block not in common.BLOCKS:
        raise ValueError(f"block is {block!r}; allowed: {common.BLOCKS}")
    if seq % block:
        raise ValueError(f"sequence length {seq} is not a multiple of the block size {block}; "
                         f"pad it (SparseAttentionUtils.pad_to_block_size)")
    return block


# Layout tensors whose values were checked, by identity. Weak: a strong reference would keep
# every device layout ever checked alive (one per sequence length, GiBs at long sequences);
# when a tensor dies its entry goes, so a new tensor at the same storage is checked afresh.
_CHECKED_LAYOUTS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def check_layout(layout, heads, seq, block) -> None:
    nb = seq // block
    if not isinstance(layout, torch.Tensor) or tuple(layout.shape) != (heads, nb, nb):
        raise ValueError(f"layout has shape {_shape(layout)}; for {heads} heads and sequence "
                         f"{seq} at block {block} it must be {(heads, nb, nb)}")
    if layout.dtype.is_floating_point or layout.is_complex():
        raise ValueError(f"layout has dtype {layout.dtype}; it must be an integer (0/1) or "
                         f"bool tensor")
    # its values once per layout tensor and version (a host sync on the GPU; not while
    # torch.compile traces, where a data-dependent branch would break the graph)
    if torch.compiler.is_compiling():
        return
    key = layout_identity(layout)
    if key not in _CHECKED_LAYOUTS and layout.dtype != torch.bool:
        bad = (layout != 0) & (layout != 1)
        if bool(bad.any()):
            raise ValueError(f"layout holds {layout[bad][0].item()}; it must hold only 0 and 1")
    _CHECKED_LAYOUTS[key] = layout


def check_key_padding_mask(kpm, batch, seq, device) -> None:
    if not isinstance(kpm, torch.Tensor):
        raise ValueError(f"key_padding_mask must be a tensor [batch, seq], got "
                         f"{type(kpm).__name__}")
    if kpm.numel() != batch * seq or kpm.dim() < 2 or kpm.shape[0] != batch \
            or kpm.shape[-1] != seq:
        raise ValueError(f"key_padding_mask has shape {tuple(kpm.shape)}; expected "
                         f"[batch, seq] = {(batch, seq)} (singleton middle dimensions allowed)")
    if not (kpm.dtype.is_floating_point or kpm.dtype == torch.bool):
        raise ValueError(f"key_padding_mask has dtype {kpm.dtype}; pass an additive float mask "
                         f"(0 keeps, -inf drops) or a bool mask (True keeps)")
    if kpm.device != device:
        raise ValueError(f"key_padding_mask is on {kpm.device}; it must be on the inputs' "
                         f"device, {device}")


def check_rpe(rpe, batch, heads, seq, device) -> None:
    if rpe.device != device:
        raise ValueError(f"rpe is on {rpe.device}; it must be on the inputs' device, {device}")
    try:
        torch.broadcast_shapes(rpe.shape, (batch, heads, seq, seq))
    except RuntimeError:
        raise ValueError(f"rpe has shape {tuple(rpe.shape)}; it must broadcast to "
                         f"{(batch, heads, seq, seq)}") from None


def check_attn_mask(attn_mask, seq, device) -> None:
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device}; it must be on the inputs' "
                         f"device, {device}")
    if tuple(attn_mask.shape) != (seq, seq):
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; expected {(seq, seq)}")


def check_attention_inputs(q, k, v, layout, block, key_padding_mask=None, rpe=None,
                           attn_mask=None) -> None:
    """Raise ValueError naming the argument, its shape or value and what is allowed."""
    check_qkv(q, k, v)
    batch, heads, seq, _ = q.shape
    check_block(block, seq)
    check_layout(layout, heads, seq, block)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, batch, seq, q.device)
    if rpe is not None:
        check_rpe(rpe, batch, heads, seq, q.device)
    if attn_mask is not None:
        check_attn_mask(attn_mask, seq, q.device)


def fused_limits(q, rpe=None, attn_mask=None) -> Optional[str]:
    """None when the fused kernel can take a valid call with this query, else why not."""
    if rpe is not None:
        return "rpe is not supported by the fused kernel (use backend='triton')"
    if attn_mask is not None:
        return "attn_mask is not supported by the fused kernel (use backend='triton')"
    if not common.triton_available():
        return "triton is not installed"
    if q.dtype not in FUSED_DTYPES:
        return (f"query has dtype {q.dtype}; the fused kernel takes float16 or bfloat16 "
                f"(for float32, cast or use backend='triton')")
    if q.device.type != "cuda" and not (common.interpreting() and q.device.type == "cpu"):
        return (f"query is on {q.device}; the fused kernel needs CUDA tensors (or CPU tensors "
                f"with TRITON_INTERPRET=1)")
    if q.shape[-1] not in FUSED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not supported by the fused kernel: {FUSED_HEAD_DIMS}"
    return None


def check_fused_call(q, k, v, layout, block, key_padding_mask=None) -> None:
    """The checks of the fused path: every attention rule, then the fused kernel's limits."""
    check_attention_inputs(q, k, v, layout, block, key_padding_mask)
    reason = fused_limits(q)
    if reason is not None:
        raise ValueError(reason)


def fused_supported(q, k, v, *, rpe=None, attn_mask=None, layout=None, block=None):
    """None when the fused kernel can take this call, else a short reason (never raises).
    ``layout`` and ``block`` are optional; when given they are checked too."""
    try:
        check_qkv(q, k, v)
        if block is not None:
            check_block(block, q.shape[2])
            if layout is not None:
                check_layout(layout, q.shape[1], q.shape[2], block)
    except ValueError as err:
        return str(err)
    return fused_limits(q, rpe, attn_mask)


def additive_key_padding(kpm: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """A checked key padding mask as the kernels read it: additive float32 [batch, seq]
    (a bool mask keeps where True)."""
    kpm = kpm.reshape(batch, seq)
    if kpm.dtype == torch.bool:
        return torch.zeros((batch, seq), dtype=torch.float32, device=kpm.device).masked_fill_(
            ~kpm, float("-inf"))
    return kpm.to(torch.float32).contiguous()
