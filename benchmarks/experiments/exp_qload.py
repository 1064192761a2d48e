"""Experiment (run on an H200 on 2026-11-29, exp_qload_h200.log: slower everywhere, BigBird 64
at 4096 x4 95.1 -> 99.2 us, Fixed 64 220.3 -> 244.3; closed): the Q tile loaded inside the
tile loop, so that Triton's pipeliner issues it together with the first K/V tile.

`ncu_fwd_h200.md`: the forward's largest wait is each work item's pipeline fill. With the
first tile in the record (shipped), the TMA forward's chain is record -> Q tile (a
descriptor load outside a loop: Triton waits on it at once) -> first K/V tile -> first MMA.
Here the Q load moves into the loop, with a row offset that depends on the tile index
(``m0 + (first < 0)``, always m0, but not foldable), so it is not hoisted: the pipeliner's
prologue then issues Q, K and V of the first tile together and waits once (record -> Q, K,
V -> MMA). The price: Q is reloaded for every tile (from L2; 8 KB more per stage of shared
memory, 50% more TMA traffic per tile). Variant kernel module in /tmp, swapped in; checked
against the package and timed from CUDA-graph replays (TMA) beside it and dense SDPA.

    PYTHONPATH=. python3 benchmarks/experiments/exp_qload.py
    TRITON_INTERPRET=1 PYTHONPATH=. python3 benchmarks/experiments/exp_qload.py  # correctness
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

SUBS = [
    ("               lo0, first0, b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx, N,\n",
     "               lo0, first0, b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx, N,\n"
     "               Q_desc, Q_base, m0, stride_qm,\n"),
    ("        qk = _mm(q, tl.trans(k), UPCAST)\n        if POS_SCALE and not PARTIAL",
     "        q_t = _load_tile(Q_desc, Q_base, b, h, m0 + tl.where(first < 0, 1, 0), offs_m,\n"
     "                         stride_qm, offs_d, N, PARTIAL and not EVEN, TMA)\n"
     "        qk = _mm(q_t, tl.trans(k), UPCAST)\n        if POS_SCALE and not PARTIAL"),
    ("    q = _load_tile(Q_DESC, Q + b64 * stride_qb + h64 * stride_qh, b, h, m0, offs_m, stride_qm,\n"
     "                   offs_d, N, not EVEN, TMA)\n",
     "    Q_base = Q + b64 * stride_qb + h64 * stride_qh\n    q = 0\n"),
]
CALL_TAIL = "                                   b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx,\n                                   N, qk_scale,"
CALL_TAIL_NEW = ("                                   b, h, stride_kn, stride_vn, offs_m, offs_n, offs_d, bitidx,\n"
                 "                                   N, Q_DESC, Q_base, m0, stride_qm, qk_scale,")
SIG_TAIL = "               Q_desc, Q_base, m0, stride_qm,\n               qk_scale,"


def variant():
    src = open(K.__file__).read()
    for old, new in SUBS:
        assert src.count(old) == 1, old[:70]
        src = src.replace(old, new)
    assert src.count(CALL_TAIL) == 2
    src = src.replace(CALL_TAIL, CALL_TAIL_NEW)
    assert src.count(SIG_TAIL) == 1
    return module_from_source(src, "qload_kernels")


ORIG = K.fused_attn_fwd_kernel


def use(kernel, tma):
    K.fused_attn_fwd_kernel = kernel
    F.set_fused_config()
    if tma is not None:
        F.set_fused_config(tma=tma)


def main():
    small = os.environ.get("TRITON_INTERPRET") == "1"
    dev = torch.device("cpu" if small else "cuda")
    H, D = (2, 64) if small else (16, 64)
    BA.H = H
    mod = variant()
    rows = ((("bigbird", 64, 1, 512), ("bigbird", 16, 1, 512)) if small else
            (("bigbird", 64, 4, 4096), ("bigbird", 64, 1, 16384), ("fixed", 64, 4, 4096),
             ("bigbird", 128, 4, 4096)))
    for name, blk, B, N in rows:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, generator=g).to(torch.bfloat16)
                   for _ in range(3))
        fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
        label = f"{name}{blk} {B}x{N}"
        use(ORIG, None if small else True)
        ref, ref_lse = fwd()
        use(mod.fused_attn_fwd_kernel, None if small else True)
        out, lse = fwd()
        print(f"{label} qload: rel diff to package {rel(out, ref):.1e} "
              f"lse {(lse - ref_lse).abs().max().item():.1e}", flush=True)
        if small:
            continue
        from triton.testing import do_bench_cudagraph
        t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
        sdpa = torch.nn.functional.scaled_dot_product_attention
        res = {"dense SDPA": t(lambda: sdpa(q, k, v))}
        for rnd in range(2):
            for tag, kern in (("package", ORIG), ("qload", mod.fused_attn_fwd_kernel)):
                use(kern, True)
                res[tag] = min(res.get(tag, float("inf")), t(fwd))
        use(ORIG, None)
        dens = layout.float().mean().item()
        for kk, us in res.items():
            extra = "" if kk.startswith("dense") else \
                f"  ({dens * res['dense SDPA'] / us * 100:.1f}% of dense's rate)"
            print(f"{label} {kk}: {us:.1f} us{extra}", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
