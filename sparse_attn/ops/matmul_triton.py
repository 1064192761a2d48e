"""Host side of the Triton block-sparse matmul kernels (``kernels/matmul.py``): their look-up
tables, built once per layout on the CPU and moved to the device by the caller, and their
launches, which do no host-device synchronisation.

    lut = lut_to(sdd_lut(layout, block), device)
    c = sdd(a, b, trans_a, trans_b, lut, block, nnz)
"""
import torch
import triton

from . import common
from .kernels import matmul as _k
from .launch import Launcher

__all__ = ["tile_for_block", "sdd_lut", "dsd_lut", "lut_to", "sdd", "dsd"]

# launched as _launch_<kernel>(grid, *args, **constexprs): see launch.py
_launch_sdd_kernel = Launcher(_k, "_sdd_kernel")
_launch_dsd_kernel = Launcher(_k, "_dsd_kernel")
_launch_dsd_reduce_kernel = Launcher(_k, "_dsd_reduce_kernel")


def next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def tile_for_block(block):
    """Tile edge (rows and k) the kernels use for a block size."""
    return max(64, block)


# ----------------------------------------------------------------------------------------
# look-up tables (built on the CPU from a [heads, rows, cols] 0/1 layout)
# ----------------------------------------------------------------------------------------
def _block_index(layout):
    """[H, R, C] long: position of each nonzero block in nonzero() order, -1 elsewhere."""
    nz = layout.nonzero(as_tuple=True)
    idx = torch.full(layout.shape, -1, dtype=torch.int64)
    idx[nz] = torch.arange(nz[0].numel(), dtype=torch.int64)
    return idx


