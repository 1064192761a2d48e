"""Run the fused kernels of one attention row, for Nsight Compute to read one launch of
each (issue 21, target 5: why head_dim 128 runs at 42% of dense's rate where head_dim 64
runs at 60%).

    ncu --clock-control none --profile-from-start off --kernel-name regex:fused_attn \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats \\
        python3 scripts/dev/ncu_fused.py --head-dim 128 --seq 16384 --layout bigbird --block 64 \\
        --no-time

(``STAGES=ncu`` of ``scripts/dev/gpu_check.sh`` runs it for head_dim 64 and 128.) Without
``ncu`` it prints the median forward and forward+backward times, so that the two runs can
be put side by side (``--no-time``: for ncu, a warm-up forward+backward, then one more inside
``cudaProfilerStart``/``Stop``: the first call's launches differ, e.g. a plan's first call
takes TMA).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_attention import make_layout  # noqa: E402

from sparse_attn.ops.fused import fused_block_sparse_attention  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layout", default="bigbird",
                   choices=("bigbird", "fixed", "tutorial", "variable", "bslongformer"))
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--no-time", action="store_true",
                   help="one forward+backward and no timing (under ncu)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: scripts/dev/ncu_fused.py needs a CUDA device", file=sys.stderr)
        return 2
    layout, _ = make_layout(args.layout, args.block, args.seq)
    layout = layout[:args.heads].cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        out = fused_block_sparse_attention(q, k, v, layout, args.block)
        out.backward(do)

    step()
    torch.cuda.synchronize()
    if args.no_time:  # ncu --profile-from-start off reads only this step's launches
        torch.cuda.profiler.start()
        step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    import triton.testing

    fwd = triton.testing.do_bench(
        lambda: fused_block_sparse_attention(q, k, v, layout, args.block), warmup=25, rep=100)
    both = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v])
    density = layout.float().mean().item()
    print(f"head_dim {args.head_dim} {args.layout} {args.block} seq {args.seq} x{args.batch} "
          f"heads {args.heads}: density {density:.1%}, fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
