"""Experiment: cap registers per thread (Triton's maxnreg option) so that more programs fit on
an SM, for the package's forward and backward kernels. BigBird 64 and Fixed 64, graph-timed."""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402

_meta = F._Plan._meta
CAP = {"value": None}


def _capped_meta(self, lut, tiles):
    m = _meta(self, lut, tiles)
    if CAP["value"]:
        m["maxnreg"] = CAP["value"]
    return m


def main():
    from triton.testing import do_bench_cudagraph
    F._Plan._meta = _capped_meta
    H, D, blk = 16, 64, 64
    BA.H = H
    dev = torch.device("cuda")
    for name in ("bigbird", "fixed"):
        for B, N in ((4, 4096), (1, 16384)):
            layout = BA.make_layout(name, blk, N)[0]
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16,
                                       generator=g) for _ in range(4))
            fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
            CAP["value"] = None
            F.set_fused_config()
            out, lse = fwd()
            bwd = lambda: F._backward_impl(do, q, k, v, out, lse, layout, None, blk,  # noqa
                                           None, False)
            ref = bwd()
            for cap in (None, 168, 128, 96, 80, None):
                CAP["value"] = cap
                F.set_fused_config()  # drop plans
                try:
                    o2, _ = fwd()
                    got = bwd()
                    err = max((a.float() - r.float()).abs().max().item()
                              for a, r in zip((o2,) + tuple(got), (out,) + tuple(ref)))
                    tf = do_bench_cudagraph(fwd, rep=100, return_mode="median") * 1000
                    tb = do_bench_cudagraph(bwd, rep=100, return_mode="median") * 1000
                    print(f"{name} {B}x{N} maxnreg {cap}: fwd {tf:.1f} us, bwd {tb:.1f} us "
                          f"(max abs diff {err:.1e})", flush=True)
                except Exception as e:  # noqa
                    print(f"{name} {B}x{N} maxnreg {cap}: FAILED {type(e).__name__}: "
                          f"{str(e)[:160]}", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
