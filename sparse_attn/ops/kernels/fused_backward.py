"""Fused block-sparse flash attention, Triton only: the backward kernels (dq over the row
table, also writing delta = rowsum(dO * O); dk/dv over the column table; the reduction of
split items). Tables and shared helpers: ``fused_common``."""
import triton
import triton.language as tl

from .fused_common import (bit_index, keep, load_kv, load_rows, load_tile, load_vec, lut_row, mm,
                           tile_rows, tile_store, work_item)


@triton.jit
def fused_attn_bwd_reduce_kernel(WS, OUT, WS2, OUT2, SPLIT, MAP, s_b, s_h, s_m, s2_b, s2_h,
                                 s2_m, B, H, N, n_own, n_split, n_map, scale, scale2,
                                 BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN: tl.constexpr,
                                 TWO: tl.constexpr, GATHER: tl.constexpr):
    """OUT[b, h, tile rows] = scale * sum of the partial fp32 tiles of a split row/column
    (and OUT2 from WS2 with scale2 when TWO); OUT, OUT2 [B, H, N, HEAD_DIM] with strides
    (s_b, s_h, s_m, 1) and (s2_b, s2_h, s2_m, 1). GATHER: the tile's rows come from the
    token map MAP (else None)."""
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
    h64 = h.to(tl.int64)
    rows = tile_rows(MAP, h64, n_map, t * BLOCK, rr, GATHER)
    tile_store(OUT, acc * scale, b64, h64, rows, offs_d, s_b, s_h, s_m, N, EVEN)
    if TWO:
        tile_store(OUT2, acc2 * scale2, b64, h64, rows, offs_d, s2_b, s2_h, s2_m, N, EVEN)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K_desc, V_desc, K_base, V_base, KPM_base, KMAP, IDX, BITS,
              lo, hi, b, h, stride_kn, stride_vn, n_map, offs_m, offs_n, offs_d, bitidx, N,
              qk_scale, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, FINE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
              BITS32: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
              GATHER_K: tl.constexpr):
    h64 = h.to(tl.int64)
    for it in range(lo, hi):
        first = tl.load(IDX + it) * BLOCK_N
        cols = tile_rows(KMAP, h64, n_map, first, offs_n, GATHER_K)
        k, v = load_kv(K_desc, V_desc, K_base, V_base, b, h, first, cols, stride_kn,
                        stride_vn, offs_d, N, PARTIAL and not EVEN, TMA and not GATHER_K)
        s = mm(q, tl.trans(k), UPCAST) * qk_scale
        if HAS_KPM:
            kpm = load_vec(KPM_base, cols, N, 0.0, PARTIAL and not EVEN)
            s = s + kpm[None, :] * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        if PARTIAL:
            p = keep(p, 0.0, BITS, it, bitidx, offs_m[:, None], cols[None, :], FINE, CAUSAL,
                      BITS32)
        dp = mm(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += mm(ds.to(k.dtype), k, UPCAST)
    return dq


@triton.jit
def fused_attn_bwd_dq_kernel(
        Q, K, V, O, DO, DQ, LSE, DELTA, KPM, K_DESC, V_DESC,
        IDX, BITS, NFULL, WORK, WS, QMAP, KMAP,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_dob, stride_doh, stride_dom,
        stride_dqb, stride_dqh, stride_dqm,
        stride_kpmb,
        B, H, N, n_qt, n_kt, n_work, n_map, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr,
        ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr, HAS_SPLIT: tl.constexpr,
        TMA: tl.constexpr, GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr):
    """O, DO, DQ: [B, H, N, HEAD_DIM] with their own strides (last one 1); LSE, DELTA
    contiguous [B, H, N] float32. TMA: K and V tiles come through K_DESC, V_DESC (unless
    gathered). QMAP, KMAP: token maps of packed tiles (None unless GATHER_Q, GATHER_K).
    Also writes DELTA = rowsum(dO * O) of its query tile, which the dk/dv kernel (launched
    after this one) reads; the items of a split row all write the same values."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r, lo, hi, slot = work_item(WORK, w, n_work)  # r = h * n_qt + query tile
    b64 = b.to(tl.int64)
    h = r // n_qt
    h64 = h.to(tl.int64)
    offs_m = tile_rows(QMAP, h64, n_map, (r % n_qt) * BLOCK_M, tl.arange(0, BLOCK_M), GATHER_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    bh = b64 * H + h64
    q = load_rows(Q + b64 * stride_qb + h64 * stride_qh, offs_m, stride_qm, offs_d, N, not EVEN)
    do = load_rows(DO + b64 * stride_dob + h64 * stride_doh, offs_m, stride_dom, offs_d, N,
                    not EVEN)
    o = load_rows(O + b64 * stride_ob + h64 * stride_oh, offs_m, stride_om, offs_d, N, not EVEN)
    lse = load_vec(LSE + bh * N, offs_m, N, float("inf"), not EVEN)
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
    bitidx = bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, False)
    row, nfull = lut_row(NFULL, r, n_kt, ONE_LOOP, ALL_FULL)
    if FINE:
        BITS_row = BITS + row
    else:  # None
        BITS_row = BITS
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not ONE_LOOP:
        dq = _dq_inner(dq, q, do, lse, delta, K_DESC, V_DESC, K_base, V_base, KPM_base, KMAP,
                       IDX + row, BITS_row, lo, tl.minimum(hi, nfull), b, h, stride_kn,
                       stride_vn, n_map, offs_m, offs_n, offs_d, bitidx, N, qk_scale, BLOCK_N,
                       False, FINE, CAUSAL, HAS_KPM, EVEN, BITS32, UPCAST, TMA, GATHER_K)
    if not ALL_FULL:
        dq = _dq_inner(dq, q, do, lse, delta, K_DESC, V_DESC, K_base, V_base, KPM_base, KMAP,
                       IDX + row, BITS_row, tl.maximum(lo, nfull), hi, b, h, stride_kn,
                       stride_vn, n_map, offs_m, offs_n, offs_d, bitidx, N, qk_scale, BLOCK_N,
                       True, FINE, CAUSAL, HAS_KPM, EVEN, BITS32, UPCAST, TMA, GATHER_K)
    if HAS_SPLIT:  # else WS is None and every slot is -1
        if slot < 0:
            tile_store(DQ, dq * sm_scale, b64, h64, offs_m, offs_d, stride_dqb, stride_dqh,
                        stride_dqm, N, EVEN)
        else:
            ws = slot.to(tl.int64) * B + b64
            rr = tl.arange(0, BLOCK_M)
            tl.store(WS + ws * BLOCK_M * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :], dq)
    else:
        tile_store(DQ, dq * sm_scale, b64, h64, offs_m, offs_d, stride_dqb, stride_dqh,
                        stride_dqm, N, EVEN)


@triton.jit
def _dkdv_inner(dk, dv, k, v, kpm, Q_desc, DO_desc, Q_base, DO_base, LSE_base, DELTA_base,
                QMAP, IDX, BITS, lo, hi, b, h, stride_qm, stride_dom, n_map, offs_m, offs_n,
                offs_d, bitidxT, N, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                PARTIAL: tl.constexpr, FINE: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, EVEN: tl.constexpr, BITS32: tl.constexpr,
                UPCAST: tl.constexpr, TMA: tl.constexpr, GATHER_Q: tl.constexpr):
    h64 = h.to(tl.int64)
    for it in range(lo, hi):
        first = tl.load(IDX + it) * BLOCK_M
        rows = tile_rows(QMAP, h64, n_map, first, offs_m, GATHER_Q)
        q = load_tile(Q_desc, Q_base, b, h, first, rows, stride_qm, offs_d, N,
                       PARTIAL and not EVEN, TMA and not GATHER_Q)
        do = load_tile(DO_desc, DO_base, b, h, first, rows, stride_dom, offs_d, N,
                        PARTIAL and not EVEN, TMA and not GATHER_Q)
        lse = load_vec(LSE_base, rows, N, float("inf"), PARTIAL and not EVEN)
        delta = load_vec(DELTA_base, rows, N, 0.0, PARTIAL and not EVEN)
        sT = mm(k, tl.trans(q), UPCAST) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HAS_KPM:
            sT = sT + kpm[:, None]
        pT = tl.math.exp2(sT - lse[None, :])
        if PARTIAL:
            pT = keep(pT, 0.0, BITS, it, bitidxT, rows[None, :], offs_n[:, None], FINE, CAUSAL,
                       BITS32)
        dv += mm(pT.to(do.dtype), do, UPCAST)
        dpT = mm(v, tl.trans(do), UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk += mm(dsT.to(q.dtype), q, UPCAST)
    return dk, dv


@triton.jit
def fused_attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, KPM, Q_DESC, DO_DESC,
        IDX, BITS, NFULL, WORK, WS_DK, WS_DV, QMAP, KMAP,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_dom,
        stride_dkb, stride_dkh, stride_dkn,
        stride_dvb, stride_dvh, stride_dvn,
        stride_kpmb,
        B, H, N, n_kt, n_qt, n_work, n_map, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr,
        ONE_LOOP: tl.constexpr, ALL_FULL: tl.constexpr, HAS_SPLIT: tl.constexpr,
        TMA: tl.constexpr, GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr):
    """Column LUT: one program per (key tile, batch); DO, DK, DV [B, H, N, D] with their own
    strides (last one 1). TMA: Q and dO tiles come through Q_DESC, DO_DESC (unless
    gathered). QMAP, KMAP: token maps of packed tiles (None unless GATHER_Q, GATHER_K)."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    c, lo, hi, slot = work_item(WORK, w, n_work)  # c = h * n_kt + key tile
    b64 = b.to(tl.int64)
    h = c // n_kt
    h64 = h.to(tl.int64)
    bh = b64 * H + h64
    offs_n = tile_rows(KMAP, h64, n_map, (c % n_kt) * BLOCK_N, tl.arange(0, BLOCK_N), GATHER_K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(K + b64 * stride_kb + h64 * stride_kh, offs_n, stride_kn, offs_d, N, not EVEN)
    v = load_rows(V + b64 * stride_vb + h64 * stride_vh, offs_n, stride_vn, offs_d, N, not EVEN)
    kpm = tl.zeros([BLOCK_N], tl.float32)
    if HAS_KPM:
        kpm = load_vec(KPM + b64 * stride_kpmb, offs_n, N, 0.0, not EVEN) * 1.4426950408889634
    bitidxT = bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, True)  # [n, m]
    Q_base = Q + b64 * stride_qb + h64 * stride_qh
    DO_base = DO + b64 * stride_dob + h64 * stride_doh
    LSE_base = LSE + bh * N
    DELTA_base = DELTA + bh * N
    col, nfull = lut_row(NFULL, c, n_qt, ONE_LOOP, ALL_FULL)
    if FINE:
        BITS_col = BITS + col
    else:  # None
        BITS_col = BITS
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if not ONE_LOOP:
        dk, dv = _dkdv_inner(dk, dv, k, v, kpm, Q_DESC, DO_DESC, Q_base, DO_base, LSE_base,
                             DELTA_base, QMAP, IDX + col, BITS_col, lo, tl.minimum(hi, nfull),
                             b, h, stride_qm, stride_dom, n_map, offs_m, offs_n, offs_d,
                             bitidxT, N, qk_scale, BLOCK_M, HEAD_DIM, False, FINE, CAUSAL,
                             HAS_KPM, EVEN, BITS32, UPCAST, TMA, GATHER_Q)
    if not ALL_FULL:
        dk, dv = _dkdv_inner(dk, dv, k, v, kpm, Q_DESC, DO_DESC, Q_base, DO_base, LSE_base,
                             DELTA_base, QMAP, IDX + col, BITS_col, tl.maximum(lo, nfull), hi,
                             b, h, stride_qm, stride_dom, n_map, offs_m, offs_n, offs_d,
                             bitidxT, N, qk_scale, BLOCK_M, HEAD_DIM, True, FINE, CAUSAL,
                             HAS_KPM, EVEN, BITS32, UPCAST, TMA, GATHER_Q)
    if HAS_SPLIT:  # else WS_DK, WS_DV are None and every slot is -1
        if slot < 0:
            tile_store(DK, dk * sm_scale, b64, h64, offs_n, offs_d, stride_dkb, stride_dkh,
                        stride_dkn, N, EVEN)
            tile_store(DV, dv, b64, h64, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn,
                        N, EVEN)
        else:
            ws = slot.to(tl.int64) * B + b64
            rr = tl.arange(0, BLOCK_N)
            ws_off = ws * BLOCK_N * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(WS_DK + ws_off, dk)
            tl.store(WS_DV + ws_off, dv)
    else:
        tile_store(DK, dk * sm_scale, b64, h64, offs_n, offs_d, stride_dkb, stride_dkh,
                    stride_dkn, N, EVEN)
        tile_store(DV, dv, b64, h64, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, N,
                    EVEN)
