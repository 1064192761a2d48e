"""Experiment: fewer instructions in the forward's loop for full tiles (BigBird 64's case).

The SASS of the package's forward (head_dim 64, 64x64 tiles, TMA; compiled for sm_90 on the
CPU box) issues per warp and tile about 290 instructions: 36 FMNMX (row max), 36 FADD (row
sum), 34 FMUL (rescale of the accumulator), 34 FFMA (scale and subtract the max), 34 MUFU,
16 F2FP, the rest addressing and barriers; 8 HGMMA. Per tile that is about 290 issue, 272
MUFU and 256 tensor-core cycles per SM sub-partition, against about 600 measured: no unit
is saturated, and exp_fastexp (moving exp2 from the MUFU to FMAs) was slower. Two ways to
take instructions out of the chain, each on the full-tile branch only:

- "lsum": the row sum of P by the tensor cores, as P @ e0 with e0 a [BLOCK_N, 16] one-hot
  column (rows of bf16 P summed in fp32 by the MMA; the sum of the 16 columns costs a few
  adds), in place of 32 FADDs and their shuffles a thread.
- "lazy": the running max is raised only when some row of the tile exceeds it by more than
  8 (log2 units; P then stays below 256), a CTA-uniform branch (one max over the tile's
  rows); otherwise no rescale of the accumulator and the row sums (32 FMULs a thread and the
  alpha exp2 skipped). FlashAttention-4 does this per warp.

Variants are copies of the package's kernel module in /tmp with ``_fwd_inner`` changed,
swapped in (TMA forced), checked against the package's forward and timed from CUDA-graph
replays beside it and dense SDPA in one run. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_fwd_issue.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels import fused_attention as K  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402
from benchmarks.experiments.harness import module_from_source, rel  # noqa: E402

OLD = """            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:"""
TAIL = """        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
"""
TAIL_ELSE = """            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
"""
E0 = ("tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0).to(v.dtype)"
      " + tl.zeros([BLOCK_N, 16], v.dtype)")
MAX_EAGER = """            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
"""
MAX_LAZY = """            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if tl.max(m_new - m_i, 0) > 8.0:
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
            else:
                m_new = m_i
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
"""
SUM_ADD = "            l_i = l_i + tl.sum(p, 1)\n            acc = _mma(p.to(v.dtype), v, acc, UPCAST)\n"
SUM_MMA = ("            pb = p.to(v.dtype)\n"
           "            l_acc = _mma(pb, e0, l_acc, UPCAST)\n"
           "            acc = _mma(pb, v, acc, UPCAST)\n")
EAGER_SUM_MMA = ("            pb = p.to(v.dtype)\n"
                 "            l_acc = _mma(pb, e0, l_acc * alpha[:, None], UPCAST)\n"
                 "            acc = _mma(pb, v, acc * alpha[:, None], UPCAST)\n")
# with the row sums on the tensor cores, they are carried as a [BLOCK_M, 16] accumulator
# (column 0 holds them) so that their MMA is waited on with the P @ V one, not at once
LOOP = "    for it in range(lo, hi):\n"
LOOP_LACC = ("    e0 = " + E0.replace("v.dtype", "q.dtype") + "\n"
             "    l_acc = tl.where(tl.arange(0, 16)[None, :] == 0, l_i[:, None], 0.0)\n" + LOOP)
RET = "        m_i = m_new\n    return acc, l_i, m_i\n"
RET_LACC = ("        m_i = m_new\n"
            "    l_i = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, l_acc, 0.0), 1)\n"
            "    return acc, l_i, m_i\n")


def body(kind):
    if kind == "lsum":
        return MAX_EAGER + EAGER_SUM_MMA
    if kind == "lazy":
        return MAX_LAZY + SUM_ADD
    if kind == "lazy+lsum":
        return MAX_LAZY + SUM_MMA
    raise ValueError(kind)


NAMES = ("fused_attn_fwd_kernel",)


def variant(kind):
    src = open(K.__file__).read()
    assert src.count(OLD) == 1 and src.count(TAIL) == 1
    # the full-tile branch does its own sums and MMA; the other branch keeps the package's
    src = src.replace(OLD, body(kind) + "        else:")
    src = src.replace(TAIL, TAIL_ELSE)
    if "lsum" in kind:
        # the partial-tile branch adds its row sums to column 0 of the accumulator
        src = src.replace("            l_i = l_i * alpha + tl.sum(p, 1)\n",
                          "            l_acc = l_acc * alpha[:, None] + tl.where(tl.arange(0, 16)"
                          "[None, :] == 0, tl.sum(p, 1)[:, None], 0.0)\n")
        src = src.replace(LOOP, LOOP_LACC, 1).replace(RET, RET_LACC)
        if "lazy" in kind:
            src = src.replace("                l_i = l_i * alpha\n",
                              "                l_acc = l_acc * alpha[:, None]\n")
    return module_from_source(src, f"fwd_issue_{kind.replace('+', '_')}")


KINDS = ("lsum", "lazy", "lazy+lsum")


def use(mod):
    for n in NAMES:
        setattr(K, n, getattr(mod, n))
    F.set_fused_config(tma=True)


def main():
    from triton.testing import do_bench_cudagraph
    H, D = 16, 64
    BA.H = H
    dev = torch.device("cuda")
    orig = type("M", (), {n: getattr(K, n) for n in NAMES})
    mods = {kind: variant(kind) for kind in KINDS}
    t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    rows = (("bigbird", 64, 4, 4096), ("bigbird", 64, 1, 16384), ("fixed", 64, 4, 4096),
            ("bigbird", 128, 4, 4096), ("fixed", 128, 1, 16384))
    for name, blk, B, N in rows:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        q = q * 3  # sharper rows: the running max moves more often than with unit scores
        use(orig)
        fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
        out, lse = fwd()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        label = f"{name}{blk} {B}x{N}"
        res = {"dense SDPA fwd": t(lambda: sdpa(q, k, v)), "package fwd": t(fwd)}
        for kind, mod in mods.items():
            use(mod)
            try:
                o2, l2 = fwd()
                print(f"{label} {kind}: rel diff to package out {rel(o2, out):.1e} "
                      f"lse {(l2 - lse).abs().max().item():.1e}", flush=True)
                res[kind] = t(fwd)
            except Exception as e:  # noqa: BLE001
                print(f"{label} {kind}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        use(orig)
        res["package fwd (again)"] = t(fwd)
        res["dense SDPA fwd (again)"] = t(lambda: sdpa(q, k, v))
        dens = layout.float().mean().item()
        dense = min(res["dense SDPA fwd"], res["dense SDPA fwd (again)"])
        for kk, us in res.items():
            extra = "" if "dense" in kk else f"  ({dens * dense / us * 100:.1f}% of dense's rate)"
            print(f"{label} {kk}: {us:.1f} us{extra}", flush=True)
    F.set_fused_config()
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
