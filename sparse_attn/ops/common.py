"""What every op shares: the interpreter switch, the backend choice, and the checks of block
sizes, dtypes and layouts that MatMul, Softmax and the attention entry points apply, each
with one message."""
import operator
import os
import weakref

import torch

from .caching import layout_digest

__all__ = ["BLOCKS", "interpreting", "triton_available", "needs_upcast", "dot_precision",
           "resolve_backend",
           "as_block", "check_dtype", "check_layout", "canonical_layout", "LayoutOp"]

BLOCKS = (16, 32, 64, 128)
BACKENDS = ("auto", "triton", "torch")

# Triton reads TRITON_INTERPRET when a kernel is defined, so reading it once is enough.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (on CPU tensors)."""
    return _INTERPRET


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - depends on the install
        return False


def needs_upcast(t: torch.Tensor) -> bool:
    """Whether a kernel must compute ``t``'s bfloat16 products in float32: the interpreter
    gets bfloat16 dots wrong (numpy has no bfloat16); a GPU takes them as they are."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def dot_precision(t: torch.Tensor) -> str:
    """Input precision of a kernel's products for operands like ``t``: float32 is computed
    at float32 precision ("ieee") unless the user allows TF32
    (``torch.backends.cuda.matmul.allow_tf32``, PyTorch's switch for its own matmuls)."""
    if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def resolve_backend(requested, device, default="auto"):
    """"triton" or "torch" for tensors on ``device`` (``requested`` None: ``default``)."""
    b = requested or default
    if b not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {b!r}")
    if b == "auto":
        if triton_available() and (device.type == "cuda"
                                   or (device.type == "cpu" and interpreting())):
            return "triton"
        return "torch"
    if b == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if device.type == "cpu" and not interpreting():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "sparse_attn's kernels are imported; use backend='torch' on CPU")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not run on device {device}")
    return b


def as_block(block, who):
    """The block size as a Python int, or ValueError."""
    try:
        b = operator.index(block) if not isinstance(block, bool) else None
    except TypeError:
        b = None
    if b not in BLOCKS:
        raise ValueError(f"{who}: argument 'block' is {block!r}; allowed: {BLOCKS}")
    return b


def check_dtype(who, name, t, allowed=(torch.float32, torch.float16, torch.bfloat16)):
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{who}: argument '{name}' has dtype {t.dtype}; supported: {names}")


def check_layout(layout, block, who):
    """The layout as a CPU int64 0/1 tensor [heads, rows, cols], or ValueError."""
    if not torch.is_tensor(layout):
        raise ValueError(f"{who}: argument 'layout' must be a torch tensor [heads, rows, cols], "
                         f"got {type(layout).__name__}")
    if layout.dim() != 3:
        raise ValueError(f"{who}: argument 'layout' has shape {tuple(layout.shape)}; expected 3 "
                         "dimensions [heads, rows/block, cols/block]")
    as_block(block, who)
    lay = layout.detach().to("cpu")
    if lay.is_complex() or not bool(((lay == 0) | (lay == 1)).all()):
        raise ValueError(f"{who}: argument 'layout' must hold only 0 and 1")
    return lay.to(torch.int64).contiguous()


_LAYOUT_SEEN: dict = {}


def canonical_layout(layout, block, who):
    """(CPU int64 layout, content key), remembered per layout object and version so that
    building a MatMul/Softmax per call costs no device copy (and no sync) after the first."""
    block = as_block(block, who)
    if torch.is_tensor(layout):
        hit = _LAYOUT_SEEN.get(id(layout))
        if hit is not None and hit[0]() is layout and hit[1] == layout._version:
            return hit[2], hit[3]
    lay = check_layout(layout, block, who)
    key = layout_digest(lay)
    if len(_LAYOUT_SEEN) > 4096:
        _LAYOUT_SEEN.clear()
    _LAYOUT_SEEN[id(layout)] = (weakref.ref(layout), layout._version, lay, key)
    return lay, key


class LayoutOp:
    """What MatMul and Softmax share: a checked layout and block, and their operators per
    (backend, device), built once by the subclass's ``_make_ops(backend, device)``."""

    def __init__(self, layout, block, backend, who):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{who}: argument 'backend' is {backend!r}; allowed: {BACKENDS}")
        self.layout, self._key = canonical_layout(layout, block, who)
        self.block = as_block(block, who)
        self.backend = backend
        self.spdims = tuple(self.layout.shape)
        self.nnz = int(self.layout.sum())
        self._ops = {}

    def _get_ops(self, backend, device):
        key = (backend, str(device))
        ops = self._ops.get(key)
        if ops is None:
            ops = self._ops[key] = self._make_ops(backend, device)
        return ops
