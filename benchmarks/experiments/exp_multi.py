"""Experiment: two work items per program, their records and Q tiles loaded together at the
start. exp_persist.py showed a persistent grid alone gains nothing (so starting a program
costs little), while a fit over Fixed and BigBird block 64 (program time = a + b * tiles)
gives a ~ 4 tiles' worth of time per item: the latency chain of an item (record -> Q / LUT ->
K, V -> first MMA, then the epilogue) during which its program computes nothing. Here the
second item's record and Q load are in flight while the first item runs. Short items are
paired with their neighbour (same batch and head, next query tile: they share K/V tiles);
long (split) items run alone. Full tiles only. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_multi.py
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
from benchmarks.experiments.exp_persist import forward as grid_forward  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # noqa: BLE001
    TensorDescriptor = None


@triton.jit
def _record(WORK, u, B, n_work):
    w = u // B
    return (u % B, tl.load(WORK + w), tl.load(WORK + n_work + w),
            tl.load(WORK + 2 * n_work + w), tl.load(WORK + 3 * n_work + w))


@triton.jit
def _load_q(q_desc, Q, b, r, H, N, n_qt, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
            TMA: tl.constexpr):
    base = (b * H + r // n_qt) * N + (r % n_qt) * BLOCK
    if TMA:
        return q_desc.load([base, 0])
    else:
        rows = (base + tl.arange(0, BLOCK)).to(tl.int64)
        return tl.load(Q + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _run(q, k_desc, v_desc, o_desc, K, V, O, LSE, IDX, WS_ACC, WS_ML,
         b, r, lo, hi, slot, B, H, N, n_qt, n_kt, qk_scale,
         BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
         TMA: tl.constexpr):
    h = r // n_qt
    qt = r % n_qt
    base = (b * H + h) * N
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
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
            rows_q = (base + qt * BLOCK + offs_n).to(tl.int64)
            tl.store(O + rows_q[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty))
        tl.store(LSE + base + qt * BLOCK + rr, lse)


@triton.jit
def pair_fwd(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WORK, PAIR, WS_ACC, WS_ML,
             B, H, N, n_qt, n_kt, n_work, qk_scale,
             BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
             TMA: tl.constexpr):
    """Program p runs unit PAIR[p, 0] (unit = item * B + batch), then PAIR[p, 1] if >= 0."""
    pid = tl.program_id(0)
    u1 = tl.load(PAIR + 2 * pid)
    u2 = tl.load(PAIR + 2 * pid + 1)
    b1, r1, lo1, hi1, s1 = _record(WORK, u1, B, n_work)
    b2, r2, lo2, hi2, s2 = _record(WORK, tl.maximum(u2, 0), B, n_work)
    q1 = _load_q(q_desc, Q, b1, r1, H, N, n_qt, BLOCK, HEAD_DIM, TMA)
    q2 = _load_q(q_desc, Q, b2, r2, H, N, n_qt, BLOCK, HEAD_DIM, TMA)
    _run(q1, k_desc, v_desc, o_desc, K, V, O, LSE, IDX, WS_ACC, WS_ML, b1, r1, lo1, hi1, s1,
         B, H, N, n_qt, n_kt, qk_scale, BLOCK, HEAD_DIM, HAS_SPLIT, TMA)
    if u2 >= 0:
        _run(q2, k_desc, v_desc, o_desc, K, V, O, LSE, IDX, WS_ACC, WS_ML, b2, r2, lo2, hi2,
             s2, B, H, N, n_qt, n_kt, qk_scale, BLOCK, HEAD_DIM, HAS_SPLIT, TMA)


def pairs(lut, B, max_len):
    """[n_prog, 2] unit ids: items longer than max_len alone (first, as the package launches
    them); the others two by two in launch order, per batch (neighbouring query tiles)."""
    work = lut.work.cpu().tolist()
    n = lut.n_work
    long_ = [w for w in range(n) if work[2][w] - work[1][w] > max_len]
    short = [w for w in range(n) if work[2][w] - work[1][w] <= max_len]
    prog = [[w * B + b, -1] for w in long_ for b in range(B)]
    for i in range(0, len(short), 2):
        for b in range(B):
            a = short[i] * B + b
            c = short[i + 1] * B + b if i + 1 < len(short) else -1
            prog.append([a, c])
    return torch.tensor(prog, dtype=torch.int32, device=lut.work.device)


def pair_forward(q, k, v, lut, block, tma, prog, stages=3):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    ns = lut.n_slots
    ws_acc = torch.empty((max(ns, 1) * B, block, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((max(ns, 1) * B, 2, block), dtype=torch.float32, device=q.device)
    if tma:
        descs = [TensorDescriptor.from_tensor(t.view(B * H * N, D), [block, D])
                 for t in (q, k, v, out)]
    else:
        descs = [None] * 4
    scale = D ** -0.5 * 1.4426950408889634
    pair_fwd[(prog.shape[0],)](
        *descs, q, k, v, out, lse, lut.idx, lut.work, prog, ws_acc, ws_ml,
        B, H, N, lut.n_own, lut.n_other, lut.n_work, scale,
        BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, TMA=tma, num_warps=4, num_stages=stages)
    if lut.n_split:
        fused_attn_fwd_combine_kernel[(lut.n_split * B,)](
            out, lse, ws_acc, ws_ml, lut.split, *out.stride()[:3], B, H, N, lut.n_own,
            lut.n_split, BLOCK_M=block, HEAD_DIM=D, EVEN=True, num_warps=4)
    return out, lse


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = dev.type == "cpu"
    import scripts.bench_attention as BA
    H, D = (2 if small else 16), 64
    BA.H = H
    shapes = [(2, 1024, "bigbird", 64)] if small else [
        (4, 4096, "bigbird", 64), (1, 16384, "bigbird", 64), (4, 4096, "fixed", 64),
        (4, 4096, "bigbird", 128)]
    for B, N, name, blk in shapes:
        if blk == 128:
            continue  # the package uses 128x64 tiles at block 128; this experiment is 64x64
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float16 if small else torch.bfloat16
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row", batch=B)
        assert lut.all_full, "experiment handles full tiles only"
        lens = (lut.work[2] - lut.work[1]).float()
        print(f"{B}x{N} {name}{blk}: {lut.n_work} items, mean {lens.mean():.1f} tiles, "
              f"max {lens.max():.0f}, split rows {lut.n_split}", flush=True)
        variants = {"ptr grid": lambda: grid_forward(q, k, v, lut, blk, False)}
        tmas = (False,) if small or TensorDescriptor is None else (False, True)
        if not small:
            variants["tma grid"] = lambda: grid_forward(q, k, v, lut, blk, True)
        for max_len in (12, 24):
            prog = pairs(lut, B, max_len)
            for tma in tmas:
                for stages in ((3,) if small else (2, 3)):
                    vname = f"{'tma' if tma else 'ptr'} pairs <= {max_len} s{stages}"
                    variants[vname] = (lambda prog=prog, tma=tma, stages=stages:
                                       pair_forward(q, k, v, lut, blk, tma, prog, stages))
        check_and_time(f"{B}x{N} {name}", variants, q, k, v, layout, blk, small)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
