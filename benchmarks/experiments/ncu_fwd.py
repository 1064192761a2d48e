"""Driver for Nsight Compute: the package's forward at one benchmark row, then dense SDPA, a
few calls each (profile with ncu's --kernel-name / --launch-skip). TMA as a CUDA-graph capture
takes it, unless TMA=0.

    ncu --clock-control none --kernel-name regex:fused_attn_fwd_kernel --launch-skip 2 \
        --launch-count 1 --set full -o fwd python3 benchmarks/experiments/ncu_fwd.py
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402

NAME, BLK, B, N = os.environ.get("ROW", "bigbird 64 4 4096").split()
BLK, B, N, H, D = int(BLK), int(B), int(N), 16, 64
BA.H = H
layout = BA.make_layout(NAME, BLK, N)[0]
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
F.set_fused_config(tma=os.environ.get("TMA", "1") == "1")
for _ in range(4):
    F._forward_impl(q, k, v, layout, None, BLK, None, False)
for _ in range(4):
    torch.nn.functional.scaled_dot_product_attention(q, k, v)
torch.cuda.synchronize()
print("done")
