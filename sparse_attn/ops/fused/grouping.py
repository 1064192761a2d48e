"""Packed tiles for fine layouts: which query blocks and which key blocks share a tile.

A kernel tile is TM query rows by TN key rows. With a layout block smaller than a tile, a
tile of contiguous rows mixes blocks of different patterns: a Fixed-16 global column (one
16-key block in every 64-key window) makes every 32- or 64-key tile of every row worth
visiting, so the kernel does dense work for a layout of a quarter of the density. Here each
head's query blocks and key blocks are put in an order, and a tile is TM / block (TN / block)
consecutive blocks of that order: the kernels load and store its rows through a token map
(gathered rows) instead of a contiguous range. Each block belongs to exactly one tile on
each side, so the backward needs no extra reduction.

    tiles, groups = tiles_and_groups(layout, block, seq, device, head_dim)
    groups.qmap, groups.kmap   # int32 [H, n_map] token of each position, or None (identity)
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..caching import TABLE_BYTES, LayoutCache, layout_identity
from . import config

__all__ = ["Groups", "block_orders", "token_map", "get_groups", "tiles_and_groups",
           "clear_groups", "tile_area", "MAP_ALIGN", "PACK_GAIN"]

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
    return config.grouping() is not False and block < max(sizes) and block <= min(sizes)


def tile_area(layout: torch.Tensor, qorder, korder, block: int, tm: int, tn: int):
    """Tensor (0-dim, int64): the area, in scores, of the (tm x tn) tiles that have a kept
    block, over every head, with query and key blocks in these orders (None: the identity)."""
    L = layout.bool()
    H, nb, _ = L.shape
    if qorder is not None:
        L = torch.gather(L, 1, qorder[:, :, None].expand(H, nb, nb))
    if korder is not None:
        L = torch.gather(L, 2, korder[:, None, :].expand(H, nb, nb))
    a, c = tm // block, tn // block
    nq, nk = -(-nb // a), -(-nb // c)
    if nq * a != nb or nk * c != nb:  # pad to whole tiles
        L = torch.nn.functional.pad(L, (0, nk * c - nb, 0, nq * a - nb))
    return L.reshape(H, nq, a, nk, c).any(4).any(2).sum() * (tm * tn)


# Packed tiles must save this much of the contiguous tiles' area: gathered rows load through
# pointers (no TMA), and Variable 16 (local windows aligned to the tiles) ran 30% slower
# packed with 1.5x the area (H100, 16k: 0.372 against 0.489 ms forward+backward).
PACK_GAIN = 0.9

_GROUPS = LayoutCache(64, TABLE_BYTES)


def get_groups(layout, block, seq, device, tiles, layout_key=None, contiguous=None) -> Groups:
    """The block orders and token maps for this layout (IDENTITY where packed tiles do not
    apply or do not pay); built with device ops once, cached.

    Of the orders ``block_orders`` gives, packing both sides, the query side or the key side
    only, the one whose forward tiles (``tiles.fwd``) cover the least area is taken, if it
    is below ``PACK_GAIN`` times the area of ``contiguous`` tiles (the configs the layout
    would run on unpacked). With ``set_fused_config(group="always")``, or no ``contiguous``,
    both orders are taken wherever packing applies (for tests and comparisons)."""
    if not groups_apply(block, tiles):
        return IDENTITY
    if layout_key is None:
        layout_key = layout_identity(layout)
    always = contiguous is None or config.grouping() == "always"

    def build():
        L = layout.bool().to(device=device, non_blocking=True)
        qo, ko = block_orders(L)
        ident = torch.arange(L.shape[1], device=device)
        checks = [(qo == ident).all(), (ko == ident).all()]
        tm, tn = tiles.fwd.block_m, tiles.fwd.block_n
        if not always:
            cf = contiguous.fwd
            checks += [tile_area(L, None, None, block, cf.block_m, cf.block_n),
                       tile_area(L, qo, ko, block, tm, tn), tile_area(L, qo, None, block, tm, tn),
                       tile_area(L, None, ko, block, tm, tn)]
        found = torch.stack([c.to(torch.int64) for c in checks]).tolist()  # one sync
        qo = None if found[0] else qo
        ko = None if found[1] else ko
        if not always:
            unpacked, *packed = found[2:]
            best = min(range(3), key=packed.__getitem__)
            if packed[best] >= PACK_GAIN * unpacked:
                return IDENTITY
            qo = None if best == 2 else qo
            ko = None if best == 1 else ko
        if qo is None and ko is None:
            return IDENTITY
        n_map = -(-seq // MAP_ALIGN) * MAP_ALIGN
        return Groups(qo, ko, None if qo is None else token_map(qo, block, seq, n_map),
                      None if ko is None else token_map(ko, block, seq, n_map), n_map)

    return _GROUPS.get((layout_key, block, seq, device, always), layout, device, build)


def tiles_and_groups(layout, block, seq, device, head_dim, layout_key=None):
    """(tile configs, groups) of a call: the packed-tile configs where this layout runs on
    packed tiles, else the contiguous ones and IDENTITY."""
    tiles = config.kernel_tiles(head_dim, block, packed=True)
    contiguous = config.kernel_tiles(head_dim, block)
    groups = get_groups(layout, block, seq, device, tiles, layout_key, contiguous)
    if groups.any:
        return tiles, groups
    return contiguous, IDENTITY


def clear_groups() -> None:
    _GROUPS.clear()
