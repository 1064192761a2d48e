"""Look-up tables of the fused kernels: which tiles each query (key) tile visits, their bit
masks, and the work items that long rows are cut into; cached per layout.

    lut = get_lut(layout, block, block_m, block_n, seq, causal, device, "row", batch=B)

A "row" table (forward, dq) lists per query tile the key tiles it sees; a "col" table
(dk/dv) lists per key tile the query tiles that see it. Tiles are tensor-core sized; a layout
whose block is smaller than a tile visits a tile when any of its blocks is nonzero, and the
kernels mask the empty blocks inside it from a per-tile bit mask.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..caching import TABLE_BYTES, LayoutCache, layout_identity
from . import config

__all__ = ["Lut", "get_lut", "tile_tables", "make_lut", "split_chunk", "items_per_row",
           "clear_luts", "lut_cache_size"]


@dataclass(eq=False)
class Lut:
    """Row- or column-major look-up table for one (layout, block, tiles, seq, causal, device)
    and batch size (which sets how long rows are cut into work items). Device tensors are
    int32 unless said; see ``kernels/fused_common.py`` for how the kernels read them."""
    idx: torch.Tensor            # [H * n_own, n_other] tile indices, full tiles first
    bits: Optional[torch.Tensor]  # [H * n_own, n_other] int64 unit masks; None: coarse layout
    nfull: torch.Tensor          # [H * n_own] full tiles per row
    ntot: torch.Tensor           # [H * n_own] tiles per row
    nfull_arg: Optional[torch.Tensor]  # nfull, or None when every tile is full
    work: torch.Tensor           # [5, n_work] row, lo, hi, slot (-1: unsplit), first tile
    split: torch.Tensor          # [3, n_split] split row, its first slot, its items
    slot_split: torch.Tensor     # [n_slots] the split row of each workspace slot
    n_tiles: int                 # tiles of one batch
    all_full: bool               # no tile needs a mask
    n_work: int
    n_slots: int
    n_split: int
    n_own: int                   # query tiles ("row") or key tiles ("col") per head
    n_other: int
    unit_m: int                  # rows and columns of one mask bit
    unit_n: int
    fine: bool                   # the block is finer than the tile: bit masks in use
    bits32: bool                 # a tile has at most 32 units


def tile_tables(layout, block, TM, TN, N, causal, device, qorder=None, korder=None):
    """Per tile (i, j) of a [TM, TN] tiling: nonzero, full (no mask needed) and the unit bit
    mask (int64, or None when the block is not finer than the tile), and (unit_m, unit_n,
    fine, bits32). ``qorder``/``korder`` [H, nb] (packed tiles, ``grouping``): tile i is
    blocks qorder[i * TM / block ...] of the layout (and so for keys); the units are then
    whole blocks."""
    H = layout.shape[0]
    L = layout.bool().to(device=device, non_blocking=True)  # 0/1: move a byte, not 8
    ur, uc = min(TM, block), min(TN, block)
    if block > ur:
        L = L.repeat_interleave(block // ur, 1)
    if block > uc:
        L = L.repeat_interleave(block // uc, 2)
    n_qt, n_kt = -(-N // TM), -(-N // TN)
    a, c = TM // ur, TN // uc
    packed = qorder is not None or korder is not None
    diag = None
    if packed:
        nb = L.shape[1]
        ident = torch.arange(nb, device=device).expand(H, nb)
        qo = ident if qorder is None else qorder
        ko = ident if korder is None else korder
        if causal:
            # unit (i, j) is block (qo[i], ko[j]): above the diagonal it is dropped, on it
            # it needs the causal mask (its tile is partial)
            L = L.tril()
            diag = qo[:, :, None] == ko[:, None, :]
        L = torch.gather(L, 1, qo[:, :, None].expand(-1, -1, nb))
        L = torch.gather(L, 2, ko[:, None, :].expand(-1, nb, -1))
    pr, pc = n_qt * a - L.shape[1], n_kt * c - L.shape[2]

    def tiled(U):
        if pr or pc:
            U = torch.nn.functional.pad(U, (0, pc, 0, pr))
        return U.reshape(H, n_qt, a, n_kt, c).permute(0, 1, 3, 2, 4).reshape(H, n_qt, n_kt, a * c)

    units = tiled(L)
    nz = units.any(-1)
    full = units.all(-1)
    if diag is not None:
        full = full & ~(tiled(diag & L)).any(-1)
    elif causal:
        i = torch.arange(n_qt, device=device)[:, None]
        j = torch.arange(n_kt, device=device)[None, :]
        above = j * TN > (i + 1) * TM - 1
        cross = (j + 1) * TN - 1 > i * TM
        nz = nz & ~above
        full = full & ~cross
    fine = a * c > 1
    bits = None
    if fine:
        shifts = torch.arange(a * c, device=device, dtype=torch.int64)
        bits = (units.to(torch.int64) << shifts).sum(-1)
    return nz, full, bits, (ur, uc, fine, a * c <= 32)


def split_chunk(total_tiles: int, device: torch.device) -> int:
    """Target length S of one work item, in tiles, for a call of ``total_tiles`` tiles (every
    batch): the share of one program slot (an SM holds about four programs of these
    kernels), so that no item outlasts what every slot has to do anyway, and at least
    ``split_min`` (shorter items only add merge work)."""
    if device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n_sm = 4
    return max(config.split_min(), -(-total_tiles // (4 * n_sm)))


def items_per_row(lens: torch.Tensor, S: int) -> torch.Tensor:
    """Work items of each row of ``lens`` tiles: ceil(L / 1.2 S), at least one, so that an
    item is at most 1.2 S long (items of up to 1.5 S left BigBird 64's global rows whole,
    outlasting the rest of the grid)."""
    return torch.clamp(-(-lens * 5 // (6 * S)), min=1)


def make_lut(nz, full, bits, meta, batch) -> Lut:
    """nz/full/bits [H, n_own, n_other] -> Lut: per row the tiles, full ones first, and the
    work items (row, lo, hi, slot, first tile), longest first, for a call of ``batch``
    batches. One host sync (the work list), once."""
    H, n_own, n_other = nz.shape
    device = nz.device
    key = nz.to(torch.int8) + full.to(torch.int8)
    order_in_row = torch.sort(key, dim=-1, descending=True, stable=True).indices
    idx = order_in_row.to(torch.int32).reshape(H * n_own, n_other).contiguous()
    if bits is not None:
        bits = torch.gather(bits, -1, order_in_row).reshape(H * n_own, n_other).contiguous()
    nfull = full.sum(-1).to(torch.int32).reshape(-1).contiguous()
    ntot = nz.sum(-1).reshape(-1).to(torch.int32).contiguous()
    counts = torch.stack([ntot, nfull]).cpu().to(torch.int64)  # the one host sync
    lens = counts[0]
    n_tiles = int(lens.sum())
    all_full = bool(counts[1].sum() == n_tiles)
    S = split_chunk(n_tiles * batch, device)
    nc = items_per_row(lens, S)
    n_items = int(nc.sum())
    item_row = torch.repeat_interleave(torch.arange(lens.numel()), nc)
    first = torch.cumsum(nc, 0) - nc
    ci = torch.arange(n_items) - torch.repeat_interleave(first, nc)
    ncr = torch.repeat_interleave(nc, nc)
    lr = torch.repeat_interleave(lens, nc)
    lo = ci * lr // ncr
    hi = (ci + 1) * lr // ncr
    is_split = ncr > 1
    slot = torch.full((n_items,), -1, dtype=torch.int64)
    n_slots = int(is_split.sum())
    slot[is_split] = torch.arange(n_slots)
    # Launch order: items at least half a chunk long first, longest first (they bound the
    # run time); the rest in (head, tile) order, so that neighbours, which share most of
    # their key/value tiles, run together and hit L2.
    ln = hi - lo
    order = torch.sort(torch.where(ln >= (S + 1) // 2, ln, torch.zeros_like(ln)),
                       descending=True, stable=True).indices
    work = torch.stack([item_row[order], lo[order], hi[order], slot[order]]).to(torch.int32)
    work = work.to(device)
    # each item's first tile IDX[row, lo] rides in its record (lo < n_other always; a row
    # with no tile is one item with lo = hi = 0, whose kernel never reads it)
    first_tile = idx[work[0].long(), work[1].long()]
    split_rows = torch.nonzero(nc > 1).flatten()
    n_split = split_rows.numel()
    s_start = slot[first[split_rows]] if n_split else torch.zeros(0, dtype=torch.int64)
    split = torch.stack([split_rows, s_start, nc[split_rows]]).to(torch.int32)
    slot_split = torch.repeat_interleave(torch.arange(n_split), nc[split_rows])
    unit_m, unit_n, fine, bits32 = meta
    return Lut(idx=idx, bits=bits, nfull=nfull, ntot=ntot,
               nfull_arg=None if all_full else nfull,
               work=torch.cat([work, first_tile[None]]).contiguous(),
               split=split.to(device).contiguous(),
               slot_split=slot_split.to(torch.int32).to(device).contiguous(),
               n_tiles=n_tiles, all_full=all_full, n_work=n_items, n_slots=n_slots,
               n_split=n_split, n_own=n_own, n_other=n_other, unit_m=unit_m, unit_n=unit_n,
               fine=fine, bits32=bits32)


_LUTS = LayoutCache(64, TABLE_BYTES)  # entries as the plan cache


def get_lut(layout, block, TM, TN, N, causal, device, kind, layout_key=None, batch=1,
            groups=None) -> Lut:
    """The ``kind`` ("row": forward and dq; "col": dk/dv) table for calls of ``batch``
    batches; built with device ops, cached. ``layout_key``: ``layout_identity(layout)`` when
    the caller has it already. ``groups``: the packed-tile orders (``grouping.get_groups``)."""
    if layout_key is None:
        layout_key = layout_identity(layout)
    qorder = korder = None
    if groups is not None:
        qorder, korder = groups.qorder, groups.korder
    key = (layout_key, block, TM, TN, N, causal, device, kind, batch,
           qorder is not None, korder is not None)

    def build():
        nz, full, bits, meta = tile_tables(layout, block, TM, TN, N, causal, device, qorder,
                                           korder)
        if kind == "col":
            nz, full = nz.transpose(1, 2), full.transpose(1, 2)
            bits = bits.transpose(1, 2) if bits is not None else None
        return make_lut(nz, full, bits, meta, batch)

    return _LUTS.get(key, layout, device, build)


def clear_luts() -> None:
    _LUTS.clear()


def lut_cache_size() -> int:
    """How many tables are cached."""
    return len(_LUTS)
