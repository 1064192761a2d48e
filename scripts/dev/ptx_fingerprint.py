"""Fingerprints of the PTX that Triton generates for the fused forward, dq and dk/dv kernels, for
sm_90, without a GPU: one md5 per (kernel, TMA or pointers, coarse all-full or fine masked
variant), with line info and debug sections stripped.

A refactor of the kernels' Triton code that leaves these unchanged compiles to the same
machine code, so the GPU tests of the code before it still hold. Run before and after:

    python scripts/dev/ptx_fingerprint.py > before.txt   # (edit)
    python scripts/dev/ptx_fingerprint.py > after.txt && diff before.txt after.txt
"""
import hashlib
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, ".")
from sparse_attn.ops.kernels import fused_backward, fused_forward  # noqa: E402


def compile_ptx(fn, ptr, consts):
    """PTX of fn for sm_90: ptr maps pointer (and descriptor) arguments to their types, consts
    the constexprs; every other argument is an i32 (fp32 for the scales), pointers and strides
    16-divisible as Triton specializes them at a real launch."""
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptr:
            sig[n] = ptr[n]
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and (n in ptr or n.startswith("stride") or n == "N")}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4, "num_stages": 3})
    ptx = ck.asm["ptx"]
    ptx = "\n".join(line for line in ptx.splitlines()
                    if not line.strip().startswith((".loc", ".file", "//")))
    ptx = re.sub(r"\.section\s+\.debug.*", "", ptx, flags=re.S)
    return ptx


bf = "*bf16"
# a coarse all-full variant and a fine one with every mask (causal, key padding, uneven, split)
base = dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM=64, UNIT_M=64, UNIT_N=64, BITS32=True, UPCAST=False,
            ONE_LOOP=False)
cases = []
for fine, causal, kpm, even, all_full, split in ((False, False, False, True, True, False),
                                                 (True, True, True, False, False, True)):
    c = dict(base, FINE=fine, CAUSAL=causal, HAS_KPM=kpm, EVEN=even, ALL_FULL=all_full,
             HAS_SPLIT=split)
    if fine:
        c.update(UNIT_M=16, UNIT_N=16)
    cases.append(c)


def main():
    out = []
    for tma in (False, True):
        for c in cases:
            for name in ("fused_attn_fwd_kernel", "fused_attn_bwd_dq_kernel",
                         "fused_attn_bwd_dkdv_kernel"):
                fn = getattr(fused_forward if name == "fused_attn_fwd_kernel" else fused_backward,
                             name)
                consts = dict(c, TMA=tma)
                if name == "fused_attn_fwd_kernel":
                    consts["POS_SCALE"] = True
                ptr = {n: bf for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
                ptr.update({n: "*fp32" for n in ("LSE", "DELTA", "KPM", "WS_ACC", "WS_ML", "WS",
                                                 "WS_DK", "WS_DV")})
                ptr.update({n: "*i32" for n in ("IDX", "NFULL", "WORK", "SPLIT", "SLOT_SPLIT",
                                                "COUNT")})
                ptr["BITS"] = "*i64"
                absent = {n: not c["HAS_SPLIT"] for n in ("WS_ACC", "WS_ML", "WS", "WS_DK", "WS_DV",
                                                          "SPLIT", "SLOT_SPLIT", "COUNT")}
                absent.update(KPM=not c["HAS_KPM"], BITS=not c["FINE"], NFULL=c["ALL_FULL"])
                for n, gone in absent.items():
                    if n in fn.arg_names and gone:
                        consts[n] = None
                if not c["HAS_KPM"]:
                    consts["stride_kpmb"] = 0
                descs = [n for n in fn.arg_names if n.endswith("_DESC")]
                for n in descs:
                    if tma:
                        ptr[n] = "tensordesc<bf16[1, 1, 64, 64]>"
                    else:
                        consts[n] = None
                ptx = compile_ptx(fn, ptr, consts)
                digest = hashlib.md5(ptx.encode()).hexdigest()
                out.append(f"{name} tma={tma} fine={c['FINE']}: {digest}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
