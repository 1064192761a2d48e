"""Experiment: part of the softmax's exp2 on the FMA units instead of the MUFU.

For head_dim 64 a 64x64 tile costs as many MUFU cycles for its 4096 exp2 (16 a clock per SM)
as tensor-core cycles for its two MMAs, and every exp2 of an iteration sits between the two
MMAs. FlashAttention-4 moves part of the exponentials to a polynomial on the FMA units. Here
one inline-PTX block takes PACK scores at a time: POLY of them by Cody-Waite range reduction
(round to nearest by the 1.5 * 2**23 trick, f in [-0.5, 0.5]) and a minimax polynomial of
degree DEG for 2**f, the exponent added in the integer domain; the rest by ex2.approx. The
input is clamped at -128 and the integer result at 0, so -inf gives exactly 0 (fully masked
rows stay zero). Relative error of the polynomial: 7.5e-5 (degree 3), 2.7e-6 (degree 4),
against bf16's 3.9e-3 rounding of P.

Variants replace the exp2 of the scores in the forward (both branches), dq and dk/dv
(copies of the package's kernel module in /tmp, swapped in; TMA forced). Each is checked
against the package (outputs, gradients) and timed from CUDA-graph replays beside it and
dense SDPA in the same run. Not part of the package.

    PYTHONPATH=. python3 benchmarks/experiments/exp_fastexp.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from sparse_attn.ops import fused as F  # noqa: E402
from sparse_attn.ops.kernels import fused_attention as K  # noqa: E402
import scripts.bench_attention as BA  # noqa: E402
from benchmarks.experiments.harness import module_from_source, rel  # noqa: E402

COEF = {3: (0.9999282956123352, 0.693260908126831, 0.24260762333869934, 0.055170249193906784),
        4: (0.9999992847442627, 0.6931218504905701, 0.240247443318367, 0.055917464196681976,
            0.009569966234266758)}
NAMES = ("fused_attn_fwd_kernel", "fused_attn_bwd_dq_kernel", "fused_attn_bwd_dkdv_kernel")
SITES = {  # kernel -> the exp2 of the scores it computes
    "fwd": ("p = tl.math.exp2(qk * qk_scale - m_new[:, None])",
            "p = tl.math.exp2(s - m_use[:, None])"),
    "dq": ("p = tl.math.exp2(s - lse[:, None])",),
    "dkdv": ("pT = tl.math.exp2(sT - lse[None, :])",),
}


def _hex(x):
    import struct
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", x))[0]


def ptx(pack, poly, deg):
    """Inline PTX for ``pack`` scores: the last ``poly`` of them by polynomial."""
    c = COEF[deg]
    lines = ["{", ".reg .b32 x, t, j, f, p, e, r;"]
    for i in range(pack):
        o, a = f"${i}", f"${pack + i}"
        if i < pack - poly:
            lines.append(f"ex2.approx.ftz.f32 {o}, {a};")
            continue
        lines += [f"max.f32 x, {a}, {_hex(-128.0)};",
                  f"add.rn.f32 t, x, {_hex(12582912.0)};",
                  f"sub.rn.f32 j, t, {_hex(12582912.0)};",
                  "sub.rn.f32 f, x, j;",
                  f"fma.rn.f32 p, f, {_hex(c[deg])}, {_hex(c[deg - 1])};"]
        for k in range(deg - 2, -1, -1):
            lines.append(f"fma.rn.f32 p, p, f, {_hex(c[k])};")
        lines += ["shl.b32 e, t, 23;", "add.s32 r, p, e;", f"max.s32 {o}, r, 0;"]
    lines.append("}")
    return "\n".join(lines)


def helper(pack, poly, deg):
    cons = ",".join(["=r"] * pack + ["r"] * pack)
    return (
        "\n\n@triton.jit\ndef _exp2_mix(x):\n"
        f"    return tl.inline_asm_elementwise({ptx(pack, poly, deg)!r}, {cons!r}, [x],\n"
        f"                                     dtype=tl.float32, is_pure=True, pack={pack})\n")


def variant(tag, kernels, pack, poly, deg):
    src = open(K.__file__).read()
    anchor = "LOG2E = 1.4426950408889634\n"
    assert anchor in src
    src = src.replace(anchor, anchor + helper(pack, poly, deg))
    for kern in kernels:
        for line in SITES[kern]:
            assert src.count(line) == 1, line
            src = src.replace(line, line.replace("tl.math.exp2(", "_exp2_mix("))
    return module_from_source(src, f"fastexp_{tag}")


VARIANTS = {  # tag: (kernels, pack, poly, degree)
    "fwd 1/2 d3": (("fwd",), 2, 1, 3),
    "fwd 1/4 d3": (("fwd",), 4, 1, 3),
    "fwd 3/8 d3": (("fwd",), 8, 3, 3),
    "fwd 1/2 d4": (("fwd",), 2, 1, 4),
    "fwd all d3": (("fwd",), 1, 1, 3),
    "bwd 1/2 d3": (("dq", "dkdv"), 2, 1, 3),
    "bwd 1/4 d3": (("dq", "dkdv"), 4, 1, 3),
}


def use(mod):
    for n in NAMES:
        setattr(K, n, getattr(mod, n))
    F.set_fused_config(tma=True)


def main():
    from triton.testing import do_bench_cudagraph
    H, D = 16, 64
    BA.H = H
    dev = torch.device("cuda")
    orig = {n: getattr(K, n) for n in NAMES}
    mods = {tag: variant(tag.replace(" ", "_").replace("/", "o"), *spec)
            for tag, spec in VARIANTS.items()}
    t = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000  # noqa
    rows = (("bigbird", 64, 4, 4096), ("bigbird", 64, 1, 16384), ("fixed", 64, 4, 4096),
            ("bigbird", 128, 4, 4096), ("bigbird", 16, 4, 4096))
    for name, blk, B, N in rows:
        layout = BA.make_layout(name, blk, N)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                       for _ in range(4))
        use(type("M", (), orig))
        fwd = lambda: F._forward_impl(q, k, v, layout, None, blk, None, False)  # noqa
        out, lse = fwd()
        bwd = lambda: F._backward_impl(do, q, k, v, out, lse, layout, None, blk,  # noqa
                                       None, False)
        ref = bwd()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        label = f"{name}{blk} {B}x{N}"
        res = {"dense SDPA fwd": t(lambda: sdpa(q, k, v)), "package fwd": t(fwd),
               "package bwd": t(bwd)}
        for tag, mod in mods.items():
            use(mod)
            try:
                o2, l2 = fwd()
                g2 = F._backward_impl(do, q, k, v, o2, l2, layout, None, blk, None, False)
                errs = [rel(o2, out)] + [rel(a, r) for a, r in zip(g2, ref)]
                print(f"{label} {tag}: rel diff to package out {errs[0]:.1e} "
                      f"dq/dk/dv {errs[1]:.1e}/{errs[2]:.1e}/{errs[3]:.1e} "
                      f"lse {(l2 - lse).abs().max().item():.1e}", flush=True)
                res[f"{tag}"] = t(fwd if tag.startswith("fwd") else bwd)
            except Exception as e:  # noqa: BLE001
                print(f"{label} {tag}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        use(type("M", (), orig))
        res["package fwd (again)"] = t(fwd)
        res["package bwd (again)"] = t(bwd)
        res["dense SDPA fwd (again)"] = t(lambda: sdpa(q, k, v))
        dens = layout.float().mean().item()
        for kk, us in res.items():
            extra = ""
            if "fwd" in kk and "dense" not in kk:
                extra = f"  ({dens * res['dense SDPA fwd'] / us * 100:.1f}% of dense's rate)"
            print(f"{label} {kk}: {us:.1f} us{extra}", flush=True)
    F.set_fused_config()
    print("done", time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
