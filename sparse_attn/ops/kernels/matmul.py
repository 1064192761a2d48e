"""Triton kernels for block-sparse matrix products in DeepSpeed's block-sparse format.

Block-sparse tensors are ``[batch, nnz, block, block]`` (contiguous), blocks in the order of
``layout.nonzero()`` (head, row, col). Two kernels do all the work:

* ``_sdd_kernel``: sparse = dense x dense. One program per nonzero *tile* of the output
  (a tile is ``TILE x TILE`` with ``TILE = max(64, block)``); small blocks (16, 32) are
  grouped into tensor-core-sized tiles and the empty sub-blocks of a tile are not stored.
* ``_dsd_kernel``: dense = sparse x dense. One program per (head, row tile, column tile)
  of the dense output; it walks the nonzero tiles of its row through a look-up table.
  dense x sparse (``dds``) runs on the same kernel through ``C^T = B^T A^T``: the output
  is written through transposed strides.

The look-up tables are built here from the layout (plain torch on the CPU) and moved to
the device once by the caller; the launchers do no host-device synchronisation.
"""
import sys

import torch
import triton
import triton.language as tl

from ..launch import Launcher


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def tile_for_block(block):
    """Tile edge (rows and k) the kernels use for a block size."""
    return max(64, block)


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _sdd_kernel(A, B, C, LUT_HIJ, LUT_IDX,
                M, N, K,
                stride_az, stride_ah, stride_am, stride_ak,
                stride_bz, stride_bh, stride_bk, stride_bn,
                stride_cz,
                BLOCK: tl.constexpr, TILE: tl.constexpr, TILE_K: tl.constexpr,
                EVEN_MN: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                R: tl.constexpr):
    item = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    h = tl.load(LUT_HIJ + item * 3 + 0).to(tl.int64)
    ti = tl.load(LUT_HIJ + item * 3 + 1)
    tj = tl.load(LUT_HIJ + item * 3 + 2)
    offs_r = tl.arange(0, TILE)
    offs_m = ti * TILE + offs_r
    offs_n = tj * TILE + offs_r
    offs_k = tl.arange(0, TILE_K)
    a_ptrs = (A + z * stride_az + h * stride_ah
              + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = (B + z * stride_bz + h * stride_bh
              + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn)
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    for k in range(0, K, TILE_K):
        if EVEN_K and EVEN_MN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k), other=0.)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k) & (offs_n[None, :] < N), other=0.)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += TILE_K * stride_ak
        b_ptrs += TILE_K * stride_bk
    c = acc.to(C.dtype.element_ty)
    in_blk = (offs_r % BLOCK)[:, None] * BLOCK + (offs_r % BLOCK)[None, :]
    if R == 1:
        idx = tl.load(LUT_IDX + item).to(tl.int64)
        tl.store(C + z * stride_cz + idx * (BLOCK * BLOCK) + in_blk, c)
    else:
        idx = tl.load(LUT_IDX + item * (R * R)
                      + (offs_r // BLOCK)[:, None] * R + (offs_r // BLOCK)[None, :])
        tl.store(C + z * stride_cz + idx.to(tl.int64) * (BLOCK * BLOCK) + in_blk, c,
                 mask=idx >= 0)


@triton.jit
def _dsd_kernel(A, B, C, ITEMS, STEP_K, STEP_IDX, WS,
                M, N, K, n_pad,
                stride_az, stride_ar, stride_ak,
                stride_bz, stride_bh, stride_bk, stride_bn,
                stride_cz, stride_ch, stride_cm, stride_cn, stride_wz,
                BLOCK: tl.constexpr, TILE: tl.constexpr, TILE_N: tl.constexpr,
                EVEN_MK: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                R: tl.constexpr):
    item = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    h = tl.load(ITEMS + item * 5 + 0).to(tl.int64)
    ti = tl.load(ITEMS + item * 5 + 1)
    start = tl.load(ITEMS + item * 5 + 2)
    end = tl.load(ITEMS + item * 5 + 3)
    slot = tl.load(ITEMS + item * 5 + 4)
    offs_r = tl.arange(0, TILE)
    offs_k = tl.arange(0, TILE)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    a_base = (A + z * stride_az
              + (offs_r % BLOCK)[:, None] * stride_ar + (offs_k % BLOCK)[None, :] * stride_ak)
    b_base = B + z * stride_bz + h * stride_bh + offs_n[None, :] * stride_bn
    acc = tl.zeros((TILE, TILE_N), dtype=tl.float32)
    for s in range(start, end):
        tk = tl.load(STEP_K + s)
        krow = tk * TILE + offs_k
        if R == 1:
            idx = tl.load(STEP_IDX + s).to(tl.int64)
            a = tl.load(a_base + idx * (BLOCK * BLOCK))
        else:
            idx = tl.load(STEP_IDX + s * (R * R)
                          + (offs_r // BLOCK)[:, None] * R + (offs_k // BLOCK)[None, :])
            a = tl.load(a_base + idx.to(tl.int64) * (BLOCK * BLOCK), mask=idx >= 0, other=0.)
        b_ptrs = b_base + krow[:, None] * stride_bk
        if EVEN_MK and EVEN_N:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=(krow[:, None] < K) & (offs_n[None, :] < N), other=0.)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    if slot < 0:
        c = acc.to(C.dtype.element_ty)
        offs_m = ti * TILE + offs_r
        c_ptrs = (C + z * stride_cz + h * stride_ch
                  + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn)
        if EVEN_MK and EVEN_N:
            tl.store(c_ptrs, c)
        else:
            tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    else:
        # one piece of a long row: float32 partial sum, added up by _dsd_reduce_kernel
        w_ptrs = (WS + z * stride_wz + slot.to(tl.int64) * (TILE * n_pad)
                  + offs_r[:, None] * n_pad + offs_n[None, :])
        tl.store(w_ptrs, acc)


@triton.jit
def _dsd_reduce_kernel(C, WS, SPLITS, M, N, n_pad,
                       stride_cz, stride_ch, stride_cm, stride_cn, stride_wz,
                       TILE: tl.constexpr, TILE_N: tl.constexpr):
    item = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    h = tl.load(SPLITS + item * 4 + 0).to(tl.int64)
    ti = tl.load(SPLITS + item * 4 + 1)
    slot0 = tl.load(SPLITS + item * 4 + 2)
    npieces = tl.load(SPLITS + item * 4 + 3)
    offs_r = tl.arange(0, TILE)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    w_ptrs = (WS + z * stride_wz + slot0.to(tl.int64) * (TILE * n_pad)
              + offs_r[:, None] * n_pad + offs_n[None, :])
    acc = tl.zeros((TILE, TILE_N), dtype=tl.float32)
    for _ in range(0, npieces):
        acc += tl.load(w_ptrs)
        w_ptrs += TILE * n_pad
    offs_m = ti * TILE + offs_r
    c_ptrs = (C + z * stride_cz + h * stride_ch
              + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


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
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in lut.items()}


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
def _upcast(t):
    # Triton's CPU interpreter computes bf16 dots wrongly (triton 3.9): upcast there only
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


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
    tile_k = min(64, max(16, _next_pow2(K)))
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
        UPCAST=_upcast(a), R=tile // block, num_warps=nw, num_stages=ns)
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
        tile_n = max(16, _next_pow2(N)) if N <= 128 else (128 if tile >= 128 else 64)
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
        UPCAST=_upcast(b), R=tile // block, num_warps=num_warps, num_stages=num_stages)
    if lut["n_splits"]:
        _launch_dsd_reduce_kernel(
            (lut["n_splits"], n_tiles, z),
            out, ws, lut["splits"], M, N, n_pad, sc[0], sc[1], c_m, c_n, ws.stride(0),
            TILE=tile, TILE_N=tile_n, num_warps=4)
    return out


# launched as _launch_<kernel>(grid, *args, **constexprs): see ops/launch.py
_launch_sdd_kernel = Launcher(sys.modules[__name__], '_sdd_kernel')
_launch_dsd_kernel = Launcher(sys.modules[__name__], '_dsd_kernel')
_launch_dsd_reduce_kernel = Launcher(sys.modules[__name__], '_dsd_reduce_kernel')
