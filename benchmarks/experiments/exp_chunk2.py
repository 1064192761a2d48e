"""Experiment: the work-item length S again, for the shipped forward (TMA, 64x64 tiles, first
tile in the record), BigBird 64 only. At 4096 x4 the rule gives S = 45, so the 64 global
rows (64 tiles each) stay whole and, at ~1.3 us of slot time a tile, last about as long as
the whole kernel; cutting them adds a combine launch and workspace traffic. Times the
forward from CUDA-graph replays at several forced S beside dense SDPA. Not part of the
package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_chunk2.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402

AUTO = F._split_chunk


def use_chunk(S):
    F._split_chunk = AUTO if S is None else (lambda total, device: S)
    F.clear_lut_cache()
    F.set_fused_config()
    F.set_fused_config(tma=True)


def main():
    from triton.testing import do_bench_cudagraph
    BA.H = H = 16
    t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    for B, N in ((4, 4096), (1, 16384)):
        layout = BA.make_layout("bigbird", 64, N)[0]
        q, k, v = (torch.randn(B, H, N, 64, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        fwd = lambda: F._forward_impl(q, k, v, layout, None, 64, None, False)  # noqa
        dense = t(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        use_chunk(None)
        ref, _ = fwd()
        dens = layout.float().mean().item()
        for S in (None, 16, 24, 32, 48, 64, 128, None):
            use_chunk(S)
            out, _ = fwd()
            err = (out.float() - ref.float()).abs().max().item()
            us = t(fwd)
            print(f"bigbird64 {B}x{N} S={S or 'rule'}: {us:.1f} us ({dens * dense / us * 100:.1f}% "
                  f"of dense's {dense:.1f} us; max diff to the rule {err:.1e})", flush=True)
    use_chunk(None)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
