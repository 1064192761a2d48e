"""Fused block-sparse flash attention, Triton only: what the forward (``fused_forward``) and
backward (``fused_backward``) kernels share, and the layout of the tables they read.

One program owns one (work item, batch). A work item is a query tile (forward, dq) or a key
tile (dk/dv) and a range [lo, hi) of the look-up table (LUT) of the tiles that row / column
touches; long rows are cut into several items whose fp32 partial results go to a workspace
(slot >= 0) and are merged: in the forward by the row's last item to finish (an arrival
counter per split row), in the backward by the reduce kernel. Scores never leave registers
(online softmax, FlashAttention-2).

LUT layout (built by ``sparse_attn.ops.fused.lut``; all int32 unless said):
  IDX   [H * n_own, n_other]  tile indices, the FULL tiles first, then the PARTIAL ones
  NFULL [H * n_own]           number of full tiles of each row (column) of tiles
  BITS  [H * n_own, n_other]  int64, for partial tiles: one bit per (sub-row, sub-column)
                              unit of the tile that the layout keeps; bit index
                              (row_in_tile // UNIT_M) * (BLOCK_N // UNIT_N) + col_in_tile // UNIT_N
  WORK  [5, n_work]           the work items: rows (row id = h * n_own + tile), LUT range
                              lo and hi, workspace slot or -1, and IDX[row, lo] (the item's
                              first tile, so that its first load waits on the record alone,
                              not on a LUT read after it); in launch order: long items
                              first, the rest in (head, tile) order (neighbours share K/V in
                              L2). One tensor, so one pointer argument (each pointer costs a
                              driver call per launch)
  SPLIT [3, n_split]          the split rows, their first slot and number of items
  SLOT_SPLIT [n_slots]        the split row of each workspace slot (forward)
KPM, BITS, NFULL and the workspaces are None (no pointer argument at all) when HAS_KPM,
FINE, ALL_FULL (no partial tile in the whole LUT) or HAS_SPLIT say they are not needed.
With TMA (Hopper and later), the tiles a row / column walks come through host tensor
descriptors over the [B, H, N, HEAD_DIM] tensors (block [1, 1, rows, HEAD_DIM]; rows past N
read 0) instead of pointer tensors: K, V in the forward and dq, Q, dO in dk/dv, and the
forward's own Q tile and O tile. Without it the *_DESC arguments are None.
O, dO, dQ, dK, dV have their own strides (last one 1), so the output and the gradients can
keep the memory format of q, k, v.
A full tile needs no mask at all (unless a key padding mask is given, which is added to every
tile). A partial tile applies the fine-layout bits (FINE), the causal mask (CAUSAL) and, when
the sequence is not a multiple of the tile (EVEN false), bounded loads (the units past the
end have no bit set, so such tiles are always partial).

Packed tiles (GATHER_Q, GATHER_K; ``sparse_attn.ops.fused.grouping``): query (key) tile t of
head h is rows QMAP[h, t * BLOCK_M ...] (KMAP[h, ...]) of the sequence, not a contiguous range:
QMAP, KMAP [H, n_map] int32 token maps (N past the end, so such rows read 0 and are never
stored). Gathered tiles move through pointers (never TMA); the bits, the causal rule (on
token positions) and the LUTs are as above, on the tiles of the maps.

Scores are kept in base 2: s2 = q.k * scale * log2(e) (+ kpm * log2(e)); LSE is stored in the
same units (+inf for a row that sees no key, so that its probabilities and gradients are 0).
"""
import triton
import triton.language as tl


@triton.jit
def mm(a, b, UPCAST: tl.constexpr):
    # UPCAST is set only under TRITON_INTERPRET for bfloat16, whose dot the interpreter
    # gets wrong (numpy has no bfloat16); on a GPU the operands go to the tensor cores as-is.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in the tensor-core instruction."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def work_item(WORK, w, n_work):
    """Work item w: (row or column id = h * n_own + tile, LUT range lo, hi, workspace slot)."""
    return (tl.load(WORK + w), tl.load(WORK + n_work + w), tl.load(WORK + 2 * n_work + w),
            tl.load(WORK + 3 * n_work + w))


@triton.jit
def first_tile(WORK, w, n_work):
    """IDX[row, lo] of work item w (loaded beside its record)."""
    return tl.load(WORK + 4 * n_work + w)


@triton.jit
def tile_rows(MAP, h64, n_map, first, offs, GATHER: tl.constexpr):
    """The sequence rows of the tile starting at position first: first + offs, or through
    the token map MAP of head h when GATHER."""
    if GATHER:
        return tl.load(MAP + h64 * n_map + first + offs)
    else:
        return first + offs


