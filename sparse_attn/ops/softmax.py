"""Row softmax over block-sparse scores, DeepSpeed's ``Softmax``.

``Softmax(layout, block, bench=False)(x, scale=1.0, rpe=None, key_padding_mask=None,
attn_mask=None, key_padding_mask_mode="add", attn_mask_mode="mul")`` with ``x`` block-sparse
``[batch, nnz, block, block]`` (blocks in ``layout.nonzero()`` order). Each token row is
normalised over the row's nonzero blocks only, after, in this order:

* ``x * scale``;
* ``+ rpe``: dense ``[batch or 1, heads or 1, rows, cols]`` (also ``[heads, rows, cols]`` or
  ``[rows, cols]``; only the blocks that are needed are read), or block-sparse like ``x``
  (``[batch or 1, nnz, block, block]``, DeepSpeed's own form);
* ``key_padding_mask`` ``[batch or 1, cols]`` (singleton middle dimensions, as in BERT's
  ``[batch, 1, 1, seq]``, are squeezed): mode ``"add"`` adds it, mode ``"mul"`` keeps
  entries where it is nonzero and drops (-inf) where it is zero;
* ``attn_mask`` ``[rows, cols]``, the same two modes.

Masks may be float, integer or bool; a bool mask always means True = keep, False = drop
(in either mode). A row whose entries are all dropped gives zeros (and zero gradient).
Gradients flow to ``x`` only (rpe and masks are constants). Output has ``x``'s dtype.

In place, as DeepSpeed's was: the probabilities are written into ``x``, and the result is
``x``'s memory (a new tensor object over the same storage, whose gradient is the softmax's;
``x.grad``, when ``x`` retains it, is the gradient with respect to the scores). An autograd
graph that saved ``x`` before the call sees the change and raises, as after any in-place op.
``bench`` (DeepSpeed's kernel timing switch) is accepted and does nothing.
"""
import torch

from . import matmul
from . import matmul_softmax_torch as _bt
from .caching import cached_table
from .common import LayoutOp, check_dtype, resolve_backend

MASK_MODES = ("add", "mul")


class _TritonSoftmaxOps:
    def __init__(self, layout, lkey, block, device):
        from . import softmax_triton as ks
        self.ks = ks
        self.block = block
        self.lut = cached_table("softmax", lkey, block, device,
                          lambda: ks.lut_to(ks.softmax_lut(layout, block), device))

    def forward(self, x, scale, rpe, rpe_sparse, kpm, kpm_keep, am, am_keep, out):
        kw = {}
        if rpe is not None:
            if rpe_sparse:
                kw.update(rpe=rpe, rpe_mode=2, rpe_strides=(rpe.stride(0), 0, 0, 0))
            else:
                kw.update(rpe=rpe, rpe_mode=1, rpe_strides=tuple(rpe.stride()))
        if kpm is not None:
            kw.update(kpm=kpm, kpm_mode=2 if kpm_keep else 1, kpm_strides=tuple(kpm.stride()))
        if am is not None:
            kw.update(am=am, am_mode=2 if am_keep else 1, am_strides=tuple(am.stride()))
        return self.ks.softmax_fwd(x, scale, self.lut, self.block, out=out, **kw)

    def backward(self, y, dy, scale):
        return self.ks.softmax_bwd(y, dy, scale, self.lut, self.block)


class _TorchSoftmaxOps:
    def __init__(self, layout, lkey, block, device):
        self.ix = cached_table("torch_index", lkey, block, device,
                         lambda: _bt.LayoutIndex(layout, block, device))

    def forward(self, x, scale, rpe, rpe_sparse, kpm, kpm_keep, am, am_keep, out):
        y = _bt.softmax_forward(x, scale, self.ix, rpe, rpe_sparse, kpm, kpm_keep, am, am_keep)
        return out.copy_(y)

    def backward(self, y, dy, scale):
        return _bt.softmax_backward(y, dy, scale, self.ix)


class _SparseSoftmaxFn(torch.autograd.Function):
    """The probabilities are written into ``x`` outside autograd's view (so that ``x``'s
    retained gradient stays the scores' gradient, as in DeepSpeed); the write bumps ``x``'s
    version, so a graph that saved ``x`` earlier still detects it."""

    @staticmethod
    def forward(ctx, x, ops, scale, rpe, rpe_sparse, kpm, kpm_keep, am, am_keep):
        target = x.detach()
        if target.is_contiguous():
            ops.forward(target, scale, rpe, rpe_sparse, kpm, kpm_keep, am, am_keep, out=target)
            torch.autograd.graph.increment_version(target)  # a kernel's write is not counted
        else:
            dense = target.contiguous()
            target.copy_(ops.forward(dense, scale, rpe, rpe_sparse, kpm, kpm_keep, am, am_keep,
                                     out=torch.empty_like(dense)))
        ctx.save_for_backward(x)
        ctx.ops, ctx.scale = ops, scale
        return x

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = ctx.ops.backward(y.contiguous(), dy.contiguous(), ctx.scale)
        return dx, None, None, None, None, None, None, None, None


