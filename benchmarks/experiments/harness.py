"""What the forward experiments of 2026-11-29 share: check every variant against the
package's forward, then time the ones that match, beside the package and dense SDPA, from
CUDA-graph replays in one run (exp_persist, exp_multi, exp_ahead); load a variant of the
package's kernel module from edited source, and compare two outputs (exp_fastexp,
exp_fwd_issue, exp_first)."""
import importlib.util
import os
import sys

import torch

from sparse_attn.ops import fused as F


def check_and_time(label, variants, q, k, v, layout, block, small):
    """``variants``: {name: fn() -> (out, lse)}. Prints each variant's max relative error
    against the package's forward (a failure to run is printed, not raised), and, on a GPU
    (``small`` false), the GPU time of the package, of dense SDPA and of every variant that
    matched (errors under 1e-2 and 1e-3 for the LSE)."""
    ref, ref_lse = F._forward_impl(q, k, v, layout, None, block, None, False)
    ok = {}
    for name, fn in variants.items():
        try:
            o, lse = fn()
        except Exception as e:  # noqa: BLE001 (record and go on)
            print(f"{label} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        err = ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        lerr = (lse - ref_lse).abs().max().item()
        if err < 1e-2 and lerr < 1e-3:
            ok[name] = fn
        print(f"{label} {name}: max rel err {err:.2e} lse err {lerr:.2e}", flush=True)
    if small:
        return
    from triton.testing import do_bench_cudagraph

    def t(fn):
        return do_bench_cudagraph(fn, rep=100, return_mode="median")

    base = lambda: F._forward_impl(q, k, v, layout, None, block, None, False)  # noqa: E731
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    res = {"dense SDPA": t(dense), "package": t(base)}
    for name, fn in ok.items():
        res[name] = t(fn)
    res["package (again)"] = t(base)
    res["dense SDPA (again)"] = t(dense)
    for name, ms in res.items():
        print(f"{label}{block} fwd {name}: {ms * 1000:.1f} us", flush=True)


def edited_kernels(edits, name):
    """The package's kernel module with each (old, new) text edit of ``edits`` applied once
    (the forward kernel and its helpers come first in the file), imported as a module named
    after ``name`` (exp_ablate, exp_store, exp_store2)."""
    from sparse_attn.ops.kernels import fused_attention as K
    src = open(K.__file__).read()
    for old, new in edits:
        assert old in src, (name, old[:60])
        src = src.replace(old, new, 1)
    return module_from_source(src, "".join(c if c.isalnum() else "_" for c in name))


def module_from_source(src, name):
    """Import ``src`` (an edited copy of a kernel module) as module ``name``, from /tmp (Triton
    reads a kernel's source from its file)."""
    path = f"/tmp/{name}.py"
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def rel(a, b):
    """max |a - b| / max |b|, in float32."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
