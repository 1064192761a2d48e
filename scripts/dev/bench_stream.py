"""The streamed forward (``TileConfig.stream``) against the per-work-item forward, GPU time
(CUDA-graph replays), on rows with short LUT rows where a program's fixed cost counts
(issue 21 target 5: head_dim 128 at BigBird 64). Each variant's output is checked against
the default path's first.

    PYTHONPATH=. python3 scripts/dev/bench_stream.py --out out/stream.json
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_attention import bench_graph, make_layout, relerr  # noqa: E402

from sparse_attn.ops.fused import (TileConfig, fused_block_sparse_attention,  # noqa: E402
                                   kernel_tiles, set_fused_config)

ROWS = [("bigbird", 64, 16384, 1, 128), ("bigbird", 64, 16384, 1, 64),
        ("tutorial", 16, 16384, 1, 64), ("bigbird", 64, 4096, 4, 128)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out/stream.json")
    p.add_argument("--per-sm", type=int, nargs="*", default=[1, 2, 3, 4])
    p.add_argument("--stages", type=int, nargs="*", default=[2, 3])
    args = p.parse_args(argv)
    H = 16
    res = []
    for name, blk, N, B, D in ROWS:
        L = make_layout(name, blk, N)[0][:H].cuda().bool()
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        set_fused_config()
        base = kernel_tiles(D, blk).fwd
        ref = fused_block_sparse_attention(q, k, v, L, blk).detach()
        dense_f = bench_graph(lambda: F.scaled_dot_product_attention(q, k, v))
        line = dict(row=f"{name}{blk} {N}x{B} d{D}", dense_fwd=dense_f, base=str(base), v={})
        variants = [("default", base)]
        for st in args.stages:
            for ps in args.per_sm:
                variants.append((f"stream{ps} s{st}", TileConfig(**{**base.__dict__,
                                                                    "stream": ps,
                                                                    "num_stages": st})))
        for vname, cfg in variants:
            set_fused_config()
            set_fused_config(D, None, fwd=cfg)
            try:
                out = fused_block_sparse_attention(q, k, v, L, blk)
                err = relerr(out, ref)
                f = bench_graph(lambda: fused_block_sparse_attention(q, k, v, L, blk))
                fb = bench_graph(lambda: fused_block_sparse_attention(q, k, v, L, blk)
                                 .backward(do), grad_to_none=[q, k, v])
                line["v"][vname] = dict(err=err, fwd=f, fb=fb)
                print(f"{line['row']:>26} {vname:>12}: fwd {f:.4f} ms  f+b {fb:.4f} ms  "
                      f"err {err:.1e}  (dense fwd {dense_f:.3f})", flush=True)
            except Exception as e:
                line["v"][vname] = f"{type(e).__name__}: {str(e)[:300]}"
                print(line["row"], vname, line["v"][vname], flush=True)
        set_fused_config()
        res.append(line)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        json.dump(dict(device=torch.cuda.get_device_name(), rows=res), open(args.out, "w"),
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
