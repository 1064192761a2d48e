"""Experiment (run on an H200 on 2026-11-29, exp_ahead_h200.log: slower in every variant, e.g.
BigBird 64 at 4096 x4 with TMA 96.8 us plain against 124.6 us ahead; closed): a forward that issues the next tile's QK^T before the current tile's
softmax, so that the tensor cores work while the exp2/max/sum of the softmax run (the
overlap FlashAttention-3 gets from ping-pong warpgroups, by hand in one warpgroup). The
package's loop computes QK^T, waits for it, does the softmax, then P@V: in a row of ~6 tiles
(BigBird 64) each program spends most of its time in that chain. Costs one more [64, 64]
fp32 tile of registers (may drop from 4 to 3 programs per SM) and one extra QK^T per item
(the last "next" is the current tile again, unused). Compiled for sm_90 on the CPU box
(Triton 3.9, ptxas 13.4): 132 registers against 106 for the plain loop, i.e. 3 programs per
SM instead of 4, so a variant capped at 128 (4 per SM; 88 bytes of spill stores) is timed
too. Variants: K/V by TMA
(2-D host descriptors) or pointers, stages 2/3. Full tiles only (block 64 / 128 layouts without
masks). Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_ahead.py
    TRITON_INTERPRET=1 PYTHONPATH=. python3 benchmarks/experiments/exp_ahead.py  # correctness
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels.fused_attention import fused_attn_fwd_combine_kernel  # noqa: E402
from benchmarks.experiments.harness import check_and_time  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # noqa: BLE001
    TensorDescriptor = None


@triton.jit
def _kv(k_desc, v_desc, K, V, base, c, offs_n, offs_d, BLOCK: tl.constexpr,
        HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        return k_desc.load([base + c * BLOCK, 0]), v_desc.load([base + c * BLOCK, 0])
    else:
        rows = (base + c * BLOCK + offs_n).to(tl.int64)
        return (tl.load(K + rows[:, None] * HEAD_DIM + offs_d[None, :]),
                tl.load(V + rows[:, None] * HEAD_DIM + offs_d[None, :]))


@triton.jit
def ahead_fwd(k_desc, v_desc, Q, K, V, O, LSE, IDX, WORK, WS_ACC, WS_ML,
              B, H, N, n_qt, n_kt, n_work, qk_scale,
              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
              TMA: tl.constexpr, AHEAD: tl.constexpr):
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r = tl.load(WORK + w)
    lo = tl.load(WORK + n_work + w)
    hi = tl.load(WORK + 2 * n_work + w)
    slot = tl.load(WORK + 3 * n_work + w)
    h = r // n_qt
    qt = r % n_qt
    base = (b * H + h) * N
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_q = (base + qt * BLOCK + offs_n).to(tl.int64)
    q = tl.load(Q + rows_q[:, None] * HEAD_DIM + offs_d[None, :])
    row = r.to(tl.int64) * n_kt
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    if AHEAD:
        # every work item has at least one tile (the LUT lists no empty item)
        c = tl.load(IDX + row + lo)
        k, v = _kv(k_desc, v_desc, K, V, base, c, offs_n, offs_d, BLOCK, HEAD_DIM, TMA)
        qk = tl.dot(q, tl.trans(k))
        for it in range(lo, hi):
            cn = tl.load(IDX + row + tl.minimum(it + 1, hi - 1))
            kn, vn = _kv(k_desc, v_desc, K, V, base, cn, offs_n, offs_d, BLOCK, HEAD_DIM, TMA)
            qk_next = tl.dot(q, tl.trans(kn))  # in flight during this tile's softmax
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
            qk = qk_next
            v = vn
    else:
        for it in range(lo, hi):
            c = tl.load(IDX + row + it)
            k, v = _kv(k_desc, v_desc, K, V, base, c, offs_n, offs_d, BLOCK, HEAD_DIM, TMA)
            qk = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    rr = tl.arange(0, BLOCK)
    if HAS_SPLIT and slot >= 0:
        ws = slot.to(tl.int64) * B + b
        tl.store(WS_ACC + ws * BLOCK * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(WS_ML + ws * 2 * BLOCK + rr, m_i)
        tl.store(WS_ML + ws * 2 * BLOCK + BLOCK + rr, l_i)
    else:
        out = acc / l_i[:, None]
        tl.store(O + rows_q[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty))
        tl.store(LSE + base + qt * BLOCK + rr, m_i + tl.math.log2(l_i))


def forward(q, k, v, lut, block, tma, ahead, stages=3, maxnreg=None):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    ns = lut.n_slots
    ws_acc = torch.empty((max(ns, 1) * B, block, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((max(ns, 1) * B, 2, block), dtype=torch.float32, device=q.device)
    descs = ([TensorDescriptor.from_tensor(t.view(B * H * N, D), [block, D]) for t in (k, v)]
             if tma else [None, None])
    ahead_fwd[(lut.n_work * B,)](
        *descs, q, k, v, out, lse, lut.idx, lut.work, ws_acc, ws_ml,
        B, H, N, lut.n_own, lut.n_other, lut.n_work, D ** -0.5 * 1.4426950408889634,
        BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, TMA=tma, AHEAD=ahead, num_warps=4,
        num_stages=stages, **({} if maxnreg is None else {"maxnreg": maxnreg}))
    if lut.n_split:
        fused_attn_fwd_combine_kernel[(lut.n_split * B,)](
            out, lse, ws_acc, ws_ml, lut.split, *out.stride()[:3], B, H, N, lut.n_own,
            lut.n_split, BLOCK_M=block, HEAD_DIM=D, EVEN=True, num_warps=4)
    return out, lse


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = dev.type == "cpu"
    import scripts.bench_attention as BA
    H, D, blk = (2 if small else 16), 64, 64
    BA.H = H
    shapes = [(2, 1024, "bigbird")] if small else [
        (4, 4096, "bigbird"), (1, 16384, "bigbird"), (4, 4096, "fixed")]
    for B, N, name in shapes:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float16 if small else torch.bfloat16
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row", batch=B)
        assert lut.all_full, "experiment handles full tiles only"
        variants = {}
        for tma in ((False,) if small or TensorDescriptor is None else (False, True)):
            for ahead, cap in ((False, None), (True, None), (True, 128)):
                for stages in ((3,) if small else (2, 3)):
                    vname = (f"{'tma' if tma else 'ptr'} {'ahead' if ahead else 'plain'} "
                             f"s{stages}{'' if cap is None else f' maxnreg {cap}'}")
                    if small and cap is not None:
                        continue  # the interpreter has no register cap
                    variants[vname] = (lambda tma=tma, ahead=ahead, stages=stages, cap=cap:
                                       forward(q, k, v, lut, blk, tma, ahead, stages, cap))
        check_and_time(f"{B}x{N} {name}", variants, q, k, v, layout, blk, small)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
