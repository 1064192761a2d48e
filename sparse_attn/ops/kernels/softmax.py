"""Triton kernels for the row softmax of block-sparse scores (DeepSpeed's format).

Scores are ``[batch, nnz, block, block]``; the blocks of one block-row ``(head, i)`` are
consecutive in ``layout.nonzero()`` order, so a token row is ``cnt`` pieces of ``block``
contiguous values, ``block * block`` apart. One program handles ``R`` token rows of one
block-row: a row of at most ``CHUNK`` blocks is loaded once and kept in registers; a longer
row (a global row, say) runs two passes over chunks (online max/sum, then normalise).

Before the softmax: ``x * scale``, ``+ rpe`` (dense ``[.., seq, seq]`` through strides, or
sparse like ``x``), then the key-padding mask and the attention mask, each either added
(MODE 1) or used as keep (nonzero) / drop (zero) (MODE 2). Masked entries give 0; a row
whose entries are all masked gives zeros. The look-up table and the launches are in
``sparse_attn/ops/softmax_triton.py``.
"""
import triton
import triton.language as tl


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
