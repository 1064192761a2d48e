"""Experiment: why the dk/dv kernel is slow on BigBird 64. Kernel-only timings."""
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402


@triton.jit
def dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, LD, IDX, WORK, WS_DK, WS_DV,
                B, H, N, n_kt, n_qt, n_work, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                HAS_SPLIT: tl.constexpr, VEC: tl.constexpr, QT: tl.constexpr):
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
    if VEC >= 3:
        qt0 = tl.load(IDX + col + lo, mask=lo < hi, other=0)
        if VEC == 3:
            lse_c = tl.load(LSE + bh * N + qt0 * BLOCK_M + offs_m)
            delta_c = tl.load(DELTA + bh * N + qt0 * BLOCK_M + offs_m)
        else:
            ld = tl.load(LD + (bh * N + qt0 * BLOCK_M + offs_m)[:, None] * 2 + tl.arange(0, 2)[None, :])
            lse_c, delta_c = tl.split(ld)
    for it in range(lo, hi):
        qt = tl.load(IDX + col + it)
        if VEC >= 3:
            qn = tl.load(IDX + col + tl.minimum(it + 1, hi - 1))
            if VEC == 3:
                lse_n = tl.load(LSE + bh * N + qn * BLOCK_M + offs_m)
                delta_n = tl.load(DELTA + bh * N + qn * BLOCK_M + offs_m)
            else:
                ldn = tl.load(LD + (bh * N + qn * BLOCK_M + offs_m)[:, None] * 2 + tl.arange(0, 2)[None, :])
                lse_n, delta_n = tl.split(ldn)
        rows = qt * BLOCK_M + offs_m
        if QT:
            qT = tl.load(Q + base + rows[None, :] * HEAD_DIM + offs_d[:, None])
        else:
            qT = tl.trans(tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :]))
        do = tl.load(DO + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
        if VEC == 0 or VEC == 5:
            lse = tl.load(LSE + bh * N + rows)
            delta = tl.load(DELTA + bh * N + rows)
        elif VEC == 2:
            ld = tl.load(LD + (bh * N + rows)[:, None] * 2 + tl.arange(0, 2)[None, :])
            lse, delta = tl.split(ld)
        elif VEC >= 3:
            lse = lse_c
            delta = delta_c
        else:
            lse = tl.zeros([BLOCK_M], tl.float32) + 8.0
            delta = tl.zeros([BLOCK_M], tl.float32)
        if VEC == 5:  # scores as [BLOCK_M, BLOCK_N]: LSE and delta index rows
            q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
            lse = tl.load(LSE + bh * N + rows)
            delta = tl.load(DELTA + bh * N + rows)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(do.dtype)
            dk += tl.dot(tl.trans(ds), q)
        else:
            sT = tl.dot(k, qT) * qk_scale
            pT = tl.math.exp2(sT - lse[None, :])
            dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
            dsT = (pT * (dpT - delta[None, :])).to(do.dtype)
            dk += tl.dot(dsT, tl.trans(qT))
        if VEC >= 3:
            lse_c = lse_n
            delta_c = delta_n
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


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = dev.type == "cpu"
    import scripts.bench_attention as BA
    shapes = [(2, 1024)] if small else [(4, 4096), (1, 16384)]
    H, D, blk = (2 if small else 16), 64, 64
    BA.H = H
    for name in ("bigbird", "fixed"):
        for B, N in shapes:
            layout = BA.make_layout(name, blk, N)[0]
            g = torch.Generator(device=dev).manual_seed(0)
            dt = torch.float16 if small else torch.bfloat16
            q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
                           for _ in range(4))
            out, lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
            delta = (out.float() * do.float()).sum(-1)
            ld = torch.stack([lse, delta], -1).contiguous()
            dq, dk, dv = F._backward_impl(do, q, k, v, out, lse, layout, None, blk, None, False)
            lut = F._get_lut(layout, blk, blk, blk, N, False, dev, "col")
            ns = max(lut.n_slots, 1)
            ws_dk = torch.empty((ns * B, blk, D), dtype=torch.float32, device=dev)
            ws_dv = torch.empty((ns * B, blk, D), dtype=torch.float32, device=dev)
            gk, gv = torch.empty_like(k), torch.empty_like(v)
            scale = D ** -0.5

            def run(vec=0, qt=0, warps=4, stages=3, bm=64):
                dkdv_kernel[(lut.n_work * B,)](
                    q, k, v, do, gk, gv, lse, delta, ld, lut.idx, lut.work, ws_dk, ws_dv,
                    B, H, N, lut.n_own, lut.n_other, lut.n_work, scale * 1.4426950408889634,
                    scale, BLOCK_M=bm, BLOCK_N=blk, HEAD_DIM=D, HAS_SPLIT=lut.n_slots > 0,
                    VEC=vec, QT=qt, num_warps=warps, num_stages=stages)
            run()
            for vec in (2, 3, 4, 5):
                gk0 = gk.clone()
                run(vec)
                print("vec", vec, "same as vec0:", (gk - gk0).abs().max().item(), flush=True)
            # unsplit columns must match the real kernel
            err = (gk.float() - dk.float()).abs().max().item() if lut.n_slots == 0 else None
            print(f"{name} {B}x{N} split cols {lut.n_split}; dk err (no split only) {err}",
                  flush=True)
            if small:
                continue
            t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
            from triton.testing import do_bench_cudagraph
            res = {}
            fwd_us = t(lambda: F._forward_impl(q, k, v, layout, None, blk, None, False))
            bwd_us = t(lambda: F._backward_impl(do, q, k, v, out, lse, layout, None, blk, None,
                                                False))
            res["real fwd"] = fwd_us
            res["real bwd (dq + dkdv + reduces)"] = bwd_us
            for vec in (0, 1, 5):
                for qt in (0,):
                    for warps, stages in ((4, 2), (4, 3)):
                        res[f"dkdv vec{vec} qT{qt} w{warps} s{stages}"] = t(
                            lambda: run(vec, qt, warps, stages))
            for kk, us in res.items():
                print(f"{name} {B}x{N} {kk}: {us:.1f} us", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
