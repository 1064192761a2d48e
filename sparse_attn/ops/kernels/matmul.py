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

PRECISION is the products' input precision: "ieee" for float32 inputs unless the user allows
TF32, "tf32" otherwise (ignored for 16-bit inputs). Their look-up tables and launches are in
``sparse_attn/ops/matmul_triton.py``.
"""
import triton
import triton.language as tl


@triton.jit
def _sdd_kernel(A, B, C, LUT_HIJ, LUT_IDX,
                M, N, K,
                stride_az, stride_ah, stride_am, stride_ak,
                stride_bz, stride_bh, stride_bk, stride_bn,
                stride_cz,
                BLOCK: tl.constexpr, TILE: tl.constexpr, TILE_K: tl.constexpr,
                EVEN_MN: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr,
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
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
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
                PRECISION: tl.constexpr,
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
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
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
