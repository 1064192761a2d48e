"""Experiment: forward with K/V (and Q, O) tiles moved by TMA (host tensor descriptors)
instead of pointer-tensor loads, at block 64 (full 64x64 tiles, no masks). The idea: a
BigBird row is ~5 tiles, so the per-iteration address arithmetic and the registers a
[64, 64] pointer tensor holds weigh more than in a long dense row; TMA issues one
instruction per tile. Uses the package's LUT (row tables, work items, split rows) and its
combine kernel. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_tma.py
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels.fused_attention import fused_attn_fwd_combine_kernel  # noqa: E402


@triton.jit
def tma_fwd(q_desc, k_desc, v_desc, o_desc, Q, O, LSE, IDX, WORK, WS_ACC, WS_ML,
            s_qm, s_om, B, H, N, n_qt, n_kt, n_work, qk_scale,
            BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
            Q_TMA: tl.constexpr, O_TMA: tl.constexpr):
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r = tl.load(WORK + w)
    lo = tl.load(WORK + n_work + w)
    hi = tl.load(WORK + 2 * n_work + w)
    slot = tl.load(WORK + 3 * n_work + w)
    h = r // n_qt
    qt = r % n_qt
    base = (b * H + h) * N  # row of (b, h, 0) in the [B * H * N, D] views
    offs_m = qt * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    if Q_TMA:
        q = q_desc.load([base + qt * BLOCK, 0])
    else:
        q = tl.load(Q + (base + offs_m).to(tl.int64)[:, None] * s_qm + offs_d[None, :])
    row = r.to(tl.int64) * n_kt
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for it in range(lo, hi):
        c = tl.load(IDX + row + it)
        k = k_desc.load([base + c * BLOCK, 0])
        v = v_desc.load([base + c * BLOCK, 0])
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
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        if O_TMA:
            o_desc.store([base + qt * BLOCK, 0], out.to(O.dtype.element_ty))
        else:
            tl.store(O + (base + offs_m).to(tl.int64)[:, None] * s_om + offs_d[None, :],
                     out.to(O.dtype.element_ty))
        tl.store(LSE + base + offs_m, lse)


def tma_forward(q, k, v, lut, block, warps=4, stages=3, q_tma=True, o_tma=True):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    ns = lut.n_slots
    ws_acc = torch.empty((max(ns, 1) * B, block, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((max(ns, 1) * B, 2, block), dtype=torch.float32, device=q.device)
    descs = [TensorDescriptor.from_tensor(t.view(B * H * N, D), [block, D])
             for t in (q, k, v, out)]
    scale = D ** -0.5 * 1.4426950408889634
    tma_fwd[(lut.n_work * B,)](
        *descs, q, out, lse, lut.idx, lut.work, ws_acc, ws_ml, D, D,
        B, H, N, lut.n_own, lut.n_other, lut.n_work, scale,
        BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, Q_TMA=q_tma, O_TMA=o_tma,
        num_warps=warps, num_stages=stages)
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
    shapes = [(1, 512, "bigbird")] if small else [
        (4, 4096, "bigbird"), (1, 16384, "bigbird"), (4, 4096, "fixed"), (1, 16384, "fixed")]
    for B, N, name in shapes:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float16 if small else torch.bfloat16
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        ref, ref_lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
        lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row")
        assert torch.equal(lut.nfull, lut.ntot), "experiment handles full tiles only"
        variants = {}
        for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
            variants[f"tma qkvo w{warps} s{stages}"] = (
                lambda warps=warps, stages=stages: tma_forward(q, k, v, lut, blk, warps, stages))
        variants["tma kv only w4 s3"] = lambda: tma_forward(q, k, v, lut, blk, 4, 3, False, False)
        variants["tma kvo w4 s3"] = lambda: tma_forward(q, k, v, lut, blk, 4, 3, False, True)
        ok = {}
        for vname, fn in variants.items():
            try:
                o, lse = fn()
            except Exception as e:  # noqa: BLE001 (record and go on)
                print(f"{B}x{N} {name} {vname}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            err = ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            lerr = (lse - ref_lse).abs().max().item()
            ok[vname] = fn if err < 1e-2 and lerr < 1e-3 else None
            print(f"{B}x{N} {name} {vname}: max rel err {err:.2e} lse err {lerr:.2e}",
                  flush=True)
        if small:
            continue
        from triton.testing import do_bench_cudagraph

        def t(fn):
            return do_bench_cudagraph(fn, rep=100, return_mode="median")

        base = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa: E731
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
        res = {"dense SDPA": t(dense), "package": t(base)}
        for vname, fn in ok.items():
            if fn is not None:
                res[vname] = t(fn)
        res["package (again)"] = t(base)
        for vname, ms in res.items():
            print(f"{B}x{N} {name}64 fwd {vname}: {ms * 1000:.1f} us", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
