"""Triton kernels for the row softmax of block-sparse scores (DeepSpeed's format).

Scores are ``[batch, nnz, block, block]``; the blocks of one block-row ``(head, i)`` are
consecutive in ``layout.nonzero()`` order, so a token row is ``cnt`` pieces of ``block``
contiguous values, ``block * block`` apart. One program handles ``R`` token rows of one
block-row: a row of at most ``CHUNK`` blocks is loaded once and kept in registers; a longer
row (a global row, say) runs two passes over chunks (online max/sum, then normalise).

Before the softmax: ``x * scale``, ``+ rpe`` (dense ``[.., seq, seq]`` through strides, or
sparse like ``x``), then the key-padding mask and the attention mask, each either added
(MODE 1) or used as keep (nonzero) / drop (zero) (MODE 2). Masked entries give 0; a row
whose entries are all masked gives zeros.
"""
import sys

import torch
import triton
import triton.language as tl

from ..launch import Launcher


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


@triton.jit
def _sm_logits(X, COLS, RPE, KPM, AM, scale, x_base, h, z, tok_row, rows, start, cnt, g0,
               stride_rz, stride_rh, stride_rm, stride_rn,
               stride_kz, stride_kn, stride_am, stride_an,
               BLOCK: tl.constexpr, CHUNK: tl.constexpr,
               RPE_MODE: tl.constexpr, KPM_MODE: tl.constexpr, AM_MODE: tl.constexpr):
    offs_w = tl.arange(0, CHUNK * BLOCK)
    g = g0 + offs_w // BLOCK
    cc = offs_w % BLOCK
    valid = g < cnt
    n = (start + g).to(tl.int64)
    off = n[None, :] * (BLOCK * BLOCK) + rows[:, None] * BLOCK + cc[None, :]
    x = tl.load(X + x_base + off, mask=valid[None, :], other=float("-inf")).to(tl.float32)
    x = x * scale
    if RPE_MODE + KPM_MODE + AM_MODE > 0:
        col = tl.load(COLS + n, mask=valid, other=0)
        tok_col = col.to(tl.int64) * BLOCK + cc
        if RPE_MODE == 1:  # dense [Zr, Hr, S, S] through strides
            r = tl.load(RPE + z * stride_rz + h * stride_rh + tok_row[:, None] * stride_rm
                        + tok_col[None, :] * stride_rn, mask=valid[None, :], other=0.)
            x = x + r.to(tl.float32)
        if RPE_MODE == 2:  # block-sparse like x
            r = tl.load(RPE + z * stride_rz + off, mask=valid[None, :], other=0.)
            x = x + r.to(tl.float32)
        if KPM_MODE > 0:
            kp = tl.load(KPM + z * stride_kz + tok_col * stride_kn, mask=valid, other=0)
            if KPM_MODE == 1:
                x = x + kp.to(tl.float32)[None, :]
            else:
                x = tl.where(kp[None, :] != 0, x, float("-inf"))
        if AM_MODE > 0:
            am = tl.load(AM + tok_row[:, None] * stride_am + tok_col[None, :] * stride_an,
                         mask=valid[None, :], other=0)
            if AM_MODE == 1:
                x = x + am.to(tl.float32)
            else:
                x = tl.where(am != 0, x, float("-inf"))
    x = tl.where(valid[None, :], x, float("-inf"))
    return x, off, valid


