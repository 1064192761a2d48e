"""Experiment: programs per SM for the forward at block 64. The 64x64 forward takes ~108
registers a thread (4 warps), so 4 programs fit an SM by registers and 5 by shared memory;
a cap of 96 registers lets 5 in (more programs in flight to hide each one's load latency),
if it does not spill. Times the package's forward with register caps and stage counts, and
the single-loop forward of exp_chunk.py (pointer loads and TMA) with the same caps, on the
two BigBird 64 rows and Fixed 64 at 4096 x4. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_occupancy.py
"""
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels import fused_attention as K  # noqa: E402
import exp_chunk as E  # noqa: E402


def regs_of(fn):
    """(registers, spills) of the most recently compiled binaries of a Triton kernel."""
    seen = []
    for cache in fn.device_caches.values():
        for ck in cache[0].values():
            try:
                ck._init_handles()
                seen.append((ck.n_regs, ck.n_spills))
            except Exception:  # noqa: BLE001 (Triton internals; report nothing)
                pass
    return seen[-1] if seen else None


def main():
    import scripts.bench_attention as BA
    from triton.testing import do_bench_cudagraph
    dev = torch.device("cuda")
    H, D, blk = 16, 64, 64
    BA.H = H
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__,
          time.strftime("%Y-%m-%dT%H:%M:%S"), flush=True)

    def g(fn):
        return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

    for B, N, name in ((4, 4096, "bigbird"), (1, 16384, "bigbird"), (4, 4096, "fixed")):
        layout = BA.make_layout(name, blk, N)[0].to(dev).bool().contiguous()
        gen = torch.Generator(device=dev).manual_seed(N + blk)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        tag = f"{B}x{N} {name}{blk}"
        F.set_fused_config()
        ref, _ = F._forward_impl(q, k, v, layout, None, blk, None, False)
        lut = F._get_lut(layout, blk, 64, 64, N, False, dev, "row", batch=B)
        dens = lut.ntot.sum().item() * 64 * 64 / (H * N * N)
        td = g(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        print(f"{tag}: tile density {dens:.4f}, dense fwd {td:.1f} us, T3 needs <= "
              f"{dens * td / 0.6:.1f} us", flush=True)
        variants = {}
        for cfg in ((64, 64, 4, 3), (64, 64, 4, 3, False, 96), (64, 64, 4, 3, False, 80),
                    (64, 64, 4, 2), (64, 64, 4, 2, False, 96), (64, 64, 4, 4)):
            def pk(cfg=cfg):
                F.set_fused_config(64, None, fwd=cfg)
                return F._forward_impl(q, k, v, layout, None, blk, None, False)
            variants[f"package {cfg}"] = (pk, K.fused_attn_fwd_kernel)
        if name == "bigbird":
            for tma in (False, True):
                for mr in (None, 96, 80):
                    def ol(tma=tma, mr=mr):
                        return E.one_loop_forward(q, k, v, lut, blk, tma, 3, mr)
                    variants[f"one-loop {'tma' if tma else 'ptr'} s3 maxnreg {mr}"] = \
                        (ol, E.one_loop_fwd)
        for vname, (fn, kern) in variants.items():
            try:
                o, _ = fn()
                err = ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = g(fn)
            except Exception as e:  # noqa: BLE001 (record and go on)
                print(f"{tag} {vname}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"{tag} {vname}: fwd {t:.1f} us ({dens * td / t:.0%}), regs/spills "
                  f"{regs_of(kern)}, max rel diff {err:.1e}", flush=True)
        F.set_fused_config()
    print("done", time.strftime("%H:%M:%S"), flush=True)


if __name__ == "__main__":
    main()
