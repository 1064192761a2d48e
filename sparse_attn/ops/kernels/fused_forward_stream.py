"""Fused block-sparse flash attention, the streamed forward: one program walks a contiguous
run of the concatenation of every row's tiles (many short rows, or a piece of a long one) in
a single loop, so the loads of the next row's first tiles overlap the current row's last
ones. Rows cut by a run's ends leave partial results in the workspace, merged by
``fused_attn_fwd_merge_kernel``. Tables: ``sparse_attn.ops.fused.stream``; helpers:
``fused_common``.

STREAM [3, T] int32, one column per tile of one batch, in walk order:
  key tile index; row id (h * n_qt + query tile); flags: bit 0 the first tile of a piece
  (reset the running max), bit 1 its last (store), bit 2 a row with no tile (its one
  column is a placeholder whose scores are all masked), bits 3.. the workspace slot + 1
  (0: the piece is the whole row, stored directly).
"""
import triton
import triton.language as tl

from .fused_common import bit_index, keep, load_kv, load_tile, load_vec, mm, mma, tile_rows
from .fused_forward import _fwd_store, _merge_items


@triton.jit
def fused_attn_fwd_stream_kernel(
        Q, K, V, O, LSE, KPM, Q_DESC, K_DESC, V_DESC,
        STREAM, BITS, WS_ACC, WS_ML, QMAP, KMAP,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_kpmb,
        B, H, N, n_qt, n_kt, n_tiles, n_runs, n_map, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        UNIT_M: tl.constexpr, UNIT_N: tl.constexpr, FINE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN: tl.constexpr,
        BITS32: tl.constexpr, UPCAST: tl.constexpr, ALL_FULL: tl.constexpr,
        HAS_EMPTY: tl.constexpr, POS_SCALE: tl.constexpr, TMA: tl.constexpr,
        GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr):
    """One program per (run, batch): run c walks STREAM columns [c * T // n_runs,
    (c + 1) * T // n_runs). BITS [T] int64 (FINE): the unit mask of each column's tile. The
    Q, K, V tiles come through Q_DESC, K_DESC, V_DESC when TMA (None otherwise, and for a
    gathered side); O goes out through pointers."""
    pid = tl.program_id(0)
    b = pid % B
    c = pid // B
    b64 = b.to(tl.int64)
    g0 = (c.to(tl.int64) * n_tiles // n_runs).to(tl.int32)
    g1 = ((c.to(tl.int64) + 1) * n_tiles // n_runs).to(tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rr = tl.arange(0, BLOCK_M)
    bitidx = bit_index(BLOCK_M, BLOCK_N, UNIT_M, UNIT_N, BITS32, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for g in range(g0, g1):
        t = tl.load(STREAM + g)
        r = tl.load(STREAM + n_tiles + g)
        flags = tl.load(STREAM + 2 * n_tiles + g)
        h = r // n_qt
        h64 = h.to(tl.int64)
        m0 = (r % n_qt) * BLOCK_M
        offs_m = tile_rows(QMAP, h64, n_map, m0, rr, GATHER_Q)
        q = load_tile(Q_DESC, Q + b64 * stride_qb + h64 * stride_qh, b, h, m0, offs_m,
                      stride_qm, offs_d, N, not EVEN, TMA and not GATHER_Q)
        first = t * BLOCK_N
        cols = tile_rows(KMAP, h64, n_map, first, offs_n, GATHER_K)
        k, v = load_kv(K_DESC, V_DESC, K + b64 * stride_kb + h64 * stride_kh,
                        V + b64 * stride_vb + h64 * stride_vh, b, h, first, cols, stride_kn,
                        stride_vn, offs_d, N, not EVEN, TMA and not GATHER_K)
        # a piece's first tile starts a fresh softmax: with the running max at -inf the
        # rescale factor is 0, which clears the sum and the accumulator as well
        m_i = tl.where((flags & 1) != 0, float("-inf"), m_i)
        qk = mm(q, tl.trans(k), UPCAST)
        if POS_SCALE and ALL_FULL and not HAS_KPM and not HAS_EMPTY:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            s = qk * qk_scale
            if HAS_KPM:
                kpm = load_vec(KPM + b64 * stride_kpmb, cols, N, 0.0, not EVEN)
                s = s + kpm[None, :] * 1.4426950408889634
            if not ALL_FULL:
                s = keep(s, float("-inf"), BITS, g, bitidx, offs_m[:, None], cols[None, :],
                         FINE, CAUSAL, BITS32)
            if HAS_EMPTY:
                s = tl.where((flags & 4) != 0, float("-inf"), s)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
        if (flags & 2) != 0:
            slot = (flags >> 3) - 1
            if slot < 0:
                _fwd_store(O, O, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob,
                           stride_oh, stride_om, H, N, EVEN, False)
            else:
                ws = slot.to(tl.int64) * B + b64
                tl.store(WS_ACC + ws * BLOCK_M * HEAD_DIM + rr[:, None] * HEAD_DIM +
                         offs_d[None, :], acc)
                tl.store(WS_ML + ws * 2 * BLOCK_M + rr, m_i)
                tl.store(WS_ML + ws * 2 * BLOCK_M + BLOCK_M + rr, l_i)


@triton.jit
def fused_attn_fwd_merge_kernel(
        O, LSE, WS_ACC, WS_ML, SPLIT, QMAP,
        stride_ob, stride_oh, stride_om,
        B, H, N, n_qt, n_split, n_map,
        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN: tl.constexpr,
        GATHER_Q: tl.constexpr):
    """One program per (split row, batch): merge the row's pieces from the workspace and
    store its output and LSE. SPLIT [3, n_split]: row id, first slot, pieces."""
    pid = tl.program_id(0)
    b = pid % B
    j = pid // B
    b64 = b.to(tl.int64)
    r = tl.load(SPLIT + j)
    start = tl.load(SPLIT + n_split + j)
    n = tl.load(SPLIT + 2 * n_split + j)
    h = r // n_qt
    m0 = (r % n_qt) * BLOCK_M
    rr = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tile_rows(QMAP, h.to(tl.int64), n_map, m0, rr, GATHER_Q)
    acc, l_i, m_i = _merge_items(WS_ACC, WS_ML, start, n, B, b64, rr, offs_d, BLOCK_M,
                                 HEAD_DIM)
    _fwd_store(O, O, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, stride_ob, stride_oh,
               stride_om, H, N, EVEN, False)
