"""Experiment (prepared 2026-11-30, not yet run): how many work items a long LUT row gets.

`exp_chunk2_h200.log`: at BigBird 64, 4096 x4 the rule (S = 46; round(L / S) items, so up to
1.5 S tiles each) leaves the 64-tile global rows whole, and the forward takes 96.1 us;
forcing S = 32 (two items of 32) gives 92.8 us (59.8% of dense's rate against 57.7%). At
16384 the rule's items (S = 47) are already the best of the sweep. Candidate rules,
swapped in through ``fused._items_per_row`` for every table (forward rows, dq rows, dk/dv
columns): the package's round(L / S); ceil(L / (1.2 S)) (items of at most 1.2 S); ceil(L / S).
On the CPU box with 64x64 tiles, the second changes only the global rows of BigBird 32 and 64
(more items at 4096 x4, BigBird 32 fewer at 16384). Times forward and forward+backward from
CUDA-graph replays (TMA) for the BigBird rows (the Fixed rows' tables do not change), beside
dense SDPA. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_chunk3.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402

PACKAGE = F._items_per_row
RULES = {
    "round(L/S)": PACKAGE,
    "ceil(L/1.2S)": lambda lens, S: torch.clamp(-(-lens * 5 // (6 * S)), min=1),
    "ceil(L/S)": lambda lens, S: torch.clamp(-(-lens // S), min=1),
}


def use(rule):
    F._items_per_row = rule
    F.clear_lut_cache()
    F.set_fused_config()
    F.set_fused_config(tma=True)


def main():
    from triton.testing import do_bench_cudagraph
    BA.H = H = 16
    t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    for blk in (16, 32, 64, 128):
        for B, N in ((4, 4096), (1, 16384)):
            layout = BA.make_layout("bigbird", blk, N)[0]
            q, k, v, do = (torch.randn(B, H, N, 64, device="cuda", dtype=torch.bfloat16)
                           for _ in range(4))
            fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
            out, lse = fwd()
            bwd = lambda: F._backward_impl(do, q, k, v, out, lse, layout, None, blk,  # noqa
                                           None, False)
            fb = lambda: (fwd(), bwd())  # noqa
            sdpa = torch.nn.functional.scaled_dot_product_attention
            dense = t(lambda: sdpa(q, k, v))
            dens = layout.float().mean().item()
            for name, rule in RULES.items():
                use(rule)
                lut = F._get_lut(layout, blk, 64, 64, N, False, q.device, "row", batch=B)
                tf, tfb = t(fwd), t(fb)
                print(f"bigbird{blk} {B}x{N} {name:13s} items {lut.n_work:5d}: fwd {tf:7.1f} us "
                      f"({dens * dense / tf * 100:.1f}% of dense's {dense:.1f}), fwd+bwd "
                      f"{tfb:7.1f} us", flush=True)
    use(PACKAGE)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
