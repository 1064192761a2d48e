"""Experiment: forward with two query tiles per program (shared K/V loads), BigBird 64.
Coarse full tiles only, no kpm, no causal, N multiple of 2*BLOCK. Not part of the package."""
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
def _upd(acc, l_i, m_i, q, k, v, qk_scale):
    qk = tl.dot(q, tl.trans(k))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _store(O, LSE, acc, l_i, m_i, b64, h64, offs_m, offs_d, s_ob, s_oh, s_om, H, N):
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b64 * s_ob + h64 * s_oh + offs_m[:, None] * s_om + offs_d[None, :],
             out.to(O.dtype.element_ty))
    tl.store(LSE + (b64 * H + h64) * N + offs_m, lse)


@triton.jit
def pair_fwd(Q, K, V, O, LSE, IDX, WHO, NSA, WORK, WS_ACC, WS_ML,
             s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
             B, H, N, n_pt, n_kt, n_work, qk_scale,
             BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
             MODE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r = tl.load(WORK + w)
    lo = tl.load(WORK + n_work + w)
    hi = tl.load(WORK + 2 * n_work + w)
    slot = tl.load(WORK + 3 * n_work + w)
    h = r // n_pt
    pr = r % n_pt
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_a = pr * 2 * BLOCK + tl.arange(0, BLOCK)
    offs_b = offs_a + BLOCK
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    Qb = Q + b64 * s_qb + h64 * s_qh
    qa = tl.load(Qb + offs_a[:, None] * s_qm + offs_d[None, :])
    qb = tl.load(Qb + offs_b[:, None] * s_qm + offs_d[None, :])
    K_base = K + b64 * s_kb + h64 * s_kh
    V_base = V + b64 * s_vb + h64 * s_vh
    row = r.to(tl.int64) * n_kt
    m_a = tl.full([BLOCK], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK], tl.float32)
    acc_a = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    m_b = tl.full([BLOCK], float("-inf"), tl.float32)
    l_b = tl.zeros([BLOCK], tl.float32)
    acc_b = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    if MODE == 0:  # one loop, conditional updates
        for it in range(lo, hi):
            kt = tl.load(IDX + row + it)
            who = tl.load(WHO + row + it)
            cols = kt * BLOCK + offs_n
            k = tl.load(K_base + cols[:, None] * s_kn + offs_d[None, :])
            v = tl.load(V_base + cols[:, None] * s_vn + offs_d[None, :])
            if (who & 1) != 0:
                acc_a, l_a, m_a = _upd(acc_a, l_a, m_a, qa, k, v, qk_scale)
            if (who & 2) != 0:
                acc_b, l_b, m_b = _upd(acc_b, l_b, m_b, qb, k, v, qk_scale)
    else:  # three loops: shared tiles, then A-only, then B-only
        e1 = tl.load(NSA + r)
        e2 = tl.load(NSA + H * n_pt + r)
        for it in range(lo, tl.minimum(hi, e1)):
            kt = tl.load(IDX + row + it)
            cols = kt * BLOCK + offs_n
            k = tl.load(K_base + cols[:, None] * s_kn + offs_d[None, :])
            v = tl.load(V_base + cols[:, None] * s_vn + offs_d[None, :])
            acc_a, l_a, m_a = _upd(acc_a, l_a, m_a, qa, k, v, qk_scale)
            acc_b, l_b, m_b = _upd(acc_b, l_b, m_b, qb, k, v, qk_scale)
        for it in range(tl.maximum(lo, e1), tl.minimum(hi, e2)):
            kt = tl.load(IDX + row + it)
            cols = kt * BLOCK + offs_n
            k = tl.load(K_base + cols[:, None] * s_kn + offs_d[None, :])
            v = tl.load(V_base + cols[:, None] * s_vn + offs_d[None, :])
            acc_a, l_a, m_a = _upd(acc_a, l_a, m_a, qa, k, v, qk_scale)
        for it in range(tl.maximum(lo, e2), hi):
            kt = tl.load(IDX + row + it)
            cols = kt * BLOCK + offs_n
            k = tl.load(K_base + cols[:, None] * s_kn + offs_d[None, :])
            v = tl.load(V_base + cols[:, None] * s_vn + offs_d[None, :])
            acc_b, l_b, m_b = _upd(acc_b, l_b, m_b, qb, k, v, qk_scale)
    if HAS_SPLIT:
        if slot < 0:
            _store(O, LSE, acc_a, l_a, m_a, b64, h64, offs_a, offs_d, s_ob, s_oh, s_om, H, N)
            _store(O, LSE, acc_b, l_b, m_b, b64, h64, offs_b, offs_d, s_ob, s_oh, s_om, H, N)
        else:
            _ws_store(WS_ACC, WS_ML, slot.to(tl.int64) * B + b64, acc_a, acc_b, m_a, m_b, l_a,
                      l_b, offs_d, BLOCK, HEAD_DIM)
    else:
        _store(O, LSE, acc_a, l_a, m_a, b64, h64, offs_a, offs_d, s_ob, s_oh, s_om, H, N)
        _store(O, LSE, acc_b, l_b, m_b, b64, h64, offs_b, offs_d, s_ob, s_oh, s_om, H, N)


