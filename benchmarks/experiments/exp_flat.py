"""Experiment: flattened forward. Each program walks a run of (row, key tile) entries that
spans several short rows (one pipelined loop), resetting the softmax state at a row's first
entry and storing at its last. BigBird 64, coarse full tiles, no kpm/causal, EVEN."""
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels.fused_attention import fused_attn_fwd_combine_kernel  # noqa: E402


@triton.jit
def flat_fwd(Q, K, V, O, LSE, ENT, PROG, WS_ACC, WS_ML,
             s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
             B, H, N, n_qt, n_ent, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             QMODE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid % B
    p = pid // B
    e_lo = tl.load(PROG + p)
    e_hi = tl.load(PROG + p + 1)
    b64 = b.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Qb = Q + b64 * s_qb
    Kb = K + b64 * s_kb
    Vb = V + b64 * s_vb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = tl.zeros([BLOCK_M, HEAD_DIM], Q.dtype.element_ty)
    for e in range(e_lo, e_hi):
        r = tl.load(ENT + e)
        kt = tl.load(ENT + n_ent + e)
        code = tl.load(ENT + 2 * n_ent + e)
        h64 = (r // n_qt).to(tl.int64)
        qt = r % n_qt
        first = (code & 1) != 0
        rows = qt * BLOCK_M + offs_r
        q_ptrs = Qb + h64 * s_qh + rows[:, None] * s_qm + offs_d[None, :]
        if QMODE == 0:
            q = tl.load(q_ptrs)
        else:
            qn = tl.load(q_ptrs, mask=(tl.zeros([BLOCK_M], tl.int32) + (code & 1))[:, None] != 0,
                         other=0.0)
            q = tl.where(first, qn, q)
        cols = kt * BLOCK_N + offs_n
        k = tl.load(Kb + h64 * s_kh + cols[:, None] * s_kn + offs_d[None, :])
        v = tl.load(Vb + h64 * s_vh + cols[:, None] * s_vn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))
        m_prev = tl.where(first, float("-inf"), m_i)
        m_new = tl.maximum(m_prev, tl.max(qk, 1) * qk_scale)
        pr = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_prev - m_new)  # 0 at a row's first entry
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        if (code & 2) != 0:
            slot = (code >> 2) - 1
            if slot < 0:
                out = acc / l_i[:, None]
                lse = m_i + tl.math.log2(l_i)
                tl.store(O + b64 * s_ob + h64 * s_oh + rows[:, None] * s_om + offs_d[None, :],
                         out.to(O.dtype.element_ty))
                tl.store(LSE + (b64 * H + h64) * N + rows, lse)
            else:
                ws = slot.to(tl.int64) * B + b64
                tl.store(WS_ACC + ws * BLOCK_M * HEAD_DIM + offs_r[:, None] * HEAD_DIM +
                         offs_d[None, :], acc)
                tl.store(WS_ML + ws * 2 * BLOCK_M + offs_r, m_i)
                tl.store(WS_ML + ws * 2 * BLOCK_M + BLOCK_M + offs_r, l_i)


def flat_lut(layout, device, B, k_waves):
    L = layout.bool()
    H, nb, _ = L.shape
    lens = L.sum(-1).reshape(-1).tolist()
    cols = [torch.nonzero(L[h, i]).flatten().tolist() for h in range(H) for i in range(nb)]
    E = sum(lens)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    S = max(8, -(-E * B // (k_waves * n_sm)))
    rows, tiles, codes = [], [], []
    progs_long, progs_short = [], []
    split, slot_n = [], 0
    cur = []
    for r, c in enumerate(cols):
        n = len(c)
        if n > S:
            nc = -(-n // S)
            split.append((r, slot_n, nc))
            for j in range(nc):
                seg = c[j * n // nc:(j + 1) * n // nc]
                ent = [(r, t, (1 if i == 0 else 0) | (2 if i == len(seg) - 1 else 0) |
                        ((slot_n + 1) << 2 if i == len(seg) - 1 else 0))
                       for i, t in enumerate(seg)]
                progs_long.append(ent)
                slot_n += 1
            continue
        if sum(len(x) for x in cur) + n > S and cur:
            progs_short.append([e for x in cur for e in x])
            cur = []
        cur.append([(r, t, (1 if i == 0 else 0) | (2 if i == n - 1 else 0))
                    for i, t in enumerate(c)])
    if cur:
        progs_short.append([e for x in cur for e in x])
    progs = progs_long + progs_short
    offs = [0]
    for pg in progs:
        for (r, t, cd) in pg:
            rows.append(r), tiles.append(t), codes.append(cd)
        offs.append(len(rows))
    ent = torch.tensor([rows, tiles, codes], dtype=torch.int32)
    split_t = torch.tensor(split, dtype=torch.int32).t().contiguous() if split else \
        torch.zeros(3, 0, dtype=torch.int32)
    return dict(ent=ent.to(device).contiguous(), prog=torch.tensor(offs, dtype=torch.int32,
                device=device), n_prog=len(progs), n_ent=len(rows), split=split_t.to(device),
                n_split=split_t.shape[1], n_slots=slot_n, n_qt=nb, S=S)


def flat_forward(q, k, v, lut, block, qmode, warps=4, stages=3):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    ns = max(lut["n_slots"], 1)
    ws_acc = torch.empty((ns * B, block, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((ns * B, 2, block), dtype=torch.float32, device=q.device)
    scale = D ** -0.5 * 1.4426950408889634
    flat_fwd[(lut["n_prog"] * B,)](
        q, k, v, out, lse, lut["ent"], lut["prog"], ws_acc, ws_ml,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        B, H, N, lut["n_qt"], lut["n_ent"], scale,
        BLOCK_M=block, BLOCK_N=block, HEAD_DIM=D, QMODE=qmode, num_warps=warps,
        num_stages=stages)
    if lut["n_split"]:
        fused_attn_fwd_combine_kernel[(lut["n_split"] * B,)](
            out, lse, ws_acc, ws_ml, lut["split"], *out.stride()[:3], B, H, N, lut["n_qt"],
            lut["n_split"], BLOCK_M=block, HEAD_DIM=D, EVEN=True, num_warps=4)
    return out, lse


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
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        ref, ref_lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
        variants = {}
        for kw in ((1, 2) if small else (2, 4, 8, 16)):
            lut = flat_lut(layout, dev, B, kw)
            for qmode in (0, 1):
                for warps, stages in ((4, 3),) if small else ((4, 2), (4, 3), (4, 4)):
                    variants[f"flat waves{kw} S{lut['S']} q{qmode} w{warps} s{stages}"] = (
                        lambda lut=lut, qmode=qmode, warps=warps, stages=stages:
                        flat_forward(q, k, v, lut, blk, qmode, warps, stages))
        for name, fn in variants.items():
            o, lse = fn()
            err = ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            lerr = (lse - ref_lse).abs().max().item()
            print(f"{B}x{N} {name}: max rel err {err:.2e} lse err {lerr:.2e}", flush=True)
        if small:
            continue
        from triton.testing import do_bench_cudagraph

        def t(fn):
            return do_bench_cudagraph(fn, rep=100, return_mode="median")

        base = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa: E731
        res = {"base": t(base)}
        for name, fn in variants.items():
            res[name] = t(fn)
        res["base (again)"] = t(base)
        for name, ms in res.items():
            print(f"{B}x{N} BigBird64 fwd {name}: {ms * 1000:.1f} us", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
