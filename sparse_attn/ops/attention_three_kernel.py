"""Block-sparse attention through three Triton kernels (sdd matmul, softmax, dsd matmul):
the CUDA path for what the fused kernel does not take (relative position bias, attention
masks, float32). It writes the block-sparse scores to memory."""
import torch

from .attention_torch import block_index, mask_future
from .caching import layout_identity

__all__ = ["three_kernel_attention"]

_OPS: dict = {}


def _ops(layout, block):
    """(sdd, softmax, dsd) for one layout tensor, built once: constructing them reads the
    layout on the host, which must not happen on every call."""
    from .matmul import MatMul
    from .softmax import Softmax

    key = (layout_identity(layout), block)
    hit = _OPS.get(key)
    if hit is not None:
        return hit[1]
    ops = (MatMul(layout, block, "sdd", trans_a=False, trans_b=True), Softmax(layout, block),
           MatMul(layout, block, "dsd"))
    if len(_OPS) > 64:
        _OPS.clear()
    _OPS[key] = (layout, ops)  # the reference keeps the key's storage alive
    return ops


def three_kernel_attention(q, k, v, layout, block, scale, causal, key_padding_mask, rpe,
                           attn_mask) -> torch.Tensor:
    """Checked inputs as ``block_sparse_attention`` takes them; masks additive (a bool mask
    keeps where True)."""
    sdd, softmax, dsd = _ops(layout, block)
    scores = sdd(q, k)  # [batch, nnz, block, block], blocks in layout.nonzero() order
    if causal:
        scores = mask_future(scores, block_index(layout, q.device), block)
    probs = softmax(scores, scale=scale, rpe=rpe, key_padding_mask=key_padding_mask,
                    attn_mask=attn_mask, key_padding_mask_mode="add", attn_mask_mode="add")
    return dsd(probs, v)
