"""Experiment: Triton's automatic warp specialization (tl.range(..., warp_specialize=True)) on
the inner loops of the package's kernels. Builds variant copies of the kernel module in /tmp,
swaps them in, checks them against the package's kernels and times both (CUDA graphs).

exp_ws_h100.log ran before the kernels had TMA (pointer loads). Since then the script forces
TMA at every launch (set_fused_config(tma=True)), the package and the variants alike: Triton
specializes warps around TMA loads (compiled for sm_90 with Triton 3.9, the forward's loop
gets a producer and a consumer partition with TMA, none with pointers). The forward is also
timed at 3 and 4 stages (a producer warp may want a deeper ring), WS and package alike.
dq and dk/dv fail that compiler pass in Triton 3.9; their lines then read FAILED."""
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels import fused_attention as K  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402

LOOP = "    for it in range(lo, hi):\n"
WS = "    for it in tl.range(lo, hi, warp_specialize=True):\n"
NAMES = ("fused_attn_fwd_kernel", "fused_attn_bwd_dq_kernel", "fused_attn_bwd_dkdv_kernel")
FWD_STAGES = (None, 3, 4)  # None: the shipped forward config (64, 64, 4 warps, 2 stages)


def variant(which):
    """The kernel module with warp specialization on the inner loops named in ``which``
    (0 forward, 1 dq, 2 dk/dv; the loops appear in that order in the file)."""
    src = open(K.__file__).read()
    parts = src.split(LOOP)
    assert len(parts) == 4, len(parts)
    out = parts[0]
    for i in range(3):
        out += (WS if i in which else LOOP) + parts[i + 1]
    path = f"/tmp/ws_kernels_{'_'.join(map(str, which))}.py"
    with open(path, "w") as f:
        f.write(out)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def use(mod):
    for n in NAMES:
        setattr(K, n, getattr(mod, n))
    F.set_fused_config(tma=True)  # drops the plans (they hold prepared launches)


def main():
    from triton.testing import do_bench_cudagraph
    H, D, blk = 16, 64, 64
    BA.H = H
    dev = torch.device("cuda")
    orig = {n: getattr(K, n) for n in NAMES}
    mods = {}
    for which in ((0,), (1,), (2,)):
        try:
            mods[which] = variant(which)
        except Exception as e:  # noqa
            print("build", which, "failed:", type(e).__name__, str(e)[:200], flush=True)
    for name in ("bigbird", "fixed"):
        for B, N in ((4, 4096), (1, 16384)):
            layout = BA.make_layout(name, blk, N)[0]
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16,
                                       generator=g) for _ in range(4))
            for n, f in orig.items():
                setattr(K, n, f)
            F.set_fused_config(tma=True)
            fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
            out, lse = fwd()
            bwd = lambda: F._backward_impl(do, q, k, v, out, lse, layout, None, blk,  # noqa
                                           None, False)
            ref = bwd()
            t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
            sdpa = torch.nn.functional.scaled_dot_product_attention
            res = {"dense SDPA fwd": t(lambda: sdpa(q, k, v)), "package fwd": t(fwd),
                   "package bwd": t(bwd)}
            for which, mod in mods.items():
                use(mod)
                try:
                    if which == (0,):
                        for stages in FWD_STAGES:  # the shipped forward tiles, more stages
                            if stages is not None:
                                F.set_fused_config(D, blk, fwd=(64, 64, 4, stages))
                            o2, _ = fwd()
                            err = (o2.float() - out.float()).abs().max().item()
                            res[f"ws fwd s{stages or 'shipped'} (err {err:.1e})"] = t(fwd)
                        F.set_fused_config()
                        F.set_fused_config(tma=True)
                    else:
                        got = bwd()
                        err = max((a.float() - r.float()).abs().max().item()
                                  for a, r in zip(got, ref))
                        res[f"ws {'dq' if which == (1,) else 'dkdv'} -> bwd (err {err:.1e})"] = \
                            t(bwd)
                except Exception as e:  # noqa
                    res[f"ws {which} FAILED {type(e).__name__}: {str(e)[:160]}"] = float("nan")
            for n, f in orig.items():
                setattr(K, n, f)
            for stages in FWD_STAGES[1:]:
                F.set_fused_config(D, blk, fwd=(64, 64, 4, stages))
                res[f"package fwd s{stages}"] = t(fwd)
            F.set_fused_config()
            F.set_fused_config(tma=True)
            res["package fwd (again)"] = t(fwd)
            for kk, us in res.items():
                print(f"{name} {B}x{N} {kk}: {us:.1f} us", flush=True)
    F.set_fused_config()
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
