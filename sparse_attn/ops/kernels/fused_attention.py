"""Fused block-sparse flash attention: Triton kernels only.

One program owns one (work item, batch). A work item is a query tile (forward, dq) or a key
tile (dk/dv) and a range [lo, hi) of the look-up table (LUT) of the tiles that row / column
touches; long rows are cut into several items whose fp32 partial results go to a workspace
(slot >= 0) and are merged: in the forward by the row's last item to finish (an arrival
counter per split row), in the backward by the reduce kernel. Scores never leave registers
(online softmax, FlashAttention-2).

LUT layout (built by ``sparse_attn.ops.fused``; all int32 unless said):
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

Scores are kept in base 2: s2 = q.k * scale * log2(e) (+ kpm * log2(e)); LSE is stored in the
same units (+inf for a row that sees no key, so that its probabilities and gradients are 0).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    # UPCAST is set only under TRITON_INTERPRET for bfloat16, whose dot the interpreter
    # gets wrong (numpy has no bfloat16); on a GPU the operands go to the tensor cores as-is.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in the tensor-core instruction."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _work_item(WORK, w, n_work):
    """Work item w: (row or column id = h * n_own + tile, LUT range lo, hi, workspace slot)."""
    return (tl.load(WORK + w), tl.load(WORK + n_work + w), tl.load(WORK + 2 * n_work + w),
            tl.load(WORK + 3 * n_work + w))


@triton.jit
def _first_tile(WORK, w, n_work):
    """IDX[row, lo] of work item w (loaded beside its record)."""
    return tl.load(WORK + 4 * n_work + w)


@triton.jit
def _load_rows(base, rows, stride, offs_d, N, BOUNDED: tl.constexpr):
    """[len(rows), HEAD_DIM] tile of a [N, HEAD_DIM] matrix at base; rows past N read 0."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if BOUNDED:
        return tl.load(ptrs, mask=(rows < N)[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_tile(desc, base, b, h, first, rows, stride, offs_d, N, BOUNDED: tl.constexpr,
               TMA: tl.constexpr):
    """Rows first .. first + len(rows) - 1 (= rows) of the [N, HEAD_DIM] matrix (b, h): by
    TMA through desc, a host descriptor over the [B, H, N, HEAD_DIM] tensor with block
    [1, 1, len(rows), HEAD_DIM] (one copy instruction, no address tensor; rows past N read 0
    as the descriptor's bounds say), else through pointers from base (that matrix's origin)."""
    if TMA:
        return tl.reshape(desc.load([b, h, first, 0]), [rows.shape[0], offs_d.shape[0]])
    else:
        return _load_rows(base, rows, stride, offs_d, N, BOUNDED)


@triton.jit
def _load_kv(K_desc, V_desc, K_base, V_base, b, h, first, cols, stride_kn, stride_vn, offs_d, N,
             BOUNDED: tl.constexpr, TMA: tl.constexpr):
    """The K and V tiles of key rows cols = first, first + 1, ... (see _load_tile)."""
    return (_load_tile(K_desc, K_base, b, h, first, cols, stride_kn, offs_d, N, BOUNDED, TMA),
            _load_tile(V_desc, V_base, b, h, first, cols, stride_vn, offs_d, N, BOUNDED, TMA))


@triton.jit
def _load_vec(base, idx, N, other, BOUNDED: tl.constexpr):
    """base[idx] (float32 rows of LSE, delta or the key padding mask); past N reads other."""
    if BOUNDED:
        return tl.load(base + idx, mask=idx < N, other=other)
    else:
        return tl.load(base + idx)


@triton.jit
def _lut_row(NFULL, r, n_other, ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr):
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
def _bit_index(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNIT_M: tl.constexpr,
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
def _keep(x, fill, BITS, it, bitidx, qrow, kcol, FINE: tl.constexpr, CAUSAL: tl.constexpr,
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
def _fwd_inner(acc, l_i, m_i, q, K_desc, V_desc, K_base, V_base, KPM_base, IDX, BITS, lo, hi,
               lo0, first0, b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx, N,
               qk_scale,
               BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, FINE: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
               BITS32: tl.constexpr, UPCAST: tl.constexpr, POS_SCALE: tl.constexpr,
               TMA: tl.constexpr):
    for it in range(lo, hi):
        # entry lo0 of the LUT row (the work item's first) came with the record: its K/V
        # loads need not wait for a LUT read (measured: 1-2% off the forward)
        first = tl.load(IDX + it, mask=it != lo0, other=first0) * BLOCK_N
        cols = first + offs_n
        k, v = _load_kv(K_desc, V_desc, K_base, V_base, b, h, first, cols, stride_kn,
                        stride_vn, offs_d, N, PARTIAL and not EVEN, TMA)
        qk = _mm(q, tl.trans(k), UPCAST)
        if POS_SCALE and not PARTIAL and not HAS_KPM:
            # a full tile without key padding: every score is finite, and with a positive
            # scale the row max can be taken on the raw products, so that scaling and
            # subtracting the max are one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            s = qk * qk_scale
            if HAS_KPM:
                kpm = _load_vec(KPM_base, cols, N, 0.0, PARTIAL and not EVEN)
                s = s + kpm[None, :] * 1.4426950408889634
            if PARTIAL:
                s = _keep(s, float("-inf"), BITS, it, bitidx, offs_m[:, None], cols[None, :],
                          FINE, CAUSAL, BITS32)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_store(O, O_desc, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob, stride_oh,
               stride_om, H, N, EVEN: tl.constexpr, TMA: tl.constexpr):
    """Normalise and store the output of query rows offs_m = m0, m0 + 1, ... of (b, h),
    through O_desc when TMA (its bounds drop the rows past N), and their LSE."""
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    empty = l_i == 0.0
    out = (acc / tl.where(empty, 1.0, l_i)[:, None]).to(O.dtype.element_ty)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    lse_ptrs = LSE + (b64 * H + h64) * N + offs_m
    if TMA:
        O_desc.store([b, h, m0, 0],
                     tl.reshape(out, [1, 1, offs_m.shape[0], offs_d.shape[0]]))
    else:
        o_ptrs = O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + \
            offs_d[None, :]
        if EVEN:
            tl.store(o_ptrs, out)
        else:
            tl.store(o_ptrs, out, mask=(offs_m < N)[:, None])
    if EVEN:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < N)


@triton.jit
def _tile_store(OUT, x, b64, h64, offs_r, offs_d, s_b, s_h, s_m, N, EVEN: tl.constexpr):
    """x (fp32 [rows, HEAD_DIM]) -> rows offs_r of OUT[b, h]; OUT [B, H, N, HEAD_DIM] with
    strides (s_b, s_h, s_m, 1)."""
    ptrs = OUT + b64 * s_b + h64 * s_h + offs_r[:, None] * s_m + offs_d[None, :]
    if EVEN:
        tl.store(ptrs, x.to(OUT.dtype.element_ty))
    else:
        tl.store(ptrs, x.to(OUT.dtype.element_ty), mask=(offs_r < N)[:, None])


@triton.jit
def fused_attn_fwd_kernel(
        Q, K, V, O, LSE, KPM, Q_DESC, K_DESC, V_DESC, O_DESC,
        IDX, BITS, NFULL, WORK, WS_ACC, WS_ML, SPLIT, SLOT_SPLIT, COUNT,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_kpmb,
        B, H, N, n_qt, n_kt, n_work, n_split, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr,
        ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr, HAS_SPLIT: tl.constexpr,
        POS_SCALE: tl.constexpr, TMA: tl.constexpr):
    """One program per (work item, batch). A work item is a range [lo, hi) of one row of the
    LUT; a long row (a global row) is cut into several items whose partial results go to the
    workspace (slot >= 0): the last of them to finish merges them all and stores the row
    (SPLIT: [3, n_split] row, first slot, items; SLOT_SPLIT: split row of each slot; COUNT:
    int32 [n_split * B] arrivals, zero at launch). TMA: the Q, K and V tiles come through the
    descriptors Q_DESC, K_DESC, V_DESC and O goes out through O_DESC (else those are
    None)."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r, lo, hi, slot = _work_item(WORK, w, n_work)  # r = h * n_qt + query tile
    first0 = _first_tile(WORK, w, n_work)
    b64 = b.to(tl.int64)
    h = r // n_qt
    h64 = h.to(tl.int64)
    m0 = (r % n_qt) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q_DESC, Q + b64 * stride_qb + h64 * stride_qh, b, h, m0, offs_m, stride_qm,
                   offs_d, N, not EVEN, TMA)
    K_base = K + b64 * stride_kb + h64 * stride_kh
    V_base = V + b64 * stride_vb + h64 * stride_vh
    if HAS_KPM:
        KPM_base = KPM + b64 * stride_kpmb
    else:  # None: no pointer argument to pass
        KPM_base = KPM
    bitidx = _bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, False)
    row, nfull = _lut_row(NFULL, r, n_kt, ONE_LOOP, ALL_FULL)
    if FINE:
        BITS_row = BITS + row
    else:  # None
        BITS_row = BITS
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not ONE_LOOP:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_DESC, V_DESC, K_base, V_base, KPM_base,
                                   IDX + row, BITS_row, lo, tl.minimum(hi, nfull), lo, first0,
                                   b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx,
                                   N, qk_scale, BLOCK_N, False, FINE, CAUSAL, HAS_KPM, EVEN,
                                   BITS32, UPCAST, POS_SCALE, TMA)
    if not ALL_FULL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_DESC, V_DESC, K_base, V_base, KPM_base,
                                   IDX + row, BITS_row, tl.maximum(lo, nfull), hi, lo, first0,
                                   b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx,
                                   N, qk_scale, BLOCK_N, True, FINE, CAUSAL, HAS_KPM, EVEN,
                                   BITS32, UPCAST, POS_SCALE, TMA)
    if HAS_SPLIT:  # else the workspace pointers are None and every slot is -1
        if slot < 0:
            _fwd_store(O, O_DESC, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob,
                       stride_oh, stride_om, H, N, EVEN, TMA)
        else:
            ws = slot.to(tl.int64) * B + b64
            rr = tl.arange(0, BLOCK_M)
            tl.store(WS_ACC + ws * BLOCK_M * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :],
                     acc)
            tl.store(WS_ML + ws * 2 * BLOCK_M + rr, m_i)
            tl.store(WS_ML + ws * 2 * BLOCK_M + BLOCK_M + rr, l_i)
            j = tl.load(SLOT_SPLIT + slot)
            n = tl.load(SPLIT + 2 * n_split + j)
            # every thread's workspace stores come before the arrival (the barrier), and the
            # arrival releases them to the program that merges (its acquire)
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNT + j * B + b, 1, sem="acq_rel", scope="gpu")
            if arrived == n - 1:  # the row's last item: merge (without a second launch)
                tl.store(COUNT + j * B + b, 0)  # as the next call expects it
                start = tl.load(SPLIT + n_split + j)
                acc, l_i, m_i = _merge_items(WS_ACC, WS_ML, start, n, B, b64, rr, offs_d,
                                               BLOCK_M, HEAD_DIM)
                _fwd_store(O, O_DESC, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob,
                           stride_oh, stride_om, H, N, EVEN, TMA)
    else:
        _fwd_store(O, O_DESC, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob,
                   stride_oh, stride_om, H, N, EVEN, TMA)


@triton.jit
def _merge_items(WS_ACC, WS_ML, start, n, B, b64, rr, offs_d, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """(acc, sum, max) of a split row, from the partial (acc, max, sum) its n work items left
    in workspace slots start .. start + n - 1 (batch b64). Loaded from L2 (``.cg``): the
    items ran on other multiprocessors."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for c in range(start, start + n):
        ws = c * B + b64
        a_c = tl.load(WS_ACC + ws * BLOCK_M * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :],
                      cache_modifier=".cg")
        m_c = tl.load(WS_ML + ws * 2 * BLOCK_M + rr, cache_modifier=".cg")
        l_c = tl.load(WS_ML + ws * 2 * BLOCK_M + BLOCK_M + rr, cache_modifier=".cg")
        m_new = tl.maximum(m_i, m_c)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a1 = tl.math.exp2(m_i - m_use)
        a2 = tl.math.exp2(m_c - m_use)
        l_i = l_i * a1 + l_c * a2
        acc = acc * a1[:, None] + a_c * a2[:, None]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fused_attn_bwd_reduce_kernel(WS, OUT, WS2, OUT2, SPLIT, s_b, s_h, s_m, s2_b, s2_h, s2_m,
                                 B, H, N, n_own, n_split, scale, scale2, BLOCK: tl.constexpr,
                                 HEAD_DIM: tl.constexpr, EVEN: tl.constexpr, TWO: tl.constexpr):
    """OUT[b, h, tile rows] = scale * sum of the partial fp32 tiles of a split row/column
    (and OUT2 from WS2 with scale2 when TWO); OUT, OUT2 [B, H, N, HEAD_DIM] with strides
    (s_b, s_h, s_m, 1) and (s2_b, s2_h, s2_m, 1)."""
    pid = tl.program_id(0)
    b = pid % B
    j = pid // B
    r = tl.load(SPLIT + j)
    start = tl.load(SPLIT + n_split + j)
    n = tl.load(SPLIT + 2 * n_split + j)
    h = r // n_own
    t = r % n_own
    b64 = b.to(tl.int64)
    rr = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    acc2 = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for c in range(start, start + n):
        ws = c * B + b64
        off = ws * BLOCK * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :]
        acc += tl.load(WS + off)
        if TWO:
            acc2 += tl.load(WS2 + off)
    rows = t * BLOCK + rr
    h64 = h.to(tl.int64)
    _tile_store(OUT, acc * scale, b64, h64, rows, offs_d, s_b, s_h, s_m, N, EVEN)
    if TWO:
        _tile_store(OUT2, acc2 * scale2, b64, h64, rows, offs_d, s2_b, s2_h, s2_m, N, EVEN)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K_desc, V_desc, K_base, V_base, KPM_base, IDX, BITS, lo,
              hi, b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx, N, qk_scale,
              BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, FINE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
              BITS32: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    for it in range(lo, hi):
        first = tl.load(IDX + it) * BLOCK_N
        cols = first + offs_n
        k, v = _load_kv(K_desc, V_desc, K_base, V_base, b, h, first, cols, stride_kn,
                        stride_vn, offs_d, N, PARTIAL and not EVEN, TMA)
        s = _mm(q, tl.trans(k), UPCAST) * qk_scale
        if HAS_KPM:
            kpm = _load_vec(KPM_base, cols, N, 0.0, PARTIAL and not EVEN)
            s = s + kpm[None, :] * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        if PARTIAL:
            p = _keep(p, 0.0, BITS, it, bitidx, offs_m[:, None], cols[None, :], FINE, CAUSAL,
                      BITS32)
        dp = _mm(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, UPCAST)
    return dq


@triton.jit
def fused_attn_bwd_dq_kernel(
        Q, K, V, O, DO, DQ, LSE, DELTA, KPM, K_DESC, V_DESC,
        IDX, BITS, NFULL, WORK, WS,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_dob, stride_doh, stride_dom,
        stride_dqb, stride_dqh, stride_dqm,
        stride_kpmb,
        B, H, N, n_qt, n_kt, n_work, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr,
        ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr, HAS_SPLIT: tl.constexpr,
        TMA: tl.constexpr):
    """O, DO, DQ: [B, H, N, HEAD_DIM] with their own strides (last one 1); LSE, DELTA
    contiguous [B, H, N] float32. TMA: K and V tiles come through K_DESC, V_DESC.
    Also writes DELTA = rowsum(dO * O) of its query tile, which the dk/dv kernel (launched
    after this one) reads; the items of a split row all write the same values."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r, lo, hi, slot = _work_item(WORK, w, n_work)  # r = h * n_qt + query tile
    b64 = b.to(tl.int64)
    h = r // n_qt
    h64 = h.to(tl.int64)
    offs_m = (r % n_qt) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    bh = b64 * H + h64
    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, offs_m, stride_qm, offs_d, N, not EVEN)
    do = _load_rows(DO + b64 * stride_dob + h64 * stride_doh, offs_m, stride_dom, offs_d, N,
                    not EVEN)
    o = _load_rows(O + b64 * stride_ob + h64 * stride_oh, offs_m, stride_om, offs_d, N, not EVEN)
    lse = _load_vec(LSE + bh * N, offs_m, N, float("inf"), not EVEN)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if EVEN:
        tl.store(DELTA + bh * N + offs_m, delta)
    else:
        tl.store(DELTA + bh * N + offs_m, delta, mask=offs_m < N)
    K_base = K + b64 * stride_kb + h64 * stride_kh
    V_base = V + b64 * stride_vb + h64 * stride_vh
    if HAS_KPM:
        KPM_base = KPM + b64 * stride_kpmb
    else:  # None: no pointer argument to pass
        KPM_base = KPM
    bitidx = _bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, False)
    row, nfull = _lut_row(NFULL, r, n_kt, ONE_LOOP, ALL_FULL)
    if FINE:
        BITS_row = BITS + row
    else:  # None
        BITS_row = BITS
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not ONE_LOOP:
        dq = _dq_inner(dq, q, do, lse, delta, K_DESC, V_DESC, K_base, V_base, KPM_base,
                       IDX + row, BITS_row, lo, tl.minimum(hi, nfull), b, h, stride_kn,
                       stride_vn, offs_m, offs_n, offs_d, bitidx, N, qk_scale, BLOCK_N, False,
                       FINE, CAUSAL, HAS_KPM, EVEN, BITS32, UPCAST, TMA)
    if not ALL_FULL:
        dq = _dq_inner(dq, q, do, lse, delta, K_DESC, V_DESC, K_base, V_base, KPM_base,
                       IDX + row, BITS_row, tl.maximum(lo, nfull), hi, b, h, stride_kn,
                       stride_vn, offs_m, offs_n, offs_d, bitidx, N, qk_scale, BLOCK_N, True,
                       FINE, CAUSAL, HAS_KPM, EVEN, BITS32, UPCAST, TMA)
    if HAS_SPLIT:  # else WS is None and every slot is -1
        if slot < 0:
            _tile_store(DQ, dq * sm_scale, b64, h64, offs_m, offs_d, stride_dqb, stride_dqh,
                        stride_dqm, N, EVEN)
        else:
            ws = slot.to(tl.int64) * B + b64
            rr = tl.arange(0, BLOCK_M)
            tl.store(WS + ws * BLOCK_M * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :], dq)
    else:
        _tile_store(DQ, dq * sm_scale, b64, h64, offs_m, offs_d, stride_dqb, stride_dqh,
                        stride_dqm, N, EVEN)


@triton.jit
def _dkdv_inner(dk, dv, k, v, kpm, Q_desc, DO_desc, Q_base, DO_base, LSE_base, DELTA_base, IDX,
                BITS, lo, hi, b, h, stride_qm, stride_dom, offs_m, offs_n, offs_d, bitidxT, N,
                qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                PARTIAL: tl.constexpr, FINE: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, EVEN: tl.constexpr, BITS32: tl.constexpr,
                UPCAST: tl.constexpr, TMA: tl.constexpr):
    for it in range(lo, hi):
        first = tl.load(IDX + it) * BLOCK_M
        rows = first + offs_m
        q = _load_tile(Q_desc, Q_base, b, h, first, rows, stride_qm, offs_d, N,
                       PARTIAL and not EVEN, TMA)
        do = _load_tile(DO_desc, DO_base, b, h, first, rows, stride_dom, offs_d, N,
                        PARTIAL and not EVEN, TMA)
        lse = _load_vec(LSE_base, rows, N, float("inf"), PARTIAL and not EVEN)
        delta = _load_vec(DELTA_base, rows, N, 0.0, PARTIAL and not EVEN)
        sT = _mm(k, tl.trans(q), UPCAST) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HAS_KPM:
            sT = sT + kpm[:, None]
        pT = tl.math.exp2(sT - lse[None, :])
        if PARTIAL:
            pT = _keep(pT, 0.0, BITS, it, bitidxT, rows[None, :], offs_n[:, None], FINE, CAUSAL,
                       BITS32)
        dv += _mm(pT.to(do.dtype), do, UPCAST)
        dpT = _mm(v, tl.trans(do), UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk += _mm(dsT.to(q.dtype), q, UPCAST)
    return dk, dv


@triton.jit
def fused_attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, KPM, Q_DESC, DO_DESC,
        IDX, BITS, NFULL, WORK, WS_DK, WS_DV,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_dom,
        stride_dkb, stride_dkh, stride_dkn,
        stride_dvb, stride_dvh, stride_dvn,
        stride_kpmb,
        B, H, N, n_kt, n_qt, n_work, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr,
        ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr, HAS_SPLIT: tl.constexpr,
        TMA: tl.constexpr):
    """Column LUT: one program per (key tile, batch); DO, DK, DV [B, H, N, D] with their own
    strides (last one 1). TMA: Q and dO tiles come through Q_DESC, DO_DESC."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    c, lo, hi, slot = _work_item(WORK, w, n_work)  # c = h * n_kt + key tile
    b64 = b.to(tl.int64)
    h = c // n_kt
    h64 = h.to(tl.int64)
    bh = b64 * H + h64
    offs_n = (c % n_kt) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K + b64 * stride_kb + h64 * stride_kh, offs_n, stride_kn, offs_d, N, not EVEN)
    v = _load_rows(V + b64 * stride_vb + h64 * stride_vh, offs_n, stride_vn, offs_d, N, not EVEN)
    kpm = tl.zeros([BLOCK_N], tl.float32)
    if HAS_KPM:
        kpm = _load_vec(KPM + b64 * stride_kpmb, offs_n, N, 0.0, not EVEN) * 1.4426950408889634
    bitidxT = _bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, True)  # [n, m]
    Q_base = Q + b64 * stride_qb + h64 * stride_qh
    DO_base = DO + b64 * stride_dob + h64 * stride_doh
    LSE_base = LSE + bh * N
    DELTA_base = DELTA + bh * N
    col, nfull = _lut_row(NFULL, c, n_qt, ONE_LOOP, ALL_FULL)
    if FINE:
        BITS_col = BITS + col
    else:  # None
        BITS_col = BITS
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if not ONE_LOOP:
        dk, dv = _dkdv_inner(dk, dv, k, v, kpm, Q_DESC, DO_DESC, Q_base, DO_base, LSE_base,
                             DELTA_base, IDX + col, BITS_col, lo, tl.minimum(hi, nfull), b, h,
                             stride_qm, stride_dom, offs_m, offs_n, offs_d, bitidxT, N,
                             qk_scale, BLOCK_M, HEAD_DIM, False, FINE, CAUSAL, HAS_KPM, EVEN,
                             BITS32, UPCAST, TMA)
    if not ALL_FULL:
        dk, dv = _dkdv_inner(dk, dv, k, v, kpm, Q_DESC, DO_DESC, Q_base, DO_base, LSE_base,
                             DELTA_base, IDX + col, BITS_col, tl.maximum(lo, nfull), hi, b, h,
                             stride_qm, stride_dom, offs_m, offs_n, offs_d, bitidxT, N,
                             qk_scale, BLOCK_M, HEAD_DIM, True, FINE, CAUSAL, HAS_KPM, EVEN,
                             BITS32, UPCAST, TMA)
    if HAS_SPLIT:  # else WS_DK, WS_DV are None and every slot is -1
        if slot < 0:
            _tile_store(DK, dk * sm_scale, b64, h64, offs_n, offs_d, stride_dkb, stride_dkh,
                        stride_dkn, N, EVEN)
            _tile_store(DV, dv, b64, h64, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn,
                        N, EVEN)
        else:
            ws = slot.to(tl.int64) * B + b64
            rr = tl.arange(0, BLOCK_N)
            ws_off = ws * BLOCK_N * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(WS_DK + ws_off, dk)
            tl.store(WS_DV + ws_off, dv)
    else:
        _tile_store(DK, dk * sm_scale, b64, h64, offs_n, offs_d, stride_dkb, stride_dkh,
                    stride_dkn, N, EVEN)
        _tile_store(DV, dv, b64, h64, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, N,
                    EVEN)