def _tiles(idx, r):
    """[H, nbM, nbK] block index -> [H, SM, SK, r, r] tile index (padded with -1)."""
    h, nbm, nbk = idx.shape
    sm, sk = -(-nbm // r), -(-nbk // r)
    pad = torch.full((h, sm * r, sk * r), -1, dtype=torch.int64)
    pad[:, :nbm, :nbk] = idx
    return pad.view(h, sm, r, sk, r).permute(0, 1, 3, 2, 4).contiguous()


def sdd_lut(layout, block):
    """Work list for _sdd_kernel. Returns dict of CPU int32 tensors and sizes."""
    tile = tile_for_block(block)
    r = tile // block
    tiles = _tiles(_block_index(layout), r)
    present = (tiles >= 0).flatten(3).any(-1)
    hij = present.nonzero().to(torch.int32).contiguous()
    idx = tiles[present].reshape(-1, r * r).to(torch.int32).contiguous()
    return {"hij": hij, "idx": idx, "items": int(hij.shape[0]), "tile": tile}


def dsd_lut(layout, block, trans, min_piece=16):
    """Work list for _dsd_kernel: one item per (head, output row tile) with its range of
    nonzero k tiles; a row tile with many more k tiles than the typical one (a global row)
    is split into pieces that run in parallel and are summed by _dsd_reduce_kernel.

    ``layout`` describes the sparse operand as stored; with ``trans`` the operand is used
    transposed, so output rows follow the layout's columns."""
    tile = tile_for_block(block)
    r = tile // block
    idx = _block_index(layout)
    if trans:
        idx = idx.transpose(1, 2)
    tiles = _tiles(idx, r)
    h, sm = tiles.shape[0], tiles.shape[1]
    present = (tiles >= 0).flatten(3).any(-1)            # [H, SM, SK]
    counts = present.sum(-1).flatten()                    # steps of each (head, row tile)
    row_ptr = torch.zeros(h * sm + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    steps = present.nonzero()
    step_k = steps[:, 2].to(torch.int32).contiguous()
    step_idx = tiles[present].reshape(-1, r * r).to(torch.int32).contiguous()
    if step_k.numel() == 0:  # keep valid pointers
        step_k = torch.zeros(1, dtype=torch.int32)
        step_idx = torch.full((1, r * r), -1, dtype=torch.int32)
    nonempty = counts[counts > 0]
    piece = max(min_piece, 2 * int(torch.ceil(nonempty.double().mean()).item())) \
        if nonempty.numel() else min_piece
    n_items = h * sm
    split = counts > piece
    npieces = torch.where(split, (counts + piece - 1) // piece, torch.ones_like(counts))
    item_of = torch.repeat_interleave(torch.arange(n_items), npieces)
    first = torch.cumsum(npieces, 0) - npieces
    piece_no = torch.arange(item_of.numel()) - first[item_of]
    s0 = row_ptr[item_of] + piece_no * piece
    s1 = torch.minimum(s0 + piece, row_ptr[item_of + 1])
    is_split = split[item_of]
    slot = torch.where(is_split, torch.cumsum(is_split.long(), 0) - 1,
                       torch.full_like(s0, -1))
    items = torch.stack([item_of // sm, item_of % sm, s0, s1, slot], 1)
    order = torch.argsort(s1 - s0, descending=True, stable=True)   # longest first
    items = items[order]
    split_items = split.nonzero().flatten()
    slot0 = torch.zeros(n_items, dtype=torch.int64)
    if split_items.numel():
        first_slot = torch.cumsum(torch.where(split, npieces, torch.zeros_like(npieces)), 0) \
            - torch.where(split, npieces, torch.zeros_like(npieces))
        slot0 = first_slot
    splits = torch.stack([split_items // sm, split_items % sm, slot0[split_items],
                          npieces[split_items]], 1)
    return {"items": items.to(torch.int32).contiguous(), "n_items": int(items.shape[0]),
            "step_k": step_k, "step_idx": step_idx,
            "splits": splits.to(torch.int32).contiguous(), "n_splits": int(splits.shape[0]),
            "n_slots": int(is_split.sum()), "heads": h, "tile": tile}


def lut_to(lut, device):
    """A look-up table (a dict of tensors and sizes, nested or not) on ``device``."""
    if isinstance(lut, dict):
        return {k: lut_to(v, device) for k, v in lut.items()}
    return lut.to(device) if torch.is_tensor(lut) else lut


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
def sdd(a, b, trans_a, trans_b, lut, block, nnz, num_warps=None, num_stages=None):
    """c[z, n] = (op(a) @ op(b)) restricted to the nonzero blocks; a, b [Z, H, ., .]."""
    z = a.shape[0]
    sa = a.stride()
    sb = b.stride()
    # (z, h, row, k) strides of op(a); (z, h, k, col) strides of op(b)
    a_m, a_k = (sa[3], sa[2]) if trans_a else (sa[2], sa[3])
    b_k, b_n = (sb[3], sb[2]) if trans_b else (sb[2], sb[3])
    M = a.shape[3] if trans_a else a.shape[2]
    K = a.shape[2] if trans_a else a.shape[3]
    N = b.shape[2] if trans_b else b.shape[3]
    tile = lut["tile"]
    tile_k = min(64, max(16, next_pow2(K)))
    c = torch.empty((z, nnz, block, block), dtype=a.dtype, device=a.device)
    if lut["items"] == 0 or z == 0:
        return c
    nw = num_warps or (8 if tile >= 128 else 4)
    ns = num_stages or (1 if K <= tile_k else (2 if tile >= 128 else 3))
    grid = (lut["items"], z)
    _launch_sdd_kernel(
        grid, a, b, c, lut["hij"], lut["idx"], M, N, K,
        sa[0], sa[1], a_m, a_k, sb[0], sb[1], b_k, b_n, c.stride(0),
        BLOCK=block, TILE=tile, TILE_K=tile_k,
        EVEN_MN=(M % tile == 0 and N % tile == 0), EVEN_K=(K % tile_k == 0),
        UPCAST=common.needs_upcast(a), PRECISION=common.dot_precision(a), R=tile // block,
        num_warps=nw, num_stages=ns)
    return c


def dsd(a, b, trans_a, trans_b, lut, block, out_rows, out=None, out_transposed=False,
        num_warps=None, num_stages=None, tile_n=None):
    """c = op(A) @ op(b): a sparse [Z, nnz, block, block], b dense [Z, H, ., .].

    ``out_rows``: rows of op(A). With ``out_transposed`` the result is written as c^T
    into ``out`` ([Z, H, N, out_rows]), which is how dense x sparse is computed."""
    z = b.shape[0]
    h = lut["heads"]
    sb = b.stride()
    b_k, b_n = (sb[3], sb[2]) if trans_b else (sb[2], sb[3])
    K = b.shape[3] if trans_b else b.shape[2]
    N = b.shape[2] if trans_b else b.shape[3]
    M = out_rows
    if out is None:
        out = torch.empty((z, h, N, M) if out_transposed else (z, h, M, N),
                          dtype=b.dtype, device=b.device)
    sc = out.stride()
    c_m, c_n = (sc[3], sc[2]) if out_transposed else (sc[2], sc[3])
    if z == 0 or M == 0 or N == 0:
        return out
    tile = lut["tile"]
    if tile_n is None:
        tile_n = max(16, next_pow2(N)) if N <= 128 else (128 if tile >= 128 else 64)
    n_tiles = triton.cdiv(N, tile_n)
    n_pad = n_tiles * tile_n
    ws = out
    if lut["n_slots"]:
        ws = torch.empty((z, lut["n_slots"], tile, n_pad), dtype=torch.float32, device=b.device)
    ar, ak = (1, block) if trans_a else (block, 1)
    if num_warps is None:
        num_warps = 8 if tile * tile_n >= 128 * 128 else 4
    if num_stages is None:
        num_stages = 2
    even_mk = M % tile == 0 and K % tile == 0
    _launch_dsd_kernel(
        (lut["n_items"], n_tiles, z),
        a, b, out, lut["items"], lut["step_k"], lut["step_idx"], ws, M, N, K, n_pad,
        a.stride(0), ar, ak, sb[0], sb[1], b_k, b_n,
        sc[0], sc[1], c_m, c_n, ws.stride(0) if lut["n_slots"] else 0,
        BLOCK=block, TILE=tile, TILE_N=tile_n,
        EVEN_MK=even_mk, EVEN_N=(N % tile_n == 0),
        UPCAST=common.needs_upcast(b), PRECISION=common.dot_precision(b),
        R=tile // block, num_warps=num_warps, num_stages=num_stages)
    if lut["n_splits"]:
        _launch_dsd_reduce_kernel(
            (lut["n_splits"], n_tiles, z),
            out, ws, lut["splits"], M, N, n_pad, sc[0], sc[1], c_m, c_n, ws.stride(0),
            TILE=tile, TILE_N=tile_n, num_warps=4)
    return out
