"""Packed tiles for fine layouts: which query blocks and which key blocks share a tile.

A kernel tile is TM query rows by TN key rows. With a layout block smaller than a tile, a
tile of contiguous rows mixes blocks of different patterns: a Fixed-16 global column (one
16-key block in every 64-key window) makes every 32- or 64-key tile of every row worth
visiting, so the kernel does dense work for a layout of a quarter of the density. Here each
head's query blocks and key blocks are put in an order, and a tile is TM / block (TN / block)
consecutive blocks of that order: the kernels load and store its rows through a token map
(gathered rows) instead of a contiguous range. Each block belongs to exactly one tile on
each side, so the backward needs no extra reduction.

    groups = get_groups(layout, block, seq, device, tiles)
    groups.qmap, groups.kmap   # int32 [H, n_map] token of each position, or None (identity)
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..caching import LayoutCache, layout_identity
from . import config

__all__ = ["Groups", "block_orders", "token_map", "get_groups", "tiles_and_groups",
           "clear_groups", "MAP_ALIGN"]

MAP_ALIGN = 128  # a token map is padded to a multiple of the largest tile


@dataclass(eq=False)
class Groups:
    """The block orders of one (layout, block, seq, device). ``qorder``/``korder``
    [H, n_blocks] int64 and ``qmap``/``kmap`` [H, n_map] int32 (the token at each position of
    the order; ``seq`` past the end) are None on a side whose order is the identity, where the
    kernels keep contiguous tiles (and TMA)."""
    qorder: Optional[torch.Tensor]
    korder: Optional[torch.Tensor]
    qmap: Optional[torch.Tensor]
    kmap: Optional[torch.Tensor]
    n_map: int

    @property
    def any(self) -> bool:
        return self.qorder is not None or self.korder is not None


IDENTITY = Groups(None, None, None, None, 0)


def block_orders(layout: torch.Tensor):
    """(query order, key order), each [H, n_blocks] int64, of a 0/1 layout [H, nb, nb].

    Global blocks first: a key block kept by more query blocks than the midpoint of the
    fewest and the most (a global column), and a query block that keeps more key blocks than
    that midpoint (a global row), go first, in their order, so that global blocks fill tiles
    of their own; the rest keep their order, so that local windows stay together."""
    L = layout.bool()
    H, nb, _ = L.shape
    pos = torch.arange(nb, device=L.device)

    def order(counts):
        lo, hi = counts.amin(-1, keepdim=True), counts.amax(-1, keepdim=True)
        heavy = counts * 2 > lo + hi
        return torch.argsort(torch.where(heavy, pos - nb, pos), dim=-1)

    return order(L.sum(-1)), order(L.sum(-2))


def token_map(order: torch.Tensor, block: int, seq: int, n_map: int) -> torch.Tensor:
    """int32 [H, n_map]: position p of the block order -> its token (``seq`` past the end)."""
    H = order.shape[0]
    tokens = (order[:, :, None] * block + torch.arange(block, device=order.device)).reshape(H, -1)
    out = torch.full((H, n_map), seq, dtype=torch.int32, device=order.device)
    out[:, :tokens.shape[1]] = tokens
    return out


def groups_apply(block: int, tiles: "config.FusedTiles") -> bool:
    """Whether packed tiles apply: the block is smaller than some tile and fits every tile
    (so that units are whole blocks), and grouping is on (``set_fused_config(group=...)``)."""
    sizes = [s for t in (tiles.fwd, tiles.dq, tiles.dkdv) for s in (t.block_m, t.block_n)]
    return config.grouping() and block < max(sizes) and block <= min(sizes)


_GROUPS = LayoutCache(64)


def get_groups(layout, block, seq, device, tiles, layout_key=None) -> Groups:
    """The block orders and token maps for this layout (IDENTITY where packed tiles do not
    apply or change nothing); built with device ops once, cached."""
    if not groups_apply(block, tiles):
        return IDENTITY
    if layout_key is None:
        layout_key = layout_identity(layout)

    def build():
        L = layout.to(device=device, non_blocking=True)
        qo, ko = block_orders(L)
        ident = torch.arange(L.shape[1], device=device)
        same = torch.stack([(qo == ident).all(), (ko == ident).all()]).tolist()  # one sync
        n_map = -(-seq // MAP_ALIGN) * MAP_ALIGN
        qo = None if same[0] else qo
        ko = None if same[1] else ko
        if qo is None and ko is None:
            return IDENTITY
        return Groups(qo, ko, None if qo is None else token_map(qo, block, seq, n_map),
                      None if ko is None else token_map(ko, block, seq, n_map), n_map)

    return _GROUPS.get((layout_key, block, seq, device), layout, device, build)


def tiles_and_groups(layout, block, seq, device, head_dim, layout_key=None):
    """(tile configs, groups) of a call: the packed-tile configs where this layout runs on
    packed tiles, else the contiguous ones and IDENTITY."""
    tiles = config.kernel_tiles(head_dim, block, packed=True)
    groups = get_groups(layout, block, seq, device, tiles, layout_key)
    if groups.any:
        return tiles, groups
    return config.kernel_tiles(head_dim, block), IDENTITY


def clear_groups() -> None:
    _GROUPS.clear()
