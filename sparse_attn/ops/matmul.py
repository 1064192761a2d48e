"""Block-sparse matrix products with DeepSpeed's semantics.

``MatMul(layout, block, mode, trans_a=False, trans_b=False, bench=False)(a, b)`` with
``mode``:

* ``"sdd"``: ``c = op(a) @ op(b)``, a and b dense ``[batch, heads, ., .]``, c block-sparse
  ``[batch, nnz, block, block]``: only the nonzero blocks of ``layout`` (which describes c).
* ``"dsd"``: ``c = op(a) @ op(b)``, a block-sparse (``layout`` describes a as stored,
  ``[heads, rows/block, cols/block]``), b and c dense.
* ``"dds"``: ``c = op(a) @ op(b)``, b block-sparse (``layout`` describes b as stored).

``op(x)`` is ``x`` transposed in its last two dimensions when the matching ``trans_*`` flag
is set (for a sparse operand: the whole matrix, the blocks included). Blocks are stored in
``layout.nonzero()`` order (head, row, col).

Backends: Triton kernels when the tensors are on CUDA, or on CPU tensors when
``TRITON_INTERPRET=1``; the pure-PyTorch block-sparse backend (``matmul_softmax_torch``)
otherwise. Force one with ``backend="triton"`` / ``backend="torch"`` (constructor keyword)
or by setting the module attribute ``sparse_attn.ops.matmul.default_backend``.

``bench`` is DeepSpeed's switch for timing its kernels; it is accepted (also positionally)
and does nothing.

Precision: fp16/bf16 products accumulate in float32. float32 inputs are computed at float32
precision, unless the user allows TF32 for matmuls
(``torch.backends.cuda.matmul.allow_tf32 = True``, PyTorch's convention), which then applies
to these kernels too.

Look-up tables are built from the layout once per (layout content, block, device) and kept in
a module-level cache (``caching.cached_table``); calls after the first do no host-device
synchronisation, so the forward and backward can be captured in a CUDA graph.
"""
import os

import torch

from . import matmul_softmax_torch as _bt
from .caching import cached_table
from .common import LayoutOp, check_dtype, resolve_backend

MODES = ("sdd", "dsd", "dds")

#: backend used when a MatMul/Softmax is built without ``backend=``: "auto", "triton", "torch"
default_backend = os.environ.get("SPARSE_ATTN_BACKEND", "auto")


# ----------------------------------------------------------------------------------------
# per-(layout, block, device, backend) operators
# ----------------------------------------------------------------------------------------
class _TritonOps:
    def __init__(self, layout, lkey, block, device):
        from . import matmul_triton as km
        self.km = km
        self.block = block
        self.nnz = int(layout.sum())
        self.nb_rows, self.nb_cols = int(layout.shape[1]), int(layout.shape[2])
        self.sdd_lut = cached_table("mm_sdd", lkey, block, device,
                              lambda: km.lut_to(km.sdd_lut(layout, block), device))
        self.dsd_lut = {t: cached_table(f"mm_dsd{int(t)}", lkey, block, device,
                                  lambda t=t: km.lut_to(km.dsd_lut(layout, block, t), device))
                        for t in (False, True)}

    def sdd(self, a, b, ta, tb):
        return self.km.sdd(a, b, ta, tb, self.sdd_lut, self.block, self.nnz)

    def dsd(self, a, b, ta, tb):
        rows = (self.nb_cols if ta else self.nb_rows) * self.block
        return self.km.dsd(a.contiguous(), b, ta, tb, self.dsd_lut[ta], self.block, rows)

    def dds(self, a, b, ta, tb):
        # c^T = op(B)^T op(a)^T: the dsd kernel writes c through transposed strides
        t = not tb
        rows = (self.nb_cols if t else self.nb_rows) * self.block
        return self.km.dsd(b.contiguous(), a, t, not ta, self.dsd_lut[t], self.block, rows,
                           out_transposed=True)


class _TorchOps:
    def __init__(self, layout, lkey, block, device):
        self.ix = cached_table("torch_index", lkey, block, device,
                         lambda: _bt.LayoutIndex(layout, block, device))

    def sdd(self, a, b, ta, tb):
        return _bt.sdd(a, b, ta, tb, self.ix)

    def dsd(self, a, b, ta, tb):
        return _bt.dsd(a.contiguous(), b, ta, tb, self.ix)

    def dds(self, a, b, ta, tb):
        return _bt.dds(a, b.contiguous(), ta, tb, self.ix)


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------
class _SparseMatMulFn(torch.autograd.Function):
    """c = op(a) @ op(b) in one of the three modes; each gradient is another mode."""

    @staticmethod
    def forward(ctx, a, b, ops, mode, ta, tb):
        c = getattr(ops, mode)(a, b, ta, tb)
        ctx.save_for_backward(a, b)
        ctx.ops, ctx.mode, ctx.ta, ctx.tb = ops, mode, ta, tb
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        ops, mode, ta, tb = ctx.ops, ctx.mode, ctx.ta, ctx.tb
        dc = dc.contiguous()
        da = db = None
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if mode == "sdd":          # c sparse
            if need_a:
                da = ops.dds(b, dc, tb, True) if ta else ops.dsd(dc, b, False, not tb)
            if need_b:
                db = ops.dsd(dc, a, True, ta) if tb else ops.dds(a, dc, not ta, False)
        elif mode == "dsd":        # a sparse
            if need_a:
                da = ops.sdd(b, dc, tb, True) if ta else ops.sdd(dc, b, False, not tb)
            if need_b:
                db = ops.dds(dc, a, True, ta) if tb else ops.dsd(a, dc, not ta, False)
        else:                      # dds: b sparse
            if need_a:
                da = ops.dsd(b, dc, tb, True) if ta else ops.dds(dc, b, False, not tb)
            if need_b:
                db = ops.sdd(dc, a, True, ta) if tb else ops.sdd(a, dc, not ta, False)
        return da, db, None, None, None, None


