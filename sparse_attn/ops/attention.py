"""``block_sparse_attention``: one entry point that validates the call and routes it to the
fastest backend that computes it exactly.

* ``"fused"``: the fused Triton flash kernel (CUDA; fp16/bf16; no rpe / attn_mask).
* ``"triton"``: the three Triton kernels (sdd matmul, softmax, dsd matmul); any feature.
* ``"torch"``: the pure-PyTorch block-sparse backend; any device, any feature.

``"auto"`` picks ``fused`` when it can take the call, else ``triton`` on CUDA, else ``torch``.
Every backend computes the same function; the choice changes speed, not results.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import fused
from .caching import layout_identity
from .torch_backend import block_index, mask_future, torch_block_sparse_attention

BACKENDS = ("auto", "fused", "triton", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q, k, v, layout, block, key_padding_mask=None, rpe=None,
                           attn_mask=None) -> None:
    """Raise ValueError naming the argument, its shape and what is allowed."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: fp16, bf16, fp32, fp64")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"query, key and value must have one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("query, key and value must be on one device")
    batch, heads, seq, _ = q.shape
    if seq % block != 0:
        raise ValueError(
            f"sequence length {seq} is not a multiple of the block size {block}; pad it "
            f"(SparseAttentionUtils.pad_to_block_size)")
    nb = seq // block
    if layout.dim() != 3 or tuple(layout.shape) != (heads, nb, nb):
        raise ValueError(
            f"layout has shape {tuple(layout.shape)}; for {heads} heads and sequence {seq} "
            f"at block {block} it must be {(heads, nb, nb)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seq):
        raise ValueError(
            f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected "
            f"{(batch, seq)}")
    for name, t in (("key_padding_mask", key_padding_mask), ("rpe", rpe),
                    ("attn_mask", attn_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; it must be on the inputs' device, "
                             f"{q.device}")
    if attn_mask is not None and tuple(attn_mask.shape) != (seq, seq):
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; expected {(seq, seq)}")
    if rpe is not None:
        try:
            torch.broadcast_shapes(rpe.shape, (batch, heads, seq, seq))
        except RuntimeError:
            raise ValueError(
                f"rpe has shape {tuple(rpe.shape)}; it must broadcast to "
                f"{(batch, heads, seq, seq)}") from None


_THREE_KERNEL_OPS: dict = {}


def _three_kernel_ops(layout, block):
    """(sdd, softmax, dsd) for one layout tensor, built once: constructing them reads the
    layout on the host, which must not happen on every call."""
    from .matmul import MatMul
    from .softmax import Softmax

    key = (layout_identity(layout), block)
    hit = _THREE_KERNEL_OPS.get(key)
    if hit is not None:
        return hit[1]
    ops = (MatMul(layout, block, "sdd", trans_a=False, trans_b=True), Softmax(layout, block),
           MatMul(layout, block, "dsd"))
    if len(_THREE_KERNEL_OPS) > 64:
        _THREE_KERNEL_OPS.clear()
    _THREE_KERNEL_OPS[key] = (layout, ops)  # the reference keeps the key's storage alive
    return ops


def _three_kernel_attention(q, k, v, layout, block, scale, causal, key_padding_mask, rpe,
                            attn_mask):
    sdd, softmax, dsd = _three_kernel_ops(layout, block)
    scores = sdd(q, k)  # [batch, nnz, block, block], blocks in layout.nonzero() order
    if causal:
        scores = mask_future(scores, block_index(layout, q.device), block)
    probs = softmax(scores, scale=scale, rpe=rpe, key_padding_mask=key_padding_mask,
                    attn_mask=attn_mask, key_padding_mask_mode="add", attn_mask_mode="add")
    return dsd(probs, v)


def select_backend(q, k, v, layout, block, rpe=None, attn_mask=None) -> str:
    """The backend ``"auto"`` resolves to for this call."""
    if not q.is_cuda:
        return "torch"
    if fused.fused_supported(q, k, v, rpe=rpe, attn_mask=attn_mask, layout=layout,
                             block=block) is None:
        return "fused"
    return "triton"


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block: int,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    rpe: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` restricted to the nonzero blocks of ``layout``.

    Args:
        q, k, v: ``[batch, heads, seq, head_dim]``.
        layout: ``[heads, seq // block, seq // block]`` 0/1.
        block: block size in tokens.
        scale: score scale; ``head_dim ** -0.5`` by default.
        causal: drop keys after the query: the upper triangle of diagonal blocks, and
            whole blocks above the diagonal (unidirectional layouts have none).
        key_padding_mask: additive float ``[batch, seq]`` (0 keeps, ``-inf`` drops).
        rpe: added to the scaled scores, broadcastable to ``[batch, heads, seq, seq]``.
        attn_mask: additive float ``[seq, seq]``.
        backend: one of ``BACKENDS``.

    Returns ``[batch, heads, seq, head_dim]`` in the dtype of ``q``; a query that sees no key
    gets zeros.
    """
    # A fused call whose signature was checked and planned before goes straight to its plan
    # (batch-1 training is bound by host time; the checks below cost as much as the launches)
    planned = ((backend == "fused" or (backend == "auto" and q.is_cuda)) and rpe is None
               and attn_mask is None and not torch.compiler.is_compiling())
    if planned:
        plan = fused.cached_plan("dispatch:" + backend, q, k, v, layout, block, scale, causal,
                                 key_padding_mask)
        if plan is not None:
            return fused.attend(plan, q, k, v, key_padding_mask)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    check_attention_inputs(q, k, v, layout, block, key_padding_mask, rpe, attn_mask)
    checked = backend == "auto"  # select_backend has asked the fused path already
    if checked:
        backend = select_backend(q, k, v, layout, block, rpe, attn_mask)
    if backend == "fused":
        reason = None if checked else fused.fused_supported(
            q, k, v, rpe=rpe, attn_mask=attn_mask, layout=layout, block=block)
        if reason is not None:
            raise ValueError(f"the fused backend cannot take this call: {reason}")
        if planned:  # cached under the backend asked for: "auto" was checked as such
            plan = fused.plan("dispatch:auto" if checked else "dispatch:fused", q, k, v, layout,
                              block, scale, causal, key_padding_mask)
            return fused.attend(plan, q, k, v, key_padding_mask)
        return fused.fused_block_sparse_attention(q, k, v, layout, block, scale=scale,
                                                  causal=causal,
                                                  key_padding_mask=key_padding_mask)
    if backend == "triton":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _three_kernel_attention(q, k, v, layout, block, scale, causal, key_padding_mask,
                                       rpe, attn_mask)
    return torch_block_sparse_attention(q, k, v, layout, block, scale=scale, causal=causal,
                                        key_padding_mask=key_padding_mask, rpe=rpe,
                                        attn_mask=attn_mask)