@triton.jit
def _softmax_fwd_kernel(X, Y, LUT, COLS, RPE, KPM, AM, scale,
                        stride_xz,
                        stride_rz, stride_rh, stride_rm, stride_rn,
                        stride_kz, stride_kn, stride_am, stride_an,
                        BLOCK: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr,
                        RPE_MODE: tl.constexpr, KPM_MODE: tl.constexpr,
                        AM_MODE: tl.constexpr, NRC: tl.constexpr):
    pid = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    item = pid // NRC
    rc = pid % NRC
    h = tl.load(LUT + item * 4 + 0).to(tl.int64)
    i = tl.load(LUT + item * 4 + 1)
    start = tl.load(LUT + item * 4 + 2)
    cnt = tl.load(LUT + item * 4 + 3)
    rows = rc * R + tl.arange(0, R)
    tok_row = (i * BLOCK + rows).to(tl.int64)
    x_base = z * stride_xz
    if cnt <= CHUNK:
        x, off, valid = _sm_logits(X, COLS, RPE, KPM, AM, scale, x_base, h, z, tok_row, rows,
                                   start, cnt, 0, stride_rz, stride_rh, stride_rm, stride_rn,
                                   stride_kz, stride_kn, stride_am, stride_an,
                                   BLOCK, CHUNK, RPE_MODE, KPM_MODE, AM_MODE)
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0., m)
        e = tl.exp(x - m[:, None])
        l = tl.sum(e, 1)
        l = tl.where(l > 0, l, 1.)
        y = e / l[:, None]
        tl.store(Y + x_base + off, y.to(Y.dtype.element_ty), mask=valid[None, :])
    else:
        m = tl.full((R,), float("-inf"), tl.float32)
        l = tl.zeros((R,), tl.float32)
        for g0 in range(0, cnt, CHUNK):
            x, off, valid = _sm_logits(X, COLS, RPE, KPM, AM, scale, x_base, h, z, tok_row,
                                       rows, start, cnt, g0,
                                       stride_rz, stride_rh, stride_rm, stride_rn,
                                       stride_kz, stride_kn, stride_am, stride_an,
                                       BLOCK, CHUNK, RPE_MODE, KPM_MODE, AM_MODE)
            m_new = tl.maximum(m, tl.max(x, 1))
            m_s = tl.where(m_new == float("-inf"), 0., m_new)
            l = l * tl.exp(m - m_s) + tl.sum(tl.exp(x - m_s[:, None]), 1)
            m = m_new
        m_s = tl.where(m == float("-inf"), 0., m)
        l = tl.where(l > 0, l, 1.)
        for g0 in range(0, cnt, CHUNK):
            x, off, valid = _sm_logits(X, COLS, RPE, KPM, AM, scale, x_base, h, z, tok_row,
                                       rows, start, cnt, g0,
                                       stride_rz, stride_rh, stride_rm, stride_rn,
                                       stride_kz, stride_kn, stride_am, stride_an,
                                       BLOCK, CHUNK, RPE_MODE, KPM_MODE, AM_MODE)
            y = tl.exp(x - m_s[:, None]) / l[:, None]
            tl.store(Y + x_base + off, y.to(Y.dtype.element_ty), mask=valid[None, :])


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, LUT, scale, stride_z, stride_dyz,
                        BLOCK: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr,
                        NRC: tl.constexpr):
    pid = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    item = pid // NRC
    rc = pid % NRC
    start = tl.load(LUT + item * 4 + 2)
    cnt = tl.load(LUT + item * 4 + 3)
    rows = rc * R + tl.arange(0, R)
    offs_w = tl.arange(0, CHUNK * BLOCK)
    cc = offs_w % BLOCK
    base = z * stride_z
    dbase = z * stride_dyz
    if cnt <= CHUNK:
        g = offs_w // BLOCK
        valid = (g < cnt)[None, :]
        off = (start + g).to(tl.int64)[None, :] * (BLOCK * BLOCK) + rows[:, None] * BLOCK + cc[None, :]
        y = tl.load(Y + base + off, mask=valid, other=0.).to(tl.float32)
        dy = tl.load(DY + dbase + off, mask=valid, other=0.).to(tl.float32)
        s = tl.sum(y * dy, 1)
        dx = scale * y * (dy - s[:, None])
        tl.store(DX + base + off, dx.to(DX.dtype.element_ty), mask=valid)
    else:
        s = tl.zeros((R,), tl.float32)
        for g0 in range(0, cnt, CHUNK):
            g = g0 + offs_w // BLOCK
            valid = (g < cnt)[None, :]
            off = (start + g).to(tl.int64)[None, :] * (BLOCK * BLOCK) + rows[:, None] * BLOCK + cc[None, :]
            y = tl.load(Y + base + off, mask=valid, other=0.).to(tl.float32)
            dy = tl.load(DY + dbase + off, mask=valid, other=0.).to(tl.float32)
            s += tl.sum(y * dy, 1)
        for g0 in range(0, cnt, CHUNK):
            g = g0 + offs_w // BLOCK
            valid = (g < cnt)[None, :]
            off = (start + g).to(tl.int64)[None, :] * (BLOCK * BLOCK) + rows[:, None] * BLOCK + cc[None, :]
            y = tl.load(Y + base + off, mask=valid, other=0.).to(tl.float32)
            dy = tl.load(DY + dbase + off, mask=valid, other=0.).to(tl.float32)
            dx = scale * y * (dy - s[:, None])
            tl.store(DX + base + off, dx.to(DX.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------
# look-up table and launchers
# ----------------------------------------------------------------------------------------
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
    chunk = max(1, min(_next_pow2(typical), max(1, max_elems // block)))
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
        chunk_long = max(chunk, min(_next_pow2(int(longc.max())),
                                    _next_pow2(max(1, long_elems // (r_long * block)))))
    out["long"] = {"lut": items[~short].to(torch.int32).contiguous(),
                   "items": int((~short).sum()), "chunk": chunk_long, "r": r_long}
    return out


def lut_to(lut, device):
    if isinstance(lut, dict):
        return {k: lut_to(v, device) for k, v in lut.items()}
    return lut.to(device) if torch.is_tensor(lut) else lut


def _warps(r, chunk, block):
    return 8 if r * chunk * block >= 8192 else 4


def softmax_fwd(x, scale, lut, block, rpe=None, rpe_mode=0, rpe_strides=(0, 0, 0, 0),
                kpm=None, kpm_mode=0, kpm_strides=(0, 0), am=None, am_mode=0,
                am_strides=(0, 0), num_warps=None):
    y = torch.empty_like(x)
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


# launched as _launch_<kernel>(grid, *args, **constexprs): see ops/launch.py
_launch_softmax_fwd_kernel = Launcher(sys.modules[__name__], '_softmax_fwd_kernel')
_launch_softmax_bwd_kernel = Launcher(sys.modules[__name__], '_softmax_bwd_kernel')
