"""Host side of the Triton block-sparse softmax kernels (``kernels/softmax.py``): the look-up
table of the block-rows, built once per layout on the CPU, and the launches.

    lut = lut_to(softmax_lut(layout, block), device)
    y = softmax_fwd(x, scale, lut, block, ...)
"""
import torch

from .kernels import softmax as _k
from .launch import Launcher
from .matmul_triton import lut_to, next_pow2

__all__ = ["softmax_lut", "lut_to", "softmax_fwd", "softmax_bwd"]

# launched as _launch_<kernel>(grid, *args, **constexprs): see launch.py
_launch_softmax_fwd_kernel = Launcher(_k, "_softmax_fwd_kernel")
_launch_softmax_bwd_kernel = Launcher(_k, "_softmax_bwd_kernel")


def softmax_lut(layout, block, max_elems=2048, long_elems=4096):
    """Work lists for the two launches of each softmax.

    Every block-row with nonzeros is one item (head, block-row, first nnz, count). Items of at
    most ``chunk`` blocks (``chunk`` covers 90% of the rows) go to the *short* launch: ``r``
    token rows x ``chunk`` blocks a program, one pass. Longer items (global rows) go to the
    *long* launch with few rows a program and wide chunks, so that one long row does not
    become a tail of many small dependent steps."""
    h, nbm, nbn = layout.shape
    counts = layout.sum(-1).flatten().to(torch.int64)          # [H * nbm]
    starts = torch.zeros_like(counts)
    starts[1:] = torch.cumsum(counts, 0)[:-1]
    rows = (counts > 0).nonzero().flatten()
    cols = layout.nonzero()[:, 2]
    if cols.numel() == 0:
        cols = torch.zeros(1, dtype=torch.int64)
    c = counts[rows]
    if rows.numel() > 1:
        typical = int(torch.quantile(c.double(), 0.9).ceil().item())
    else:
        typical = int(c[0]) if rows.numel() else 1
    chunk = max(1, min(next_pow2(typical), max(1, max_elems // block)))
    r = max(1, min(block, max_elems // (chunk * block)))
    items = torch.stack([rows // nbm, rows % nbm, starts[rows], c], 1)
    short = c <= chunk
    out = {"cols": cols.to(torch.int32).contiguous()}
    out["short"] = {"lut": items[short].to(torch.int32).contiguous(),
                    "items": int(short.sum()), "chunk": chunk, "r": r}
    longc = c[~short]
    r_long = max(1, min(block, 64 // block))                  # >= 128 contiguous bytes (16-bit)
    chunk_long = chunk
    if longc.numel():
        chunk_long = max(chunk, min(next_pow2(int(longc.max())),
                                    next_pow2(max(1, long_elems // (r_long * block)))))
    out["long"] = {"lut": items[~short].to(torch.int32).contiguous(),
                   "items": int((~short).sum()), "chunk": chunk_long, "r": r_long}
    return out


def _warps(r, chunk, block):
    return 8 if r * chunk * block >= 8192 else 4


def softmax_fwd(x, scale, lut, block, rpe=None, rpe_mode=0, rpe_strides=(0, 0, 0, 0),
                kpm=None, kpm_mode=0, kpm_strides=(0, 0), am=None, am_mode=0,
                am_strides=(0, 0), num_warps=None, out=None):
    """Probabilities of x [Z, nnz, block, block] (contiguous) into ``out`` (may be x itself:
    each program reads its rows before it writes them), a new tensor by default."""
    y = torch.empty_like(x) if out is None else out
    z = x.shape[0]
    if z == 0:
        return y
    for part in (lut["long"], lut["short"]):
        if part["items"] == 0:
            continue
        r, chunk = part["r"], part["chunk"]
        grid = (part["items"] * (block // r), z)
        _launch_softmax_fwd_kernel(
            grid, x, y, part["lut"], lut["cols"],
            rpe if rpe is not None else x, kpm if kpm is not None else x,
            am if am is not None else x, float(scale), x.stride(0),
            *rpe_strides, *kpm_strides, *am_strides,
            BLOCK=block, R=r, CHUNK=chunk, RPE_MODE=rpe_mode, KPM_MODE=kpm_mode,
            AM_MODE=am_mode, NRC=block // r, num_warps=num_warps or _warps(r, chunk, block))
    return y


def softmax_bwd(y, dy, scale, lut, block, num_warps=None):
    dx = torch.empty_like(y)
    z = y.shape[0]
    if z == 0:
        return dx
    for part in (lut["long"], lut["short"]):
        if part["items"] == 0:
            continue
        r, chunk = part["r"], part["chunk"]
        grid = (part["items"] * (block // r), z)
        _launch_softmax_bwd_kernel(
            grid, y, dy, dx, part["lut"], float(scale), y.stride(0), dy.stride(0),
            BLOCK=block, R=r, CHUNK=chunk, NRC=block // r,
            num_warps=num_warps or _warps(r, chunk, block))
    return dx
