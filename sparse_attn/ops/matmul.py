"""Block-sparse matrix products with DeepSpeed's semantics.

``MatMul(layout, block, mode, trans_a=False, trans_b=False)(a, b)`` with ``mode``:

* ``"sdd"``: ``c = op(a) @ op(b)``, a and b dense ``[batch, heads, ., .]``, c block-sparse
  ``[batch, nnz, block, block]``: only the nonzero blocks of ``layout`` (which describes c).
* ``"dsd"``: ``c = op(a) @ op(b)``, a block-sparse (``layout`` describes a as stored,
  ``[heads, rows/block, cols/block]``), b and c dense.
* ``"dds"``: ``c = op(a) @ op(b)``, b block-sparse (``layout`` describes b as stored).

``op(x)`` is ``x`` transposed in its last two dimensions when the matching ``trans_*`` flag
is set (for a sparse operand: the whole matrix, the blocks included). Blocks are stored in
``layout.nonzero()`` order (head, row, col).

Backends: Triton kernels when the tensors are on CUDA, or on CPU tensors when
``TRITON_INTERPRET=1``; the pure-PyTorch block-sparse backend (``blocksparse_torch``)
otherwise. Force one with ``backend="triton"`` / ``backend="torch"`` (constructor keyword)
or by setting the module attribute ``sparse_attn.ops.matmul.default_backend``.

Precision: fp16/bf16 products accumulate in float32. float32 inputs on the GPU go through the
tensor cores in TF32 (Triton's default for a float32 ``tl.dot``; relative error near 3e-4),
as DeepSpeed's kernels did on A100; the PyTorch backend computes them in full float32.

Look-up tables are built from the layout once per (layout content, block, device) and kept in
a module-level cache (``_LUT_CACHE``); calls after the first do no host-device
synchronisation, so the forward and backward can be captured in a CUDA graph.
"""
import hashlib
import operator
import os
import weakref

import torch

from . import blocksparse_torch as _bt
from .caching import build_outside_graph_pools

BLOCKS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("sdd", "dsd", "dds")
BACKENDS = ("auto", "triton", "torch")

#: backend used when a MatMul/Softmax is built without ``backend=``: "auto", "triton", "torch"
default_backend = os.environ.get("SPARSE_ATTN_BACKEND", "auto")

_LUT_CACHE = {}


# ----------------------------------------------------------------------------------------
# shared helpers (also used by softmax.py)
# ----------------------------------------------------------------------------------------
def _triton_available():
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - depends on the install
        return False


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested, device):
    """Pick the backend for tensors on ``device``."""
    b = requested or default_backend
    if b not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {b!r}")
    if b == "auto":
        if _triton_available() and (device.type == "cuda" or (device.type == "cpu" and _interpreting())):
            return "triton"
        return "torch"
    if b == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if device.type == "cpu" and not _interpreting():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "sparse_attn's kernels are imported; use backend='torch' on CPU")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not run on device {device}")
    return b


_LAYOUT_SEEN = {}


def as_block(block, who):
    """The block size as a Python int, or ValueError."""
    try:
        b = operator.index(block) if not isinstance(block, bool) else None
    except TypeError:
        b = None
    if b not in BLOCKS:
        raise ValueError(f"{who}: argument 'block' is {block!r}; allowed: {BLOCKS}")
    return b


def canonical_layout(layout, block, who):
    """(CPU int64 layout, content key), remembered per layout object and version so that
    building a MatMul/Softmax per call costs no device copy (and no sync) after the first."""
    block = as_block(block, who)
    if torch.is_tensor(layout):
        hit = _LAYOUT_SEEN.get(id(layout))
        if hit is not None and hit[0]() is layout and hit[1] == layout._version:
            return hit[2], hit[3]
    lay = check_layout(layout, block, who)
    key = layout_key(lay)
    if len(_LAYOUT_SEEN) > 4096:
        _LAYOUT_SEEN.clear()
    _LAYOUT_SEEN[id(layout)] = (weakref.ref(layout), layout._version, lay, key)
    return lay, key


