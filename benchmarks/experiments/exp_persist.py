"""Experiment: a persistent forward for short rows. A BigBird block-64 row is ~6 key tiles, so
each program of the package's forward spends a large part of its life starting up (work item
-> LUT entry -> K/V address -> first MMA: three dependent memory latencies) and storing O.
Here a grid of G programs (G = slots per SM x SMs) walks a host-made schedule of (work item,
batch) units, balanced by tile count (longest first, each to the least loaded program), with
the next unit's record loaded while the current one runs. Variants: pointer loads or TMA
(host descriptors over the [B*H*N, D] views), one program per unit or persistent, and G.
Uses the package's LUT (rows, work items, split rows) and its combine kernel; full tiles only
(block 64 / 128 layouts without masks). Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_persist.py
"""
import heapq
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
def _unit(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WS_ACC, WS_ML,
          r, lo, hi, slot, b, B, H, N, n_qt, n_kt, qk_scale,
          BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
          TMA: tl.constexpr):
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
        tl.store(LSE + base + qt * BLOCK + rr, lse)


@triton.jit
def grid_fwd(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WORK, WS_ACC, WS_ML,
             B, H, N, n_qt, n_kt, n_work, qk_scale,
             BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
             TMA: tl.constexpr):
    """One program per (work item, batch), as in the package."""
    pid = tl.program_id(0)
    b = pid % B
    w = pid // B
    r = tl.load(WORK + w)
    lo = tl.load(WORK + n_work + w)
    hi = tl.load(WORK + 2 * n_work + w)
    slot = tl.load(WORK + 3 * n_work + w)
    _unit(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WS_ACC, WS_ML,
          r, lo, hi, slot, b, B, H, N, n_qt, n_kt, qk_scale, BLOCK, HEAD_DIM, HAS_SPLIT, TMA)


@triton.jit
def persist_fwd(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, REC, PSTART, WS_ACC, WS_ML,
                B, H, N, n_qt, n_kt, qk_scale,
                BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SPLIT: tl.constexpr,
                TMA: tl.constexpr, PREFETCH: tl.constexpr):
    """Program p runs units PSTART[p] .. PSTART[p+1]-1 of REC ([n_units, 8] int32 records:
    row, lo, hi, slot, batch)."""
    pid = tl.program_id(0)
    start = tl.load(PSTART + pid)
    end = tl.load(PSTART + pid + 1)
    if PREFETCH:
        rec = REC + start * 8
        r = tl.load(rec)
        lo = tl.load(rec + 1)
        hi = tl.load(rec + 2)
        slot = tl.load(rec + 3)
        b = tl.load(rec + 4)
        for i in range(start, end):
            nrec = REC + (i + 1) * 8  # REC has one padding record at the end
            nr = tl.load(nrec)
            nlo = tl.load(nrec + 1)
            nhi = tl.load(nrec + 2)
            nslot = tl.load(nrec + 3)
            nb = tl.load(nrec + 4)
            _unit(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WS_ACC, WS_ML,
                  r, lo, hi, slot, b, B, H, N, n_qt, n_kt, qk_scale, BLOCK, HEAD_DIM,
                  HAS_SPLIT, TMA)
            r, lo, hi, slot, b = nr, nlo, nhi, nslot, nb
    else:
        for i in range(start, end):
            rec = REC + i * 8
            _unit(q_desc, k_desc, v_desc, o_desc, Q, K, V, O, LSE, IDX, WS_ACC, WS_ML,
                  tl.load(rec), tl.load(rec + 1), tl.load(rec + 2), tl.load(rec + 3),
                  tl.load(rec + 4), B, H, N, n_qt, n_kt, qk_scale, BLOCK, HEAD_DIM,
                  HAS_SPLIT, TMA)


def schedule(lut, B, G, overhead=2):
    """Units (w, b) in the package's launch order, each to the least loaded of G programs
    (cost: tiles + overhead); per program in launch order. -> (REC [n+1, 8], PSTART [G+1])."""
    work = lut.work.cpu().tolist()
    n = lut.n_work
    heap = [(0, p) for p in range(G)]
    lists = [[] for _ in range(G)]
    for w in range(n):
        for b in range(B):
            load, p = heapq.heappop(heap)
            lists[p].append((w, b))
            heapq.heappush(heap, (load + work[2][w] - work[1][w] + overhead, p))
    rec, start = [], [0]
    for p in range(G):
        for w, b in lists[p]:
            rec.append([work[0][w], work[1][w], work[2][w], work[3][w], b, 0, 0, 0])
        start.append(len(rec))
    rec.append([0] * 8)
    dev = lut.work.device
    return (torch.tensor(rec, dtype=torch.int32, device=dev),
            torch.tensor(start, dtype=torch.int32, device=dev))


def forward(q, k, v, lut, block, tma, G=None, prefetch=False, sched=None, stages=3):
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
    if G is None:
        grid_fwd[(lut.n_work * B,)](
            *descs, q, k, v, out, lse, lut.idx, lut.work, ws_acc, ws_ml,
            B, H, N, lut.n_own, lut.n_other, lut.n_work, scale,
            BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, TMA=tma, num_warps=4, num_stages=stages)
    else:
        rec, pstart = sched
        persist_fwd[(G,)](
            *descs, q, k, v, out, lse, lut.idx, rec, pstart, ws_acc, ws_ml,
            B, H, N, lut.n_own, lut.n_other, scale,
            BLOCK=block, HEAD_DIM=D, HAS_SPLIT=ns > 0, TMA=tma, PREFETCH=prefetch,
            num_warps=4, num_stages=stages)
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
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if not small else 4
    shapes = [(1, 512, "bigbird")] if small else [
        (4, 4096, "bigbird"), (1, 16384, "bigbird"), (4, 4096, "fixed")]
    for B, N, name in shapes:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float16 if small else torch.bfloat16
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row", batch=B)
        assert lut.all_full, "experiment handles full tiles only"
        variants = {"ptr grid": lambda: forward(q, k, v, lut, blk, False)}
        if TensorDescriptor is not None and not small:
            variants["tma grid"] = lambda: forward(q, k, v, lut, blk, True)
        for slots in (2, 3, 4):
            G = slots * n_sm
            sched = schedule(lut, B, G)
            for tma in ((False, True) if not small else (False,)):
                for pf in (False, True):
                    vname = f"{'tma' if tma else 'ptr'} persist {slots}/SM{' prefetch' if pf else ''}"
                    variants[vname] = (lambda G=G, sched=sched, tma=tma, pf=pf:
                                       forward(q, k, v, lut, blk, tma, G, pf, sched))
        check_and_time(f"{B}x{N} {name}", variants, q, k, v, layout, blk, small)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
