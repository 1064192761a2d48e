"""Fused block-sparse flash attention, Triton only: the forward kernel (online softmax over
the key tiles of a work item; split rows merged by the row's last item). Tables and shared
helpers: ``fused_common``."""
import triton
import triton.language as tl

from .fused_common import (bit_index, first_tile, keep, load_kv, load_tile, load_vec, lut_row, mm,
                           mma, tile_rows, work_item)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_desc, V_desc, K_base, V_base, KPM_base, KMAP, IDX, BITS, lo,
               hi, lo0, first0, b, h, stride_kn, stride_vn, n_map, offs_m, offs_n, offs_d,
               bitidx, N, qk_scale,
               BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, FINE: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
               BITS32: tl.constexpr, UPCAST: tl.constexpr, POS_SCALE: tl.constexpr,
               TMA: tl.constexpr, GATHER_K: tl.constexpr):
    h64 = h.to(tl.int64)
    for it in range(lo, hi):
        # entry lo0 of the LUT row (the work item's first) came with the record: its K/V
        # loads need not wait for a LUT read (measured: 1-2% off the forward)
        first = tl.load(IDX + it, mask=it != lo0, other=first0) * BLOCK_N
        cols = tile_rows(KMAP, h64, n_map, first, offs_n, GATHER_K)
        k, v = load_kv(K_desc, V_desc, K_base, V_base, b, h, first, cols, stride_kn,
                        stride_vn, offs_d, N, PARTIAL and not EVEN, TMA and not GATHER_K)
        qk = mm(q, tl.trans(k), UPCAST)
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
                kpm = load_vec(KPM_base, cols, N, 0.0, PARTIAL and not EVEN)
                s = s + kpm[None, :] * 1.4426950408889634
            if PARTIAL:
                s = keep(s, float("-inf"), BITS, it, bitidx, offs_m[:, None], cols[None, :],
                          FINE, CAUSAL, BITS32)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_store(O, O_desc, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob, stride_oh,
               stride_om, H, N, EVEN: tl.constexpr, TMA: tl.constexpr):
    """Normalise and store the output of query rows offs_m (m0, m0 + 1, ... when TMA) of
    (b, h), through O_desc when TMA (its bounds drop the rows past N), and their LSE."""
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
def fused_attn_fwd_kernel(
        Q, K, V, O, LSE, KPM, Q_DESC, K_DESC, V_DESC, O_DESC,
        IDX, BITS, NFULL, WORK, WS_ACC, WS_ML, SPLIT, SLOT_SPLIT, COUNT, QMAP, KMAP,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_kpmb,
        B, H, N, n_qt, n_kt, n_work, n_split, n_map, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr,
        ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr, HAS_SPLIT: tl.constexpr,
        POS_SCALE: tl.constexpr, TMA: tl.constexpr, GATHER_Q: tl.constexpr,
        GATHER_K: tl.constexpr):
    """One program per (work item, batch). A work item is a range [lo, hi) of one row of the
    LUT; a long row (a global row) is cut into several items whose partial results go to the
    workspace (slot >= 0): the last of them to finish merges them all and stores the row
    (SPLIT: [3, n_split] row, first slot, items; SLOT_SPLIT: split row of each slot; COUNT:
    int32 [n_split * B] arrivals, zero at launch). TMA: the Q, K and V tiles come through the
    descriptors Q_DESC, K_DESC, V_DESC and O goes out through O_DESC (else those are
    None; a gathered tile moves through pointers). QMAP, KMAP: token maps of packed tiles
    (None unless GATHER_Q, GATHER_K)."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r, lo, hi, slot = work_item(WORK, w, n_work)  # r = h * n_qt + query tile
    first0 = first_tile(WORK, w, n_work)
    b64 = b.to(tl.int64)
    h = r // n_qt
    h64 = h.to(tl.int64)
    m0 = (r % n_qt) * BLOCK_M
    offs_m = tile_rows(QMAP, h64, n_map, m0, tl.arange(0, BLOCK_M), GATHER_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_tile(Q_DESC, Q + b64 * stride_qb + h64 * stride_qh, b, h, m0, offs_m, stride_qm,
                   offs_d, N, not EVEN, TMA and not GATHER_Q)
    K_base = K + b64 * stride_kb + h64 * stride_kh
    V_base = V + b64 * stride_vb + h64 * stride_vh
    if HAS_KPM:
        KPM_base = KPM + b64 * stride_kpmb
    else:  # None: no pointer argument to pass
        KPM_base = KPM
    bitidx = bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, False)
    row, nfull = lut_row(NFULL, r, n_kt, ONE_LOOP, ALL_FULL)
    if FINE:
        BITS_row = BITS + row
    else:  # None
        BITS_row = BITS
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not ONE_LOOP:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_DESC, V_DESC, K_base, V_base, KPM_base,
                                   KMAP, IDX + row, BITS_row, lo, tl.minimum(hi, nfull), lo,
                                   first0, b, h, stride_kn, stride_vn, n_map, offs_m, offs_n,
                                   offs_d, bitidx, N, qk_scale, BLOCK_N, False, FINE, CAUSAL,
                                   HAS_KPM, EVEN, BITS32, UPCAST, POS_SCALE, TMA, GATHER_K)
    if not ALL_FULL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_DESC, V_DESC, K_base, V_base, KPM_base,
                                   KMAP, IDX + row, BITS_row, tl.maximum(lo, nfull), hi, lo,
                                   first0, b, h, stride_kn, stride_vn, n_map, offs_m, offs_n,
                                   offs_d, bitidx, N, qk_scale, BLOCK_N, True, FINE, CAUSAL,
                                   HAS_KPM, EVEN, BITS32, UPCAST, POS_SCALE, TMA, GATHER_K)
    if HAS_SPLIT:  # else the workspace pointers are None and every slot is -1
        if slot < 0:
            _fwd_store(O, O_DESC, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob,
                       stride_oh, stride_om, H, N, EVEN, TMA and not GATHER_Q)
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
                           stride_oh, stride_om, H, N, EVEN, TMA and not GATHER_Q)
    else:
        _fwd_store(O, O_DESC, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob,
                   stride_oh, stride_om, H, N, EVEN, TMA and not GATHER_Q)