@triton.jit
def _ws_store(WS_ACC, WS_ML, ws, acc_a, acc_b, m_a, m_b, l_a, l_b, offs_d,
              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    rr = tl.arange(0, BLOCK)
    base = WS_ACC + ws * 2 * BLOCK * HEAD_DIM
    tl.store(base + rr[:, None] * HEAD_DIM + offs_d[None, :], acc_a)
    tl.store(base + (rr + BLOCK)[:, None] * HEAD_DIM + offs_d[None, :], acc_b)
    mb = WS_ML + ws * 4 * BLOCK
    tl.store(mb + rr, m_a)
    tl.store(mb + BLOCK + rr, m_b)
    tl.store(mb + 2 * BLOCK + rr, l_a)
    tl.store(mb + 3 * BLOCK + rr, l_b)


def pair_lut(layout, device, split_min=16):
    """layout [H, nb, nb] (block = tile) -> tables for pair rows (tiles 2p, 2p+1)."""
    L = layout.bool()
    H, nb, _ = L.shape
    A, Bm = L[:, 0::2], L[:, 1::2]
    both, aonly, bonly = A & Bm, A & ~Bm, ~A & Bm
    key = both.to(torch.int8) * 3 + aonly.to(torch.int8) * 2 + bonly.to(torch.int8)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    code = torch.gather(key, -1, order)
    who = torch.where(code == 3, 3, torch.where(code == 2, 1, torch.where(code == 1, 2, 0)))
    n_pt = nb // 2
    idx = order.to(torch.int32).reshape(H * n_pt, nb)
    who = who.to(torch.int32).reshape(H * n_pt, nb)
    ns = both.sum(-1).reshape(-1)
    na = aonly.sum(-1).reshape(-1)
    lens = (A | Bm).sum(-1).reshape(-1).to(torch.int64)
    nsa = torch.stack([ns, ns + na]).to(torch.int32)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    S = max(split_min, -(-int(lens.sum()) // (2 * n_sm)))
    items, split, slot_n = [], [], 0
    for r in range(lens.numel()):
        n = int(lens[r])
        nc = max(1, -(-n // S))
        if nc > 1:
            split.append((r, slot_n, nc))
        for c in range(nc):
            lo, hi = c * n // nc, (c + 1) * n // nc
            items.append((r, lo, hi, slot_n if nc > 1 else -1))
            if nc > 1:
                slot_n += 1
    long_first = sorted(items, key=lambda it: -(it[2] - it[1]) if it[2] - it[1] >= (S + 1) // 2
                        else 0)
    work = torch.tensor(long_first, dtype=torch.int32).t().contiguous()
    split_t = torch.tensor(split, dtype=torch.int32).t().contiguous() if split else \
        torch.zeros(3, 0, dtype=torch.int32)
    return dict(idx=idx.to(device), who=who.to(device), nsa=nsa.to(device),
                work=work.to(device), n_work=work.shape[1], split=split_t.to(device),
                n_split=split_t.shape[1], n_slots=slot_n, n_pt=n_pt, n_kt=nb)


def pair_forward(q, k, v, lut, block, mode, warps=4, stages=3):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    ns = lut["n_slots"]
    ws_acc = torch.empty((max(ns, 1) * B, 2 * block, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((max(ns, 1) * B, 2, 2 * block), dtype=torch.float32, device=q.device)
    scale = D ** -0.5 * 1.4426950408889634
    pair_fwd[(lut["n_work"] * B,)](
        q, k, v, out, lse, lut["idx"], lut["who"], lut["nsa"], lut["work"], ws_acc, ws_ml,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        B, H, N, lut["n_pt"], lut["n_kt"], lut["n_work"], scale,
        BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, MODE=mode, num_warps=warps,
        num_stages=stages)
    if lut["n_split"]:
        # the workspace holds [m_a, m_b, l_a, l_b] per slot = (m, l) over 2*block rows
        fused_attn_fwd_combine_kernel[(lut["n_split"] * B,)](
            out, lse, ws_acc, ws_ml, lut["split"], *out.stride()[:3], B, H, N, lut["n_pt"],
            lut["n_split"], BLOCK_M=2 * block, HEAD_DIM=D, EVEN=True, num_warps=4)
    return out, lse


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = dev.type == "cpu"
    from scripts.bench_attention import make_layout
    shapes = [(1, 1024)] if small else [(4, 4096), (1, 16384)]
    H, D, blk = (2 if small else 16), 64, 64
    import scripts.bench_attention as BA
    BA.H = H
    rows = []
    for B, N in shapes:
        layout = make_layout("bigbird", blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float16 if small else torch.bfloat16
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        ref, ref_lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
        lut = pair_lut(layout, dev, int(os.environ.get('SPLIT_MIN', 16)))
        variants = {}
        for mode in (0, 1):
            for warps, stages in ((4, 2), (4, 3), (8, 3)):
                variants[f"pair mode{mode} w{warps} s{stages}"] = (
                    lambda mode=mode, warps=warps, stages=stages:
                    pair_forward(q, k, v, lut, blk, mode, warps, stages))
        for name, fn in variants.items():
            o, lse = fn()
            err = ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            lerr = (lse - ref_lse).abs().max().item()
            rows.append((B, N, name, err, lerr))
            print(f"{B}x{N} {name}: max rel err {err:.2e} lse err {lerr:.2e}", flush=True)
        if small:
            continue
        from triton.testing import do_bench_cudagraph

        def t(fn):
            return do_bench_cudagraph(fn, rep=100, return_mode="median")

        base = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa: E731
        res = {"base 64x64 w4 s3": t(base)}
        for cfg in ((64, 64, 4, 2), (64, 64, 4, 4), (64, 64, 8, 3), (128, 64, 8, 3),
                    (128, 64, 4, 3)):
            F.set_fused_config(64, 64, fwd=cfg)
            res[f"base {cfg}"] = t(base)
            F.set_fused_config()
        for name, fn in variants.items():
            res[name] = t(fn)
        res["base 64x64 w4 s3 (again)"] = t(base)
        for name, ms in res.items():
            print(f"{B}x{N} BigBird64 fwd {name}: {ms * 1000:.1f} us", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
