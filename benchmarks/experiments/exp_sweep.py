"""Tile/warp sweep of the real kernels on BigBird 64 (and Fixed 64 as a check)."""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

H, D, blk = 16, 64, 64
BA.H = H
dev = torch.device("cuda")
SETS = {
    "fwd": [(64, 64, 4, 3), (64, 64, 2, 3), (64, 64, 2, 2), (64, 32, 4, 3), (64, 32, 2, 3),
            (32, 64, 2, 3), (32, 32, 2, 3)],
    "dq": [(64, 64, 4, 3), (64, 64, 2, 3), (64, 32, 4, 3), (64, 32, 2, 3), (32, 64, 2, 3)],
    "dkdv": [(64, 64, 4, 3), (64, 64, 2, 3), (32, 64, 4, 3), (32, 64, 2, 3), (64, 32, 2, 3),
             (64, 32, 4, 3)],
}
for name in sys.argv[1:] or ["bigbird"]:
    for B, N in ((4, 4096), (1, 16384)):
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                       for _ in range(4))
        F.set_fused_config()
        out0, lse0 = F._forward_impl(q, k, v, layout, None, blk, None, False)
        ref = F._backward_impl(do, q, k, v, out0, lse0, layout, None, blk, None, False)
        for kern, cfgs in SETS.items():
            for cfg in cfgs:
                F.set_fused_config()
                F.set_fused_config(64, 64, **{kern: cfg})
                try:
                    out, lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
                    if kern == "fwd":
                        err = ((out.float() - out0.float()).abs().max()).item()
                        fn = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
                    else:
                        got = F._backward_impl(do, q, k, v, out0, lse0, layout, None, blk, None,
                                               False)
                        err = max((a.float() - r.float()).abs().max().item()
                                  for a, r in zip(got, ref))
                        fn = lambda: F._backward_impl(do, q, k, v, out0, lse0, layout, None,  # noqa
                                                      blk, None, False)
                    us = do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000
                    print(f"{name} {B}x{N} {kern} {cfg}: {us:.1f} us (max abs diff {err:.1e})",
                          flush=True)
                except Exception as e:  # noqa
                    print(f"{name} {B}x{N} {kern} {cfg}: FAILED {type(e).__name__}: "
                          f"{str(e)[:150]}", flush=True)
        F.set_fused_config()
print("done", time.strftime("%H:%M:%S"))
