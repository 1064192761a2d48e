"""Experiment: the forward with split rows merged inside the kernel (the last item of a row
to finish merges it), against the rows' items and dense SDPA.

`exp_merge_h200.log` timed the merge launch this replaces: 3-7 us of the forward on split
rows (BigBird 64 at 16384 95 -> 92 us without it, BigBird 16 at 16384 114 -> 107). Here, on
the package with the in-kernel merge:

1. correctness under real concurrency: every BigBird row with the package's items and with
   items of 4 tiles (many pieces a row, so arrivals race), against the same call with no
   split row (``split_min`` huge), eagerly and from 20 CUDA-graph replays each (the
   counters must be zero at every launch);
2. GPU time (CUDA-graph replays, TMA) with the package's item rule and with items of at
   most 1.2 S tiles, beside dense SDPA.

    PYTHONPATH=. python3 benchmarks/experiments/exp_merge2.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402
from benchmarks.experiments.harness import rel  # noqa: E402

PACKAGE = F._items_per_row
RULES = {
    "round(L/S)": PACKAGE,
    "ceil(L/1.2S)": lambda lens, S: torch.clamp(-(-lens * 5 // (6 * S)), min=1),
}
ROWS = (("bigbird", 64, 4, 4096), ("bigbird", 64, 1, 16384), ("bigbird", 32, 4, 4096),
        ("bigbird", 32, 1, 16384), ("bigbird", 16, 4, 4096), ("bigbird", 16, 1, 16384),
        ("bigbird", 128, 4, 4096), ("bigbird", 128, 1, 16384))


def reset(rule=PACKAGE, split_min=None, chunk=None):
    F._items_per_row = rule
    F.set_fused_config()
    F.set_fused_config(tma=True)
    if split_min is not None:
        F.set_fused_config(split_min=split_min)
    F._split_chunk = (lambda total, device: chunk) if chunk else ORIG_CHUNK
    F.clear_lut_cache()


ORIG_CHUNK = F._split_chunk


def main():
    from triton.testing import do_bench_cudagraph
    BA.H = H = 16
    t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    dev = torch.device("cuda")
    for name, blk, B, N in ROWS:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, 64, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
        label = f"{name}{blk} {B}x{N}"
        reset(split_min=10 ** 6)
        ref, ref_lse = (x.clone() for x in fwd())
        for how, kw in (("package items", {}), ("items of 4 tiles", {"chunk": 4})):
            reset(**kw)
            out, lse = fwd()
            n_split = F._get_lut(layout, blk, 64, 64, N, False, dev, "row", batch=B).n_split
            worst, worst_lse = rel(out, ref), (lse - ref_lse).abs().max().item()
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fwd()
                with torch.cuda.graph(graph, stream=s):
                    g_out, g_lse = fwd()
            torch.cuda.current_stream().wait_stream(s)
            for _ in range(20):
                graph.replay()
                torch.cuda.synchronize()
                worst = max(worst, rel(g_out, ref))
                worst_lse = max(worst_lse, (g_lse - ref_lse).abs().max().item())
            ok = worst < 1e-2 and worst_lse < 1e-3
            print(f"{label} {how}: {n_split} split rows, against no split: max rel err "
                  f"{worst:.1e}, lse {worst_lse:.1e} (eager + 20 replays) "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
        dense = t(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        dens = layout.float().mean().item()
        for rnd in range(2):
            for rule_name, rule in RULES.items():
                reset(rule)
                fwd()
                lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row", batch=B)
                us = t(fwd)
                print(f"{label} round {rnd} {rule_name:13s} items {lut.n_work:5d}, split rows "
                      f"{lut.n_split:3d}: fwd {us:6.1f} us ({dens * dense / us * 100:.1f}% of "
                      f"dense's {dense:.1f})", flush=True)
    reset()
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
