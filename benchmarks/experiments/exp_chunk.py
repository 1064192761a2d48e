"""Experiment: how long may one work item be? The package cuts a LUT row (column) longer than
S tiles into near-equal items, S = max(16, tiles per batch / (2 * SMs)). S ignores the
batch, so a BigBird global row is cut into ~21-tile items at 4096 x4 and ~85-tile items at
16384 x1, where the whole call is only ~45 tiles per program slot (132 SMs x ~4). Sweeps S
for the package's forward and forward+backward, then times a single-loop forward (only
full tiles, as block 64 BigBird has) with pointer loads and with TMA at the same S, to
separate what TMA brings from what the simpler loop brings. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_chunk.py
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

AUTO = F._split_chunk


def use_chunk(S):
    """Force the split length (None: the package's rule) and drop every cached table."""
    F._split_chunk = AUTO if S is None else (lambda total, device: S)
    F.clear_lut_cache()


@triton.jit
def one_loop_fwd(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WORK, WS_ACC, WS_ML,
                 B, H, N, n_qt, n_kt, n_work, qk_scale,
                 BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
                 TMA: tl.constexpr):
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
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_q = (base + qt * BLOCK + offs_n).to(tl.int64)
    if TMA:
        q = q_desc.load([base + qt * BLOCK, 0])
    else:
        q = tl.load(Q + rows_q[:, None] * HEAD_DIM + offs_d[None, :])
    row = r.to(tl.int64) * n_kt
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for it in range(lo, hi):
        c = tl.load(IDX + row + it)
        if TMA:
            k = k_desc.load([base + c * BLOCK, 0])
            v = v_desc.load([base + c * BLOCK, 0])
        else:
            rows_k = (base + c * BLOCK + offs_n).to(tl.int64)
            k = tl.load(K + rows_k[:, None] * HEAD_DIM + offs_d[None, :])
            v = tl.load(V + rows_k[:, None] * HEAD_DIM + offs_d[None, :])
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
        if TMA:
            o_desc.store([base + qt * BLOCK, 0], out.to(O.dtype.element_ty))
        else:
            tl.store(O + rows_q[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty))
        tl.store(LSE + base + qt * BLOCK + offs_n, lse)


def one_loop_forward(q, k, v, lut, block, tma, stages=3, maxnreg=None):
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    ns = lut.n_slots
    ws_acc = torch.empty((max(ns, 1) * B, block, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((max(ns, 1) * B, 2, block), dtype=torch.float32, device=q.device)
    descs = [TensorDescriptor.from_tensor(t.view(B * H * N, D), [block, D])
             for t in (q, k, v, out)]
    one_loop_fwd[(lut.n_work * B,)](
        *descs, q, k, v, out, lse, lut.idx, lut.work, ws_acc, ws_ml,
        B, H, N, lut.n_own, lut.n_other, lut.n_work, D ** -0.5 * 1.4426950408889634,
        BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, TMA=tma, num_warps=4, num_stages=stages,
        **({} if maxnreg is None else {"maxnreg": maxnreg}))
    if lut.n_split:
        fused_attn_fwd_combine_kernel[(lut.n_split * B,)](
            out, lse, ws_acc, ws_ml, lut.split, *out.stride()[:3], B, H, N, lut.n_own,
            lut.n_split, BLOCK_M=block, HEAD_DIM=D, EVEN=True, num_warps=4)
    return out, lse


def main():
    import scripts.bench_attention as BA
    from triton.testing import do_bench, do_bench_cudagraph
    dev = torch.device("cuda")
    H, D = 16, 64
    BA.H = H
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__,
          time.strftime("%Y-%m-%dT%H:%M:%S"), flush=True)
    rows = [(4, 4096, "bigbird", 64), (1, 16384, "bigbird", 64), (4, 4096, "bigbird", 128),
            (1, 16384, "bigbird", 128), (1, 16384, "fixed", 64), (1, 16384, "bigbird", 32)]
    chunks = [None, 8, 12, 16, 24, 32, 48, 64]

    def g(fn, grads=None):
        return do_bench_cudagraph(fn, rep=100, grad_to_none=grads, return_mode="median") * 1e3

    def e(fn, grads=None):
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median") * 1e3

    for B, N, name, blk in rows:
        layout = BA.make_layout(name, blk, N)[0].to(dev).bool().contiguous()
        gen = torch.Generator(device=dev).manual_seed(N + blk)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=gen)
                   .requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=gen)
        tag = f"{B}x{N} {name}{blk}"
        use_chunk(None)
        ref = F.fused_block_sparse_attention(q, k, v, layout, blk)
        ref.backward(do)
        # a live graph keeps the leaves' grad accumulators, made on this (legacy) stream;
        # a graph capture of a backward that reaches them fails
        ref = ref.detach()
        ref_g = [t.grad.clone() for t in (q, k, v)]
        lut = F._get_lut(layout, blk, *F._config(D, blk)["fwd"][:2], N, False, dev, "row")
        dens = lut.ntot.sum().item() * F._config(D, blk)["fwd"][0] * \
            F._config(D, blk)["fwd"][1] / (H * N * N)

        def dense_f():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def dense_fb():
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(do)

        td_f, td_fb = g(dense_f), g(dense_fb, [q, k, v])
        print(f"{tag}: tile density {dens:.4f}, auto S {AUTO(lut.ntot.sum().item(), dev)}, "
              f"dense fwd {td_f:.1f} us, fwd+bwd {td_fb:.1f} us; T3 needs fwd <= "
              f"{dens * td_f / 0.6:.1f}, fwd+bwd <= {dens * td_fb / 0.5:.1f}", flush=True)
        for S in chunks:
            use_chunk(S)
            for t in (q, k, v):
                t.grad = None
            out = F.fused_block_sparse_attention(q, k, v, layout, blk)
            out.backward(do)
            out = out.detach()
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                      for a, b in zip([out] + [t.grad for t in (q, k, v)], [ref] + ref_g))

            def f():
                return F.fused_block_sparse_attention(q, k, v, layout, blk)

            def fb():
                F.fused_block_sparse_attention(q, k, v, layout, blk).backward(do)

            ef, efb = e(f), e(fb, [q, k, v])
            tf, tfb = g(f), g(fb, [q, k, v])
            lut = F._get_lut(layout, blk, *F._config(D, blk)["fwd"][:2], N, False, dev, "row")
            print(f"{tag} S={S or 'auto'}: items {lut.n_work}, split rows {lut.n_split}; "
                  f"graph fwd {tf:.1f} us ({dens * td_f / tf:.0%}), fwd+bwd {tfb:.1f} us "
                  f"({dens * td_fb / tfb:.0%}); eager fwd {ef:.1f}, fwd+bwd {efb:.1f}; "
                  f"max rel diff vs auto {err:.1e}", flush=True)
        if blk != 64 or name != "bigbird":
            continue
        with torch.no_grad():
            for S in (None, 12, 16, 24, 32):
                use_chunk(S)
                lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row")
                for tma in (False, True):
                    for stages in (2, 3):
                        def fn(tma=tma, stages=stages, lut=lut):
                            return one_loop_forward(q, k, v, lut, blk, tma, stages)
                        o, _ = fn()
                        err = ((o.float() - ref.float()).abs().max() /
                               ref.float().abs().max()).item()
                        t = g(fn)
                        print(f"{tag} one-loop {'tma' if tma else 'ptr'} s{stages} "
                              f"S={S or 'auto'}: fwd {t:.1f} us ({dens * td_f / t:.0%}), "
                              f"max rel diff {err:.1e}", flush=True)
        use_chunk(None)
        print(f"{tag} dense again: fwd {g(dense_f):.1f} us", flush=True)
    print("done", time.strftime("%H:%M:%S"), flush=True)


if __name__ == "__main__":
    main()
