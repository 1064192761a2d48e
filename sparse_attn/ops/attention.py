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

from .attention_three_kernel import three_kernel_attention
from .attention_torch import torch_block_sparse_attention
from .checks import additive_key_padding, check_attention_inputs, fused_limits
from .fused import attend, cached_plan, fused_block_sparse_attention

__all__ = ["block_sparse_attention", "select_backend", "BACKENDS"]

BACKENDS = ("auto", "fused", "triton", "torch")


def select_backend(q, k, v, layout, block, rpe=None, attn_mask=None) -> str:
    """The backend ``"auto"`` resolves to for this (checked) call."""
    if not q.is_cuda:
        return "torch"
    return "fused" if fused_limits(q, rpe, attn_mask) is None else "triton"


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
        layout: ``[heads, seq // block, seq // block]`` 0/1 (integer or bool).
        block: block size in tokens: 16, 32, 64 or 128.
        scale: score scale; ``head_dim ** -0.5`` by default.
        causal: drop keys after the query: the upper triangle of diagonal blocks, and
            whole blocks above the diagonal (unidirectional layouts have none).
        key_padding_mask: ``[batch, seq]`` (singleton middle dimensions allowed): additive
            float (0 keeps, ``-inf`` drops) or bool (True keeps).
        rpe: added to the scaled scores, broadcastable to ``[batch, heads, seq, seq]``.
        attn_mask: additive float ``[seq, seq]``.
        backend: one of ``BACKENDS``.

    Returns ``[batch, heads, seq, head_dim]`` in the dtype of ``q``; a query that sees no key
    gets zeros.
    """
    # A fused call whose signature was checked and planned before goes straight to its plan
    # (batch-1 training is bound by host time; the checks cost as much as the launches).
    if (backend == "fused" or (backend == "auto" and q.is_cuda)) and rpe is None \
            and attn_mask is None and not torch.compiler.is_compiling():
        plan = cached_plan(q, k, v, layout, block, scale, causal, key_padding_mask)
        if plan is not None:
            return attend(plan, q, k, v, key_padding_mask)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    check_attention_inputs(q, k, v, layout, block, key_padding_mask, rpe, attn_mask)
    if backend == "auto":
        backend = select_backend(q, k, v, layout, block, rpe, attn_mask)
    if backend == "fused":
        reason = fused_limits(q, rpe, attn_mask)
        if reason is not None:
            raise ValueError(f"the fused backend cannot take this call: {reason}")
        return fused_block_sparse_attention(q, k, v, layout, block, scale=scale, causal=causal,
                                            key_padding_mask=key_padding_mask)
    if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
        key_padding_mask = additive_key_padding(key_padding_mask, q.shape[0], q.shape[2])
    if backend == "triton":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return three_kernel_attention(q, k, v, layout, block, scale, causal, key_padding_mask,
                                      rpe, attn_mask)
    return torch_block_sparse_attention(q, k, v, layout, block, scale=scale, causal=causal,
                                        key_padding_mask=key_padding_mask, rpe=rpe,
                                        attn_mask=attn_mask)
