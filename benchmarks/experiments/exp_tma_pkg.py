"""Experiment: the package's kernels with TMA loads per kernel (set_fused_config(tma=...)):
none, the forward only, forward + dq, all three, forward + dk/dv. GPU time (CUDA graph
replays) of the forward and of forward+backward, beside dense SDPA in the same run; every
variant's output and gradients are first checked bit-identical to the pointer path's.

    PYTHONPATH=. python3 benchmarks/experiments/exp_tma_pkg.py [variant ...] [--rows N]

(variants: names of VARIANTS, default all; --rows N: the first N rows of ROWS)
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import scripts.bench_attention as BA  # noqa: E402
from sparse_attn.ops.fused import fused_block_sparse_attention, set_fused_config  # noqa: E402

VARIANTS = {"pointers": False, "fwd": ("fwd",), "fwd+dq": ("fwd", "dq"),
            "fwd+dkdv": ("fwd", "dkdv"), "all": True}
ROWS = [(4, 4096, "bigbird", 64), (1, 16384, "bigbird", 64), (4, 4096, "fixed", 64),
        (4, 4096, "bigbird", 16), (4, 4096, "bigbird", 128), (1, 16384, "fixed", 128),
        (4, 4096, "fixed", 32)]


def main():
    argv = sys.argv[1:]
    n_rows = len(ROWS)
    if "--rows" in argv:
        i = argv.index("--rows")
        n_rows = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    variants = {n: VARIANTS[n] for n in argv} if argv else VARIANTS
    H, D = 16, 64
    BA.H = H
    dev = torch.device("cuda")
    for B, N, name, blk in ROWS[:n_rows]:
        layout = BA.make_layout(name, blk, N)[0].to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)

        def fwd():
            return fused_block_sparse_attention(q, k, v, layout, blk)

        def fb():
            out = fused_block_sparse_attention(q, k, v, layout, blk)
            return torch.autograd.grad(out, (q, k, v), do)

        ref = None
        res = {}
        for vname, tma in variants.items():
            set_fused_config(tma=tma)
            got = [fwd().detach(), *fb()]
            if ref is None:
                ref = got
            same = all(torch.equal(a, b) for a, b in zip(got, ref))
            res[vname] = (BA.bench_graph(fwd), BA.bench_graph(fb), same)
        set_fused_config()
        dense_f = BA.bench_graph(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))

        def dense_fb():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return torch.autograd.grad(out, (q, k, v), do)
        dense_b = BA.bench_graph(dense_fb)
        print(f"{N}x{B} {name} {blk}: dense SDPA fwd {dense_f * 1e3:.1f} us, fwd+bwd "
              f"{dense_b * 1e3:.1f} us", flush=True)
        for vname, (f, b, same) in res.items():
            print(f"{N}x{B} {name} {blk}: {vname:9} fwd {f * 1e3:7.1f} us  fwd+bwd "
                  f"{b * 1e3:7.1f} us  identical to pointers: {same}", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