def _squeeze_to(t, ndim):
    """Drop leading/middle singleton dimensions until ``t`` has ``ndim`` dimensions."""
    while t.dim() > ndim:
        ones = [d for d in range(t.dim() - 1) if t.shape[d] == 1 and d > 0] or \
               [d for d in range(t.dim() - 1) if t.shape[d] == 1]
        if not ones:
            break
        t = t.squeeze(ones[0])
    return t


class Softmax(LayoutOp):
    """Block-sparse softmax (DeepSpeed's ``Softmax``). See the module docstring."""

    def __init__(self, layout, block, bench=False, *, backend=None):
        super().__init__(layout, block, backend, "Softmax")

    def _make_ops(self, backend, device):
        cls = _TritonSoftmaxOps if backend == "triton" else _TorchSoftmaxOps
        return cls(self.layout, self._key, self.block, device)

    def _mask(self, name, t, shape_desc, want, x, mode):
        who = f"Softmax(block={self.block})"
        if not torch.is_tensor(t):
            raise ValueError(f"{who}: argument '{name}' must be a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{who}: argument '{name}' is on {t.device}, x is on {x.device}")
        if t.is_complex():
            raise ValueError(f"{who}: argument '{name}' has unsupported dtype {t.dtype}")
        t2 = _squeeze_to(t, len(want))
        ok = t2.dim() == len(want) and all(w is None or s == w or (w == "batch" and s in (1, x.shape[0]))
                                           for s, w in zip(t2.shape, want))
        if not ok:
            raise ValueError(f"{who}: argument '{name}' has shape {tuple(t.shape)}; expected {shape_desc}")
        keep = mode == "mul" or t2.dtype == torch.bool
        if t2.dtype == torch.bool:
            t2 = t2.view(torch.uint8)
        return t2, keep

    def __call__(self, x, scale=1.0, rpe=None, key_padding_mask=None, attn_mask=None,
                 key_padding_mask_mode="add", attn_mask_mode="mul"):
        who = f"Softmax(block={self.block})"
        H, nbr, nbc = self.spdims
        B = self.block
        S, Sk = nbr * B, nbc * B
        if not torch.is_tensor(x):
            raise ValueError(f"{who}: argument 'x' must be a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.nnz or x.shape[2] != B or x.shape[3] != B:
            raise ValueError(f"{who}: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"[batch, {self.nnz}, {B}, {B}] (the layout has {self.nnz} nonzero blocks)")
        check_dtype(who, "x", x)
        for name, m in (("key_padding_mask_mode", key_padding_mask_mode),
                        ("attn_mask_mode", attn_mask_mode)):
            if m not in MASK_MODES:
                raise ValueError(f"{who}: argument '{name}' is {m!r}; allowed: {MASK_MODES}")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"{who}: argument 'scale' must be a number, got {scale!r}") from None
        Z = x.shape[0]

        rpe_t, rpe_sparse = None, False
        if rpe is not None:
            if not torch.is_tensor(rpe) or rpe.device != x.device or rpe.is_complex() or rpe.dtype == torch.bool:
                raise ValueError(f"{who}: argument 'rpe' must be a floating tensor on {x.device}")
            r = rpe.detach()
            if r.dim() == 2:
                r = r[None, None]
            elif r.dim() == 3:
                r = r[None]
            dense_ok = (r.dim() == 4 and r.shape[0] in (1, Z) and r.shape[1] in (1, H)
                        and r.shape[2] == S and r.shape[3] == Sk)
            sparse_ok = (r.dim() == 4 and r.shape[0] in (1, Z) and r.shape[1] == self.nnz
                         and r.shape[2] == B and r.shape[3] == B)
            if dense_ok:
                rpe_t = r
                if r.shape[0] == 1 and Z > 1:
                    rpe_t = r.expand(Z, *r.shape[1:])
                if r.shape[1] == 1 and H > 1:
                    rpe_t = rpe_t.expand(rpe_t.shape[0], H, S, Sk)
            elif sparse_ok:
                rpe_t, rpe_sparse = r.contiguous(), True
                if r.shape[0] == 1 and Z > 1:
                    rpe_t = rpe_t.expand(Z, *r.shape[1:])
            else:
                raise ValueError(f"{who}: argument 'rpe' has shape {tuple(rpe.shape)}; expected dense "
                                 f"[batch or 1, heads ({H}) or 1, {S}, {Sk}] or block-sparse "
                                 f"[batch or 1, {self.nnz}, {B}, {B}]")
        kpm_t, kpm_keep = None, False
        if key_padding_mask is not None:
            kpm_t, kpm_keep = self._mask("key_padding_mask", key_padding_mask.detach(),
                                         f"[batch ({Z}) or 1, {Sk}]", ("batch", Sk), x,
                                         key_padding_mask_mode)
            if kpm_t.shape[0] == 1 and Z > 1:
                kpm_t = kpm_t.expand(Z, Sk)
        am_t, am_keep = None, False
        if attn_mask is not None:
            am_t, am_keep = self._mask("attn_mask", attn_mask.detach(), f"[{S}, {Sk}]", (S, Sk), x,
                                       attn_mask_mode)
        backend = resolve_backend(self.backend, x.device, matmul.default_backend)
        ops = self._get_ops(backend, x.device)
        return _SparseSoftmaxFn.apply(x, ops, scale, rpe_t, rpe_sparse, kpm_t, kpm_keep, am_t, am_keep)

    forward = __call__