# ----------------------------------------------------------------------------------------
# public class
# ----------------------------------------------------------------------------------------
class MatMul(LayoutOp):
    """Block-sparse matrix product (DeepSpeed's ``MatMul``). See the module docstring."""

    def __init__(self, layout, block, mode, trans_a=False, trans_b=False, bench=False, *,
                 backend=None):
        who = "MatMul"
        if mode not in MODES:
            raise ValueError(f"{who}: argument 'mode' is {mode!r}; allowed: {MODES}")
        super().__init__(layout, block, backend, who)
        self.mode = mode
        self.trans_a = bool(trans_a)
        self.trans_b = bool(trans_b)

    def _make_ops(self, backend, device):
        cls = _TritonOps if backend == "triton" else _TorchOps
        return cls(self.layout, self._key, self.block, device)

    def _desc(self):
        return f"MatMul(mode={self.mode!r}, trans_a={self.trans_a}, trans_b={self.trans_b}, block={self.block})"

    def _check(self, a, b):
        who = self._desc()
        H, nbr, nbc = self.spdims
        B = self.block
        for name, t in (("a", a), ("b", b)):
            if not torch.is_tensor(t):
                raise ValueError(f"{who}: argument '{name}' must be a tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{who}: argument '{name}' has shape {tuple(t.shape)}; expected 4 "
                                 "dimensions ([batch, heads, rows, cols] dense or "
                                 "[batch, nnz_blocks, block, block] block-sparse)")
            check_dtype(who, name, t)
        if a.dtype != b.dtype:
            raise ValueError(f"{who}: arguments 'a' ({a.dtype}) and 'b' ({b.dtype}) must have the same dtype")
        if a.device != b.device:
            raise ValueError(f"{who}: arguments 'a' ({a.device}) and 'b' ({b.device}) must be on the same device")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{who}: batch sizes differ: 'a' has shape {tuple(a.shape)}, 'b' has shape {tuple(b.shape)}")

        def dense(name, t, trans):
            if t.shape[1] != H:
                raise ValueError(f"{who}: argument '{name}' has shape {tuple(t.shape)}; dimension 1 "
                                 f"(heads) must equal the layout's {H} heads")
            r, c = (t.shape[3], t.shape[2]) if trans else (t.shape[2], t.shape[3])
            return r, c

        def sparse(name, t):
            if t.shape[1] != self.nnz or t.shape[2] != B or t.shape[3] != B:
                raise ValueError(f"{who}: argument '{name}' has shape {tuple(t.shape)}; expected "
                                 f"[batch, {self.nnz}, {B}, {B}] (the layout has {self.nnz} nonzero "
                                 f"blocks of {B}x{B})")

        ta, tb = self.trans_a, self.trans_b
        if self.mode == "sdd":
            am, ak = dense("a", a, ta)
            bk, bn = dense("b", b, tb)
            if am != nbr * B:
                raise ValueError(f"{who}: argument 'a' has shape {tuple(a.shape)}; op(a) must have "
                                 f"{nbr * B} rows (layout rows {nbr} x block {B})")
            if bn != nbc * B:
                raise ValueError(f"{who}: argument 'b' has shape {tuple(b.shape)}; op(b) must have "
                                 f"{nbc * B} columns (layout cols {nbc} x block {B})")
            if ak != bk:
                raise ValueError(f"{who}: inner dimensions differ: op(a) is [{am}, {ak}] "
                                 f"(a {tuple(a.shape)}), op(b) is [{bk}, {bn}] (b {tuple(b.shape)})")
        elif self.mode == "dsd":
            sparse("a", a)
            bk, _ = dense("b", b, tb)
            k = (nbr if ta else nbc) * B
            if bk != k:
                raise ValueError(f"{who}: argument 'b' has shape {tuple(b.shape)}; op(b) must have "
                                 f"{k} rows to match op(a) of the layout {self.spdims} x block {B}")
        else:
            _, ak = dense("a", a, ta)
            sparse("b", b)
            k = (nbc if tb else nbr) * B
            if ak != k:
                raise ValueError(f"{who}: argument 'a' has shape {tuple(a.shape)}; op(a) must have "
                                 f"{k} columns to match op(b) of the layout {self.spdims} x block {B}")

    def __call__(self, a, b):
        self._check(a, b)
        backend = resolve_backend(self.backend, a.device, default_backend)
        ops = self._get_ops(backend, a.device)
        return _SparseMatMulFn.apply(a, b, ops, self.mode, self.trans_a, self.trans_b)

    forward = __call__
