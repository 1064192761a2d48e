"""Check of the shipped register cap: backward GPU time with the package's head_dim-64 configs
(dq and dk/dv capped at 168 registers) against the same tiles uncapped (CUDA graphs)."""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402


def main():
    from triton.testing import do_bench_cudagraph
    H, D = 16, 64
    BA.H = H
    dev = torch.device("cuda")
    for name in ("bigbird", "fixed"):
        for blk in (64, 128):
            for B, N in ((4, 4096), (1, 16384)):
                layout = BA.make_layout(name, blk, N)[0]
                g = torch.Generator(device=dev).manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16,
                                           generator=g) for _ in range(4))
                res = {}
                for label in ("shipped (cap 168)", "uncapped"):
                    F.set_fused_config()
                    if label == "uncapped":
                        F.set_fused_config(64, blk, dq=(64, 64, 4, 3), dkdv=(64, 64, 4, 3))
                    out, lse = F._forward_impl(q, k, v, layout, None, blk, None, False)
                    fn = lambda: F._backward_impl(do, q, k, v, out, lse, layout, None,  # noqa
                                                  blk, None, False)
                    got = fn()
                    res[label] = (do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000,
                                  got)
                F.set_fused_config()
                diff = max((a.float() - b.float()).abs().max().item()
                           for a, b in zip(res["shipped (cap 168)"][1], res["uncapped"][1]))
                a, b = res["shipped (cap 168)"][0], res["uncapped"][0]
                print(f"{name} {blk} {B}x{N}: backward {a:.1f} us capped vs {b:.1f} us "
                      f"uncapped ({(a / b - 1) * 100:+.1f}%), max abs diff {diff:.1e}",
                      flush=True)


if __name__ == "__main__":
    main()
