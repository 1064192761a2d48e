"""Block-sparse attention in plain PyTorch: the backend on CPU and wherever Triton cannot run.

Only the layout's nonzero blocks are computed. The query, key and value blocks of every
nonzero ``(head, row, col)`` are gathered, scores are ``[batch, nnz, block, block]``, the
softmax runs across the blocks of each block-row with segment reductions, and the context
blocks are summed back into their rows. Memory grows with the number of nonzero blocks, not
with ``seq ** 2``. Autograd differentiates through the gathers and scatters.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .caching import build_outside_graph_pools, layout_identity


class BlockIndex(NamedTuple):
    """Nonzero blocks of a ``[heads, nb, nb]`` layout, in (head, row, col) order.

    head, row, col: int64 ``[nnz]``; segment: ``head * nb + row`` (the block-row id);
    diagonal, above: int64 positions (into the nnz blocks) of the blocks on the diagonal and
    of those above it (a unidirectional layout has none).
    """

    head: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    segment: torch.Tensor
    diagonal: torch.Tensor
    above: torch.Tensor
    num_heads: int
    num_blocks: int


_INDEX_CACHE: dict = {}


def block_index(layout: torch.Tensor, device: torch.device) -> BlockIndex:
    """The nonzero-block index of ``layout`` on ``device``, cached per (layout, device)."""
    key = (layout_identity(layout), str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit[1]
    heads, nb, _ = layout.shape

    def build():
        h, r, c = layout.nonzero(as_tuple=True)
        diagonal, above = torch.nonzero(r == c).flatten(), torch.nonzero(c > r).flatten()
        return BlockIndex(*(t.to(device) for t in (h, r, c, h * nb + r, diagonal, above)),
                          heads, nb)

    index = build_outside_graph_pools(build, torch.device(device))
    if len(_INDEX_CACHE) > 256:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = (layout, index)
    return index


def mask_future(scores: torch.Tensor, index: BlockIndex, block: int) -> torch.Tensor:
    """Causal masking of block-sparse scores ``[batch, nnz, block, block]`` (blocks in
    ``index`` order): ``-inf`` where the key comes after its query. Only the diagonal blocks
    are cut (their upper triangle); blocks above the diagonal are dropped whole. Out of place,
    differentiable, no ``[seq, seq]`` mask."""
    future = torch.ones(block, block, dtype=torch.bool, device=scores.device).triu(1)
    cut = scores.index_select(1, index.diagonal).masked_fill(future, float("-inf"))
    scores = scores.index_copy(1, index.diagonal, cut)
    if index.above.numel():
        scores = scores.index_fill(1, index.above, float("-inf"))
    return scores


def _gather_blocks(x: torch.Tensor, heads: torch.Tensor, blocks: torch.Tensor, block: int):
    """[batch, heads, seq, d] -> [batch, nnz, block, d], the blocks (heads[i], blocks[i])."""
    b, h, s, d = x.shape
    x = x.reshape(b, h * (s // block), block, d)
    return x.index_select(1, heads * (s // block) + blocks)


def _gather_rpe(rpe: torch.Tensor, idx: BlockIndex, block: int, seq: int) -> torch.Tensor:
    """The nonzero blocks of ``rpe`` ([b or 1, h or 1, seq, seq]) as [b or 1, nnz, block, block]."""
    if rpe.dim() == 2:
        rpe = rpe[None, None]
    rb, rh = rpe.shape[0], rpe.shape[1]
    nb = seq // block
    r = rpe.reshape(rb, rh, nb, block, nb, block)
    heads = idx.head if rh > 1 else torch.zeros_like(idx.head)
    return r[:, heads, idx.row, :, idx.col, :].transpose(0, 1)


def torch_block_sparse_attention(
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
) -> torch.Tensor:
    """Block-sparse attention over the nonzero blocks of ``layout``.

    Args:
        q, k, v: ``[batch, heads, seq, head_dim]``, one floating dtype.
        layout: ``[heads, seq // block, seq // block]`` 0/1.
        scale: score scale, ``head_dim ** -0.5`` by default.
        causal: drop keys after the query: the upper triangle of diagonal blocks, and
            whole blocks above the diagonal (unidirectional layouts have none).
        key_padding_mask: additive ``[batch, seq]`` (0 keeps, ``-inf`` drops).
        rpe: added to the scaled scores; broadcastable to ``[batch, heads, seq, seq]``; only
            the nonzero blocks are read.
        attn_mask: additive ``[seq, seq]``; only the nonzero blocks are read.

    Returns ``[batch, heads, seq, head_dim]`` in the dtype of ``q``. Rows that see no key
    are zero. Scores and softmax run in float32 for half-precision inputs, whether or not
    autocast is on (the op sets its own precision).
    """
    with torch.autocast(q.device.type, enabled=False):
        return _attention(q, k, v, layout, block, scale, causal, key_padding_mask, rpe,
                          attn_mask)


def _attention(q, k, v, layout, block, scale, causal, key_padding_mask, rpe, attn_mask):
    batch, heads, seq, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    idx = block_index(layout, q.device)
    nb = idx.num_blocks
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    qb = _gather_blocks(q, idx.head, idx.row, block).to(compute)
    kb = _gather_blocks(k, idx.head, idx.col, block).to(compute)
    vb = _gather_blocks(v, idx.head, idx.col, block).to(compute)
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # [batch, nnz, block, block]

    if rpe is not None:
        s = s + _gather_rpe(rpe, idx, block, seq).to(compute)
    if attn_mask is not None:
        am = attn_mask.reshape(nb, block, nb, block)[idx.row, :, idx.col, :]
        s = s + am.to(compute)
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(batch, nb, block)[:, idx.col].to(compute)
        s = s + kpm[:, :, None, :]
    if causal:
        s = mask_future(s, idx, block)

    # Softmax across the blocks of each block-row: segment max, exp, segment sum.
    block_max = s.amax(-1).detach()  # [batch, nnz, block]
    row_max = torch.full((batch, heads * nb, block), float("-inf"), dtype=compute,
                         device=q.device)
    segment = idx.segment[None, :, None].expand_as(block_max)
    row_max = row_max.scatter_reduce(1, segment, block_max, "amax")
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max.index_select(1, idx.segment)[..., None])
    denom = torch.zeros((batch, heads * nb, block), dtype=compute, device=q.device)
    denom = denom.index_add(1, idx.segment, e.sum(-1))
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    p = e / denom.index_select(1, idx.segment)[..., None]

    ctx = torch.matmul(p, vb)  # [batch, nnz, block, dim]
    out = torch.zeros((batch, heads * nb, block, dim), dtype=compute, device=q.device)
    out = out.index_add(1, idx.segment, ctx)
    return out.reshape(batch, heads, seq, dim).to(q.dtype)
