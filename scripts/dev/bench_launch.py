"""Host cost of one Triton kernel launch, by kind and number of arguments.

At batch 1 the fused attention's eager time is host time (e.g. BigBird-64 at 16384 x 1:
1.04 ms eager vs 0.46 ms of GPU time per forward + backward). This times launches of an
empty Triton kernel with 0 to 24 tensor (pointer) arguments and with as many int arguments,
plus a few torch ops for scale, so that we know what a launch costs on this host and
whether pointer arguments (each one read through ``data_ptr()`` and checked with
``cuPointerGetAttribute`` by Triton's launcher) are what makes it expensive.

    python scripts/dev/bench_launch.py            # GPU; prints a table
    TRITON_INTERPRET=1 python scripts/dev/bench_launch.py --iters 50   # CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _empty(X, n, P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12, P13, P14, P15,
           P16, P17, P18, P19, P20, P21, P22, P23, BLOCK: tl.constexpr):
    """Writes one value so the launch is not optimised away; the rest is only passed."""
    if tl.program_id(0) == 0:
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n)


def host_us(fn, iters):
    for _ in range(max(5, iters // 10)):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return host


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("needs CUDA (or TRITON_INTERPRET=1 for a smoke test)")
    x = torch.empty(16, device=dev)
    ptrs = [torch.empty(16, device=dev) for _ in range(24)]
    rows = []
    for n in (0, 4, 8, 16, 24):
        with_ptrs = ptrs[:n] + [None] * (24 - n)  # None: a constexpr, nothing to read
        with_ints = [16 * (i + 2) for i in range(n)] + [None] * (24 - n)
        for kind, extra in (("tensor", with_ptrs), ("int", with_ints)):
            us = host_us(lambda: _empty[(1,)](x, 16, *extra, BLOCK=16), args.iters)
            rows.append((f"triton launch, {n:2d} {kind} args", us))
    y = torch.ones(1 << 16, device=dev)
    rows.append(("torch.empty((1, 12, 4096, 64))",
                 host_us(lambda: torch.empty((1, 12, 4096, 64), device=dev), args.iters)))
    rows.append(("y.add_(1) (one small kernel)", host_us(lambda: y.add_(1), args.iters)))
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    print(f"# host time per call, {name}; torch {torch.__version__}, triton "
          f"{triton.__version__}; mean of {args.iters} calls")
    print(f"{'call':<40}{'us':>10}")
    for label, us in rows:
        print(f"{label:<40}{us:>10.1f}")


if __name__ == "__main__":
    main()