def check_layout(layout, block, who):
    if not torch.is_tensor(layout):
        raise ValueError(f"{who}: argument 'layout' must be a torch tensor [heads, rows, cols], "
                         f"got {type(layout).__name__}")
    if layout.dim() != 3:
        raise ValueError(f"{who}: argument 'layout' has shape {tuple(layout.shape)}; expected 3 "
                         "dimensions [heads, rows/block, cols/block]")
    as_block(block, who)
    lay = layout.detach().to("cpu")
    if lay.is_floating_point() or lay.is_complex():
        if not bool(((lay == 0) | (lay == 1)).all()):
            raise ValueError(f"{who}: argument 'layout' must hold only 0 and 1")
    lay = lay.to(torch.int64)
    if not bool(((lay == 0) | (lay == 1)).all()):
        raise ValueError(f"{who}: argument 'layout' must hold only 0 and 1")
    return lay.contiguous()


def layout_key(layout):
    """Content key of a CPU int64 layout: equal only for equal layouts."""
    digest = hashlib.sha1(layout.to(torch.uint8).numpy().tobytes()).hexdigest()
    return (tuple(layout.shape), digest)


def cached(kind, lkey, block, device, build):
    key = (kind, lkey, block, str(device))
    val = _LUT_CACHE.get(key)
    if val is None:
        val = build_outside_graph_pools(build, torch.device(device))
        _LUT_CACHE[key] = val
    return val


def check_dtype(who, name, t):
    if t.dtype not in DTYPES:
        raise ValueError(f"{who}: argument '{name}' has dtype {t.dtype}; supported: "
                         "torch.float32, torch.float16, torch.bfloat16")


# ----------------------------------------------------------------------------------------
# per-(layout, block, device, backend) operators
# ----------------------------------------------------------------------------------------
class _TritonOps:
    def __init__(self, layout, lkey, block, device):
        from .kernels import matmul as km
        self.km = km
        self.block = block
        self.nnz = int(layout.sum())
        self.nb_rows, self.nb_cols = int(layout.shape[1]), int(layout.shape[2])
        self.sdd_lut = cached("mm_sdd", lkey, block, device,
                              lambda: km.lut_to(km.sdd_lut(layout, block), device))
        self.dsd_lut = {t: cached(f"mm_dsd{int(t)}", lkey, block, device,
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
        self.ix = cached("torch_index", lkey, block, device,
                         lambda: _bt.LayoutIndex(layout, block, device))

    def sdd(self, a, b, ta, tb):
        return _bt.sdd(a, b, ta, tb, self.ix)

    def dsd(self, a, b, ta, tb):
        return _bt.dsd(a.contiguous(), b, ta, tb, self.ix)

    def dds(self, a, b, ta, tb):
        return _bt.dds(a, b.contiguous(), ta, tb, self.ix)


def make_ops(backend, layout, lkey, block, device):
    cls = _TritonOps if backend == "triton" else _TorchOps
    return cls(layout, lkey, block, device)


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
class MatMul:
    """Block-sparse matrix product (DeepSpeed's ``MatMul``). See the module docstring."""

    def __init__(self, layout, block, mode, trans_a=False, trans_b=False, backend=None):
        who = "MatMul"
        if mode not in MODES:
            raise ValueError(f"{who}: argument 'mode' is {mode!r}; allowed: {MODES}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{who}: argument 'backend' is {backend!r}; allowed: {BACKENDS}")
        self.layout, self._key = canonical_layout(layout, block, who)
        self.block = block = as_block(block, who)
        self.mode = mode
        self.trans_a = bool(trans_a)
        self.trans_b = bool(trans_b)
        self.backend = backend
        self.spdims = tuple(self.layout.shape)
        self.nnz = int(self.layout.sum())
        self._ops = {}

    def _get_ops(self, backend, device):
        k = (backend, str(device))
        ops = self._ops.get(k)
        if ops is None:
            ops = make_ops(backend, self.layout, self._key, self.block, device)
            self._ops[k] = ops
        return ops

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
        backend = resolve_backend(self.backend, a.device)
        ops = self._get_ops(backend, a.device)
        return _SparseMatMulFn.apply(a, b, ops, self.mode, self.trans_a, self.trans_b)

    forward = __call__
