"""Pure-PyTorch block-sparse backend (CPU or any device) for MatMul and Softmax.

Same block-sparse format as the Triton kernels: ``[batch, nnz, block, block]``, blocks in
``layout.nonzero()`` order. The work is done on gathered blocks (index_select / advanced
indexing, batched matmul, index_add), in chunks of nonzero blocks so that no dense
``[seq, seq]`` matrix and no huge gather is ever materialised. Functions here are plain
tensor functions (no autograd of their own): the autograd wrappers in ``matmul.py`` and
``softmax.py`` express each backward with these same functions.
"""
import torch

# at most this many elements in one gathered operand
_CHUNK_ELEMS = 1 << 24


class LayoutIndex:
    """Per-device index tensors of a layout (built once, cached by the caller)."""

    def __init__(self, layout, block, device):
        nz = layout.nonzero()
        self.heads, self.nb_rows, self.nb_cols = (int(s) for s in layout.shape)
        self.block = block
        self.nnz = int(nz.shape[0])
        self.h = nz[:, 0].to(device)
        self.i = nz[:, 1].to(device)
        self.j = nz[:, 2].to(device)
        # row group (head, block-row) and column group (head, block-col) of every block
        self.row_group = (nz[:, 0] * self.nb_rows + nz[:, 1]).to(device)
        self.col_group = (nz[:, 0] * self.nb_cols + nz[:, 2]).to(device)


def _chunks(n, per_item):
    step = max(1, _CHUNK_ELEMS // max(1, per_item))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sdd(a, b, trans_a, trans_b, ix):
    """Blocks of op(a) @ op(b) at the layout's nonzeros: [Z, nnz, block, block]."""
    B = ix.block
    a = a.transpose(-1, -2) if trans_a else a
    b = b.transpose(-1, -2) if trans_b else b
    z, h, m, k = a.shape
    n = b.shape[-1]
    a_blk = a.reshape(z, h, m // B, B, k)                                  # [Z,H,nbM,B,K]
    b_blk = b.reshape(z, h, k, n // B, B).permute(0, 1, 3, 2, 4)           # [Z,H,nbN,K,B]
    out = torch.empty((z, ix.nnz, B, B), dtype=a.dtype, device=a.device)
    for s, e in _chunks(ix.nnz, z * B * k):
        hh, ii, jj = ix.h[s:e], ix.i[s:e], ix.j[s:e]
        out[:, s:e] = torch.matmul(a_blk[:, hh, ii], b_blk[:, hh, jj])
    return out


def dsd(a, b, trans_a, trans_b, ix):
    """op(A) @ op(b) with A block-sparse [Z, nnz, block, block] (layout = A as stored)."""
    B = ix.block
    b = b.transpose(-1, -2) if trans_b else b
    z, h, k, n = b.shape
    nb_out = ix.nb_cols if trans_a else ix.nb_rows
    out_grp = ix.col_group if trans_a else ix.row_group
    k_blk = ix.i if trans_a else ix.j
    b_blk = b.reshape(z, h, k // B, B, n)                                  # [Z,H,nbK,B,N]
    acc = torch.zeros((z, h * nb_out, B, n), dtype=_acc_dtype(b.dtype), device=b.device)
    for s, e in _chunks(ix.nnz, z * B * n):
        blocks = a[:, s:e]
        if trans_a:
            blocks = blocks.transpose(-1, -2)
        prod = torch.matmul(blocks, b_blk[:, ix.h[s:e], k_blk[s:e]])       # [Z,c,B,N]
        acc.index_add_(1, out_grp[s:e], prod.to(acc.dtype))
    return acc.view(z, h, nb_out * B, n).to(b.dtype)


def dds(a, b, trans_a, trans_b, ix):
    """op(a) @ op(B) with B block-sparse, via (op(a) op(B))^T = op(B)^T op(a)^T."""
    return dsd(b, a, not trans_b, not trans_a, ix).transpose(-1, -2).contiguous()


def _gather_dense(t, ix, rows_tok, cols_tok):
    """Blocks of a dense [Zt, Ht, S, S'] tensor at the layout's nonzeros -> [Zt, nnz, B, B]."""
    B = ix.block
    zt, ht = t.shape[0], t.shape[1]
    t6 = t.reshape(zt, ht, rows_tok // B, B, cols_tok // B, B).permute(0, 1, 2, 4, 3, 5)
    hh = ix.h if ht > 1 else torch.zeros_like(ix.h)
    return t6[:, hh, ix.i, ix.j]


def softmax_forward(x, scale, ix, rpe=None, rpe_sparse=False, kpm=None, kpm_keep=False,
                    am=None, am_keep=False):
    """Row softmax over the nonzero blocks. Masks are already broadcastable: rpe dense
    [Zr, Hr, S, S'] or sparse [Zr, nnz, B, B]; kpm [Zk, S']; am [S, S']."""
    B = ix.block
    z = x.shape[0]
    s_rows, s_cols = ix.nb_rows * B, ix.nb_cols * B
    xs = x.float() * scale
    if rpe is not None:
        r = rpe if rpe_sparse else _gather_dense(rpe, ix, s_rows, s_cols)
        xs = xs + r.float()
    if kpm is not None:
        kb = kpm.reshape(kpm.shape[0], ix.nb_cols, B)[:, ix.j]            # [Zk, nnz, B]
        if kpm_keep:
            xs = xs.masked_fill((kb == 0)[:, :, None, :], float("-inf"))
        else:
            xs = xs + kb.float()[:, :, None, :]
    if am is not None:
        ab = _gather_dense(am[None, None], ix, s_rows, s_cols)[0]          # [nnz, B, B]
        if am_keep:
            xs = xs.masked_fill((ab == 0)[None], float("-inf"))
        else:
            xs = xs + ab.float()[None]
    g = ix.row_group
    ngroups = ix.heads * ix.nb_rows
    m = torch.full((z, ngroups, B), float("-inf"), dtype=xs.dtype, device=x.device)
    m = m.scatter_reduce(1, g[None, :, None].expand(z, -1, B), xs.amax(-1), "amax",
                         include_self=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(xs - m[:, g, :, None])
    l = torch.zeros((z, ngroups, B), dtype=xs.dtype, device=x.device).index_add_(1, g, e.sum(-1))
    l = torch.where(l > 0, l, torch.ones_like(l))
    return (e / l[:, g, :, None]).to(x.dtype)


def softmax_backward(y, dy, scale, ix):
    g = ix.row_group
    yf, dyf = y.float(), dy.float()
    s = torch.zeros((y.shape[0], ix.heads * ix.nb_rows, ix.block), dtype=yf.dtype,
                    device=y.device).index_add_(1, g, (yf * dyf).sum(-1))
    return (scale * yf * (dyf - s[:, g, :, None])).to(y.dtype)
