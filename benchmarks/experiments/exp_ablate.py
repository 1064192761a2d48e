"""Experiment: where a short work item's time goes, and three cheap orderings.

The forward at BigBird 64 (4096 x4) spends about 40% of its program-slot time outside the
tile work (a fit of time = a + b x tiles, `NOTES_fused.md`). Variants of the package's
forward kernel (a copy in /tmp with text edits) and of its work list, timed from CUDA-graph
replays (TMA) in one run beside the package and dense SDPA:

- timing only (their outputs are not the package's; printed, not checked):
  ``empty`` (no tile: record, Q load, store only), ``double`` (every item walks its tiles
  twice, one pipelined loop: the marginal cost of a tile with a warm pipeline),
  ``nostore`` (no O/LSE store);
- checked against the package, candidates to ship: ``bmajor`` (program id -> (batch, item)
  batch-major: the items of one batch run together), ``lpt`` (all items longest first, not
  only the long ones: a shorter tail), stages 1 and 3 (the package runs 2), items of at
  most 1.2 S tiles (``exp_chunk3_h200.log``: BigBird 64 at 4096 x4 97.0 -> 95.1 us), and
  two of these together.

    PYTHONPATH=. python3 benchmarks/experiments/exp_ablate.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels import fused_attention as K  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402
from benchmarks.experiments.harness import edited_kernels, rel  # noqa: E402

STORE = ("    else:\n        _fwd_store(O, O_DESC, LSE, acc, l_i, m_i, b, h, m0, offs_m, offs_d, "
         "stride_ob,\n                   stride_oh, stride_om, H, N, EVEN, TMA)\n")
EDITS = {
    "empty": [("    first0 = _first_tile(WORK, w, n_work)\n",
               "    first0 = _first_tile(WORK, w, n_work)\n    hi = lo\n")],
    "double": [("    for it in range(lo, hi):\n",
                "    for it2 in range(lo, 2 * hi - lo):\n"
                "        it = lo + (it2 - lo) % (hi - lo)\n")],
    "nostore": [(STORE, "    elif n_work < 0:\n" + STORE.split("\n", 1)[1])],
    "bmajor": [("    b = pid % B\n    w = pid // B\n",
                "    b = pid // n_work\n    w = pid % n_work\n")],
}


def variant(name):
    return edited_kernels(EDITS[name], f"ablate_{name}_kernels")


ORIG_KERNEL = K.fused_attn_fwd_kernel
ORIG_LUT = F._make_lut
ORIG_ITEMS = F._items_per_row


def items_ceil12(lens, S):
    """Items of at most 1.2 S tiles (the package: round(L / S), up to 1.5 S)."""
    return torch.clamp(-(-lens * 5 // (6 * S)), min=1)


def lpt_lut(*args, **kwargs):
    """The package's LUT with every work item sorted longest first (stable)."""
    lut = ORIG_LUT(*args, **kwargs)
    ln = (lut.work[2] - lut.work[1]).long()
    order = torch.sort(ln, descending=True, stable=True).indices
    lut.work = lut.work[:, order].contiguous()
    return lut


def use(kernel=None, lut=None, stages=None, items=None):
    K.fused_attn_fwd_kernel = kernel or ORIG_KERNEL
    F._make_lut = lut or ORIG_LUT
    F._items_per_row = items or ORIG_ITEMS
    F.set_fused_config()
    F.clear_lut_cache()
    if stages is not None:
        F.set_fused_config(64, 64, fwd=(64, 64, 4, stages))
        F.set_fused_config(64, 128, fwd=(64, 64, 4, stages))
    F.set_fused_config(tma=True)


def main():
    from triton.testing import do_bench_cudagraph
    H, D = 16, 64
    BA.H = H
    dev = torch.device("cuda")
    mods = {n: variant(n) for n in EDITS}
    setups = {"package": {}, **{n: {"kernel": m.fused_attn_fwd_kernel} for n, m in mods.items()},
              "lpt": {"lut": lpt_lut}, "stages 1": {"stages": 1}, "stages 3": {"stages": 3},
              "ceil(L/1.2S)": {"items": items_ceil12},
              "ceil(L/1.2S), lpt": {"items": items_ceil12, "lut": lpt_lut},
              "bmajor, lpt": {"kernel": mods["bmajor"].fused_attn_fwd_kernel, "lut": lpt_lut}}
    timing_only = ("empty", "double", "nostore")
    tg = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    rows = (("bigbird", 64, 4, 4096), ("bigbird", 64, 1, 16384), ("fixed", 64, 4, 4096),
            ("bigbird", 128, 4, 4096))
    for name, blk, B, N in rows:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
        sdpa = torch.nn.functional.scaled_dot_product_attention
        label = f"{name}{blk} {B}x{N}"
        res = {"dense SDPA": tg(lambda: sdpa(q, k, v))}
        use()
        ref, _ = fwd()
        lut = F._get_lut(layout, blk, 64, 64, N, False, q.device, "row", batch=B)
        print(f"{label}: {lut.n_work} items x {B}, {int((lut.work[2] - lut.work[1]).sum())} tiles"
              f" a batch", flush=True)
        for rnd in range(2):
            for tag, kw in setups.items():
                use(**kw)
                out, _ = fwd()
                if rnd == 0:
                    print(f"{label} {tag}: rel diff to package {rel(out, ref):.1e}"
                          f"{' (timing only)' if tag in timing_only else ''}", flush=True)
                res[tag] = min(res.get(tag, float("inf")), tg(fwd))
        use()
        res["dense SDPA (again)"] = tg(lambda: sdpa(q, k, v))
        dens = layout.float().mean().item()
        for kk, us in res.items():
            extra = "" if kk.startswith("dense") else \
                f"  ({dens * res['dense SDPA'] / us * 100:.1f}% of dense's rate)"
            print(f"{label} {kk}: {us:.1f} us{extra}", flush=True)
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
