"""Experiment: backward in one dk/dv pass that also adds dq (fp32 atomics), instead of a
separate dq kernel that recomputes q.k and dO.v. BigBird 64, coarse tiles, no kpm/causal."""
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels.fused_attention import fused_attn_bwd_reduce_kernel  # noqa: E402


@triton.jit
def delta_kernel(O, DO, DELTA, N, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid = tl.program_id(0)  # over B*H*N/BLOCK
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + rows[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    do = tl.load(DO + rows[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1))


@triton.jit
def convert_kernel(DQ32, DQ, scale, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(DQ + offs, (tl.load(DQ32 + offs) * scale).to(DQ.dtype.element_ty))


@triton.jit
def dkdv_dq_kernel(Q, K, V, DO, DK, DV, DQ32, LSE, DELTA, IDX, WORK, WS_DK, WS_DV,
                   B, H, N, n_kt, n_qt, n_work, qk_scale, sm_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HAS_SPLIT: tl.constexpr, SEM: tl.constexpr, DQ_ON: tl.constexpr):
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    c = tl.load(WORK + w)
    lo = tl.load(WORK + n_work + w)
    hi = tl.load(WORK + 2 * n_work + w)
    slot = tl.load(WORK + 3 * n_work + w)
    h = c // n_kt
    kt = c % n_kt
    bh = b.to(tl.int64) * H + h
    base = bh * N * HEAD_DIM
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
    v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    col = c.to(tl.int64) * n_qt
    for it in range(lo, hi):
        qt = tl.load(IDX + col + it)
        rows = qt * BLOCK_M + offs_m
        q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
        do = tl.load(DO + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
        lse = tl.load(LSE + bh * N + rows)
        delta = tl.load(DELTA + bh * N + rows)
        sT = tl.dot(k, tl.trans(q)) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += tl.dot(dsT, q)
        if DQ_ON:
            dq = tl.dot(tl.trans(dsT), k)
            tl.atomic_add(DQ32 + base + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, sem=SEM)
    if HAS_SPLIT:
        if slot < 0:
            tl.store(DK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty))
            tl.store(DV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                     dv.to(DV.dtype.element_ty))
        else:
            ws = slot.to(tl.int64) * B + b
            rr = tl.arange(0, BLOCK_N)
            ws_off = ws * BLOCK_N * HEAD_DIM + rr[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(WS_DK + ws_off, dk)
            tl.store(WS_DV + ws_off, dv)
    else:
        tl.store(DK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(DV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                 dv.to(DV.dtype.element_ty))


def atomic_backward(do, q, k, v, out, lse, lut, blk, sem="relaxed", warps=4, stages=3,
                    dq_on=True):
    B, H, N, D = q.shape
    dev = q.device
    dq32 = torch.zeros((B, H, N, D), dtype=torch.float32, device=dev)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta_kernel[(B * H * N // 64,)](out, do, delta, N, BLOCK=64, HEAD_DIM=D)
    ns = max(lut.n_slots, 1)
    ws_dk = torch.empty((ns * B, blk, D), dtype=torch.float32, device=dev)
    ws_dv = torch.empty((ns * B, blk, D), dtype=torch.float32, device=dev)
    scale = D ** -0.5
    dkdv_dq_kernel[(lut.n_work * B,)](
        q, k, v, do, dk, dv, dq32, lse, delta, lut.idx, lut.work, ws_dk, ws_dv,
        B, H, N, lut.n_own, lut.n_other, lut.n_work, scale * 1.4426950408889634, scale,
        BLOCK_M=blk, BLOCK_N=blk, HEAD_DIM=D, HAS_SPLIT=lut.n_slots > 0, SEM=sem,
        DQ_ON=dq_on, num_warps=warps, num_stages=stages)
    if lut.n_split:
        fused_attn_bwd_reduce_kernel[(lut.n_split * B,)](
            ws_dk, dk, ws_dv, dv, lut.split, *dk.stride()[:3], *dv.stride()[:3], B, H, N,
            lut.n_own, lut.n_split, scale, 1.0, BLOCK=blk, HEAD_DIM=D, EVEN=True, TWO=True,
            num_warps=4)
    convert_kernel[(B * H * N // 64,)](dq32, dq, scale, BLOCK=64, HEAD_DIM=D)
    return dq, dk, dv


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = dev.type == "cpu"
    import scripts.bench_attention as BA
    shapes = [(2, 1024)] if small else [(4, 4096), (1, 16384)]
    H, D, blk = (2 if small else 16), 64, 64
    BA.H = H
    for B, N in shapes:
        layout = BA.make_layout("bigbird", blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float16 if small else torch.bfloat16
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
                       for _ in range(4))
        out, lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
        ref = F._backward_impl(do, q, k, v, out, lse, layout, None, blk, None, False)
        lut = F._get_lut(layout, blk, blk, blk, N, False, dev, "col")
        print(f"{B}x{N}: col items {lut.n_work}, split cols {lut.n_split}", flush=True)
        variants = {}
        for sem in ("relaxed",):
            for warps, stages in ((4, 2), (4, 3), (8, 2)) if not small else ((4, 3),):
                variants[f"atomic {sem} w{warps} s{stages}"] = (
                    lambda sem=sem, warps=warps, stages=stages:
                    atomic_backward(do, q, k, v, out, lse, lut, blk, sem, warps, stages))
        for name, fn in variants.items():
            got = fn()
            errs = [((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
                    for a, r in zip(got, ref)]
            print(f"{B}x{N} {name}: max rel err dq/dk/dv " +
                  " ".join(f"{e:.2e}" for e in errs), flush=True)
        if small:
            continue
        from triton.testing import do_bench_cudagraph

        def t(fn):
            return do_bench_cudagraph(fn, rep=100, return_mode="median")

        base = lambda: F._backward_impl(do, q, k, v, out, lse, layout, None, blk, None,  # noqa
                                        False)
        res = {"base bwd": t(base)}
        for name, fn in variants.items():
            res[name] = t(fn)
        res["atomic w4 s2, dq off (dk/dv cost alone)"] = t(
            lambda: atomic_backward(do, q, k, v, out, lse, lut, blk, "relaxed", 4, 2, False))
        res["base bwd (again)"] = t(base)
        for name, ms in res.items():
            print(f"{B}x{N} BigBird64 bwd {name}: {ms * 1000:.1f} us", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
