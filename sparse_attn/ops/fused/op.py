"""The fused attention as a function: a thin autograd.Function over a plan (eager calls) and
a registered custom op with fake and autograd registrations (what torch.compile traces as
one opaque node, with no graph break)."""
from typing import Optional

import torch

from ..checks import check_fused_call
from .plan import Plan, contiguous_rows, get_plan

__all__ = ["fused_block_sparse_attention", "FusedBlockSparseAttention", "attend"]


class FusedBlockSparseAttention(torch.autograd.Function):
    """``apply(q, k, v, key_padding_mask, plan)``, the mask as ``plan.key_padding`` gives it.
    Eager calls use it: it costs less host time per call than the custom op's dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, plan: Plan):
        out, lse = plan.forward(q, k, v, kpm)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        dq, dk, dv = ctx.plan.backward(dout, q, k, v, out, lse, kpm)
        return dq, dk, dv, None, None


def attend(plan: Plan, q, k, v, key_padding_mask):
    """Run ``plan`` (eager mode) on a call with its signature."""
    return FusedBlockSparseAttention.apply(q, k, v, plan.key_padding(key_padding_mask), plan)


@torch.library.custom_op("sparse_attn::fused_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor], block: int, scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = get_plan(q, k, v, layout, block, scale, causal, key_padding_mask)
    return p.forward(q, k, v, p.key_padding(key_padding_mask))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, layout, key_padding_mask, block, scale, causal):
    B, H, N, D = q.shape  # strides as the plan gives them
    return (torch.empty_like(contiguous_rows(q)), q.new_empty((B, H, N), dtype=torch.float32))


@torch.library.custom_op("sparse_attn::fused_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, layout: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor], block: int, scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = get_plan(q, k, v, layout, block, scale, causal, key_padding_mask)
    return p.backward(do, q, k, v, out, lse, p.key_padding(key_padding_mask))


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, out, lse, layout, key_padding_mask, block, scale, causal):
    return tuple(torch.empty_like(contiguous_rows(t)) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, layout, kpm, block, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, layout, kpm)
    ctx.block, ctx.scale, ctx.causal = block, scale, causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, layout, kpm = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, layout, kpm, ctx.block, ctx.scale,
                         ctx.causal)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_block_sparse_attention(q, k, v, layout, block, *, scale=None, causal=False,
                                 key_padding_mask=None):
    """Block-sparse attention in one fused Triton kernel (forward) and two or three
    (backward); the block-sparse score tensor is never written to memory.

    q, k, v: [batch, heads, seq, head_dim], float16 or bfloat16 (float32 raises ValueError:
    cast, or use the three-kernel backend), head_dim 32, 64 or 128, CUDA (or CPU with
    TRITON_INTERPRET=1).
    layout: [heads, seq // block, seq // block] 0/1 (integer or bool, any device); a
    different pattern per head is fine. block: 16, 32, 64 or 128.
    scale: softmax scale, default head_dim ** -0.5.
    causal: also drop keys after the query: the upper triangle of diagonal blocks, and whole
    blocks above the diagonal (unidirectional layouts have none).
    key_padding_mask: [batch, seq] (singleton middle dimensions allowed), additive float (0
    keeps, -inf drops, other values are added to that key's scores) or bool (True keeps);
    no gradient flows to it.
    A query row that sees no key returns zeros (and zero gradients), never NaN.
    Returns [batch, heads, seq, head_dim] in q's dtype and memory format.
    """
    if torch.compiler.is_compiling():
        check_fused_call(q, k, v, layout, block, key_padding_mask)
        scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
        kpm = key_padding_mask
        if kpm is not None:
            kpm = kpm.reshape(q.shape[0], q.shape[2])
        out, _ = _fwd_op(q, k, v, layout, kpm, int(block), scale, bool(causal))
        return out
    return attend(get_plan(q, k, v, layout, block, scale, causal, key_padding_mask),
                  q, k, v, key_padding_mask)