@triton.jit
def load_rows(base, rows, stride, offs_d, N, BOUNDED: tl.constexpr):
    """[len(rows), HEAD_DIM] tile of a [N, HEAD_DIM] matrix at base; rows past N read 0."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if BOUNDED:
        return tl.load(ptrs, mask=(rows < N)[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_tile(desc, base, b, h, first, rows, stride, offs_d, N, BOUNDED: tl.constexpr,
               TMA: tl.constexpr):
    """Rows first .. first + len(rows) - 1 (= rows) of the [N, HEAD_DIM] matrix (b, h): by
    TMA through desc, a host descriptor over the [B, H, N, HEAD_DIM] tensor with block
    [1, 1, len(rows), HEAD_DIM] (one copy instruction, no address tensor; rows past N read 0
    as the descriptor's bounds say), else through pointers from base (that matrix's origin)."""
    if TMA:
        return tl.reshape(desc.load([b, h, first, 0]), [rows.shape[0], offs_d.shape[0]])
    else:
        return load_rows(base, rows, stride, offs_d, N, BOUNDED)


@triton.jit
def load_kv(K_desc, V_desc, K_base, V_base, b, h, first, cols, stride_kn, stride_vn, offs_d, N,
             BOUNDED: tl.constexpr, TMA: tl.constexpr):
    """The K and V tiles of key rows cols = first, first + 1, ... (see load_tile)."""
    return (load_tile(K_desc, K_base, b, h, first, cols, stride_kn, offs_d, N, BOUNDED, TMA),
            load_tile(V_desc, V_base, b, h, first, cols, stride_vn, offs_d, N, BOUNDED, TMA))


@triton.jit
def load_vec(base, idx, N, other, BOUNDED: tl.constexpr):
    """base[idx] (float32 rows of LSE, delta or the key padding mask); past N reads other."""
    if BOUNDED:
        return tl.load(base + idx, mask=idx < N, other=other)
    else:
        return tl.load(base + idx)


@triton.jit
def lut_row(NFULL, r, n_other, ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr):
    """(offset of LUT row / column r in IDX and BITS, its number of full tiles). ONE_LOOP
    sends every tile through the masked loop (full tiles have all bits set): 0 full tiles.
    ALL_FULL: the LUT has no partial tile at all, so every tile is full (no load; the
    kernels then compile the mask-free loop only)."""
    if ONE_LOOP:
        nfull = 0
    elif ALL_FULL:
        nfull = n_other
    else:
        nfull = tl.load(NFULL + r)
    return r.to(tl.int64) * n_other, nfull


@triton.jit
def bit_index(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNIT_M: tl.constexpr,
               UNIT_N: tl.constexpr, BITS32: tl.constexpr, TRANS: tl.constexpr):
    """Bit of score (m, n) in a tile's unit mask: (m // UNIT_M) * (BLOCK_N // UNIT_N) +
    n // UNIT_N; [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] when TRANS."""
    if TRANS:
        idx = (tl.arange(0, BLOCK_M) // UNIT_M)[None, :] * (BLOCK_N // UNIT_N) + \
            (tl.arange(0, BLOCK_N) // UNIT_N)[:, None]
    else:
        idx = (tl.arange(0, BLOCK_M) // UNIT_M)[:, None] * (BLOCK_N // UNIT_N) + \
            (tl.arange(0, BLOCK_N) // UNIT_N)[None, :]
    if not BITS32:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def keep(x, fill, BITS, it, bitidx, qrow, kcol, FINE: tl.constexpr, CAUSAL: tl.constexpr,
          BITS32: tl.constexpr):
    """x where a partial tile keeps the score, fill elsewhere: the unit bits of LUT entry it
    (FINE) and the causal rule qrow >= kcol (qrow, kcol broadcast to x's shape)."""
    if FINE:
        bits = tl.load(BITS + it)
        if BITS32:
            bits = bits.to(tl.int32)
        x = tl.where(((bits >> bitidx) & 1) != 0, x, fill)
    if CAUSAL:
        x = tl.where(qrow >= kcol, x, fill)
    return x


@triton.jit
def tile_store(OUT, x, b64, h64, offs_r, offs_d, s_b, s_h, s_m, N, EVEN: tl.constexpr):
    """x (fp32 [rows, HEAD_DIM]) -> rows offs_r of OUT[b, h]; OUT [B, H, N, HEAD_DIM] with
    strides (s_b, s_h, s_m, 1)."""
    ptrs = OUT + b64 * s_b + h64 * s_h + offs_r[:, None] * s_m + offs_d[None, :]
    if EVEN:
        tl.store(ptrs, x.to(OUT.dtype.element_ty))
    else:
        tl.store(ptrs, x.to(OUT.dtype.element_ty), mask=(offs_r < N)[:, None])
