"""Experiment: forward tile configs with the TMA kernels (the sweep of NOTES_fused.md was made
with pointer loads): GPU time of the forward (CUDA graph replays) per config, on the two rows
nearest a target (BigBird 64 at 4096 x4: T3; Fixed 128 at 4096 x4: T1 against Flex's 0.272 ms).

    PYTHONPATH=. python3 benchmarks/experiments/exp_fwd_tiles_tma.py [more]
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import scripts.bench_attention as BA  # noqa: E402
from sparse_attn.ops.fused import fused_block_sparse_attention, set_fused_config  # noqa: E402

ROWS = {(4, 4096, "bigbird", 64): [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4),
                                   (64, 64, 8, 3), (64, 32, 4, 3)],
        (4, 4096, "fixed", 128): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4),
                                  (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]}
# second call ("more"): the block-128 rows and BigBird 64 at 16384 with the winners of the first
_B128 = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)]
MORE = {(4, 4096, "bigbird", 128): _B128, (1, 16384, "bigbird", 128): _B128,
        (1, 16384, "fixed", 128): _B128,
        (1, 16384, "bigbird", 64): [(64, 64, 4, 3), (64, 64, 4, 2)],
        (4, 4096, "fixed", 64): [(64, 64, 4, 3), (64, 64, 4, 2)]}


def main():
    H, D = 16, 64
    BA.H = H
    dev = torch.device("cuda")
    for (B, N, name, blk), cfgs in (MORE if sys.argv[1:] == ["more"] else ROWS).items():
        layout = BA.make_layout(name, blk, N)[0].to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        ref = None
        for cfg in cfgs + cfgs[:1]:
            set_fused_config()
            set_fused_config(D, blk, fwd=cfg)
            try:
                out = fused_block_sparse_attention(q, k, v, layout, blk)
                if ref is None:
                    ref = out
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                ms = BA.bench_graph(lambda: fused_block_sparse_attention(q, k, v, layout, blk))
                print(f"{N}x{B} {name} {blk} fwd {cfg}: {ms * 1e3:.1f} us (rel diff {err:.1e})",
                      flush=True)
            except Exception as e:  # noqa: BLE001 (record and go on)
                print(f"{N}x{B} {name} {blk} fwd {cfg}: FAILED {type(e).__name__}: {e!s:.200}")
    set_fused_config()
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
