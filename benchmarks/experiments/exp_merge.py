"""Experiment: what the forward's merge launch costs where long rows are split.

`exp_chunk3_h200.log` and `exp_ablate_h200.log`: at BigBird 64, 4096 x4 the 64-tile global
rows are the forward's critical path (64 x ~1.4 us), and cutting them into two items takes
the forward from 95-97 to 92-95 us even though the halves then need the merge kernel; at
BigBird 32, 4096 x4 the same cut costs 5%. Here each BigBird row is timed (CUDA-graph
replays, TMA) with the package's item rule and with items of at most 1.2 S tiles, each with
and without the merge launch (without it the split rows' outputs are wrong: timing only),
to see what a merge done inside the forward kernel (the last item of a row to finish
merges) could save.

    PYTHONPATH=. python3 benchmarks/experiments/exp_merge.py
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


def main():
    from triton.testing import do_bench_cudagraph
    BA.H = H = 16
    t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    dev = torch.device("cuda")
    for name, blk, B, N in (("bigbird", 64, 4, 4096), ("bigbird", 64, 1, 16384),
                            ("bigbird", 32, 4, 4096), ("bigbird", 16, 1, 16384),
                            ("bigbird", 128, 1, 16384), ("bigbird", 16, 4, 4096)):
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, 64, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
        dense = t(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        dens = layout.float().mean().item()
        label = f"{name}{blk} {B}x{N}"
        for rnd in range(2):
            for rule_name, rule in RULES.items():
                F._items_per_row = rule
                F.clear_lut_cache()
                F.set_fused_config()
                F.set_fused_config(tma=True)
                fwd()
                p = F.plan("op", q, k, v, layout, blk, None, False, None)
                lut, main, combine, ints, combine_ints = p.fwd
                with_merge = t(fwd)
                p.fwd = (lut, main, None, ints, combine_ints)
                without = t(fwd)
                print(f"{label} round {rnd} {rule_name:13s} items {lut.n_work:5d}, split rows "
                      f"{lut.n_split:3d}: fwd {with_merge:6.1f} us "
                      f"({dens * dense / with_merge * 100:.1f}%"
                      f" of dense's {dense:.1f}), without the merge launch {without:6.1f} us "
                      f"({dens * dense / without * 100:.1f}%)", flush=True)
    F._items_per_row = PACKAGE
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
