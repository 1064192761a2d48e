"""Fused block-sparse flash attention.

    out = fused_block_sparse_attention(q, k, v, layout, block, scale=None, causal=False,
                                       key_padding_mask=None)

One Triton kernel computes the forward pass: each work item (a query tile and a range of the
key tiles of its row of the layout) runs an online softmax and never writes the block-sparse
score tensor to memory. The backward pass is FlashAttention-2 style: one kernel for dQ (over
the row look-up table; it also writes delta = rowsum(dO * O)) and one for dK/dV (over the
column look-up table), plus a small reduction where long rows were split.

One job per module:

* ``config``: tile configurations (``TileConfig``, ``FusedTiles``), ``set_fused_config``
  and the rule for when a kernel moves tiles by TMA;
* ``grouping``: packed tiles for fine layouts (which blocks share a tile), cached per layout;
* ``lut``: look-up tables and work items, cached per layout;
* ``plan``: what a call signature fixes, worked out once, and the kernel launches;
* ``op``: the autograd function, the registered custom op and the public function.

The kernels themselves are in ``sparse_attn/ops/kernels/fused_{common,forward,backward}.py``; the checks of
every attention entry point in ``sparse_attn/ops/checks.py``.
"""
from ..checks import fused_supported
from .config import FusedTiles, TileConfig, kernel_tiles, set_fused_config
from .op import FusedBlockSparseAttention, attend, fused_block_sparse_attention
from .plan import cached_plan, clear_caches, get_plan

__all__ = ["fused_block_sparse_attention", "fused_supported", "FusedBlockSparseAttention",
           "set_fused_config", "TileConfig", "FusedTiles", "kernel_tiles", "clear_caches",
           "get_plan", "cached_plan", "attend"]
