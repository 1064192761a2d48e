"""The masked-LM loss without float32 copies of the logits (on GPUs).

``F.cross_entropy(scores.float(), labels)`` over BERT's ``[masked tokens, 30522]`` logits makes
a float32 copy of them, its log-softmax, and in the backward a zero-filled gradient, the
log-softmax's gradient and a cast back: about ten passes over a tensor of 600M numbers at
4096 x32 tokens. ``masked_lm_cross_entropy`` reads the bf16 logits once forward (each row's
log-sum-exp and its loss) and once backward (writing the gradient, ``softmax - onehot`` over
the row count, in the logits' dtype), computing in float32 throughout. It saves the logits and
the log-sum-exps for the backward, not a float32 tensor.

Shapes: ``scores`` ``[rows, classes]`` float (any strides with a unit last one), ``labels``
int64 ``[rows]`` each in ``[0, classes)`` (the masked positions only: no ignored label); the
loss is the float32 mean over the rows, as ``F.cross_entropy``'s. The fused path runs for
CUDA tensors outside ``torch.compile``; elsewhere ``F.cross_entropy(scores.float(), labels)``
itself runs.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from sparse_attn.ops.launch import Launcher

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - a PyTorch without Triton: the plain loss only
    triton = None

__all__ = ["masked_lm_cross_entropy", "fused_cross_entropy", "reference"]

#: devices whose tensors take the fused kernels (the tests add "cpu" under the interpreter)
FUSED_DEVICES = ("cuda",)
#: classes per step of a row's loop
BLOCK = 4096


if triton is not None:
    @triton.jit
    def cross_entropy_fwd_kernel(X, LABELS, LOSS, LSE, n_classes, stride_x,
                                 BLOCK: tl.constexpr):
        """One row: its log-sum-exp (online max and sum over BLOCK-wide steps, one
        exponential a logit) and its loss, log-sum-exp less the label's logit."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        cols = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, n_classes, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < n_classes,
                        other=float("-inf")).to(tl.float32)
            # every step has a class (start < n_classes): m_new is finite
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        label = tl.load(LABELS + row)
        picked = tl.load(x_row + label).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, lse - picked)

    @triton.jit
    def cross_entropy_bwd_kernel(X, LABELS, LSE, GRAD_OUT, DX, n_classes, stride_x, stride_dx,
                                 inv_rows, BLOCK: tl.constexpr):
        """One row's gradient of the mean loss: (softmax - onehot(label)) * GRAD_OUT / rows."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        lse = tl.load(LSE + row)
        label = tl.load(LABELS + row)
        scale = tl.load(GRAD_OUT).to(tl.float32) * inv_rows
        for start in range(0, n_classes, BLOCK):
            inside = start + cols < n_classes
            x = tl.load(X + row * stride_x + start + cols, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
            tl.store(DX + row * stride_dx + start + cols, (g * scale).to(DX.dtype.element_ty),
                     mask=inside)


_FWD = Launcher(sys.modules[__name__], "cross_entropy_fwd_kernel")
_BWD = Launcher(sys.modules[__name__], "cross_entropy_bwd_kernel")


class _CrossEntropy(torch.autograd.Function):
    """``(scores [rows, classes], labels [rows])`` -> the float32 mean loss."""

    @staticmethod
    def forward(ctx, scores, labels):
        rows, classes = scores.shape
        loss = torch.empty(rows, dtype=torch.float32, device=scores.device)
        lse = torch.empty_like(loss)
        _FWD((rows,), scores, labels, loss, lse, classes, scores.stride(0), BLOCK=BLOCK,
             num_warps=8)
        ctx.save_for_backward(scores, labels, lse)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_out):
        scores, labels, lse = ctx.saved_tensors
        rows, classes = scores.shape
        dx = torch.empty_like(scores, memory_format=torch.contiguous_format)
        _BWD((rows,), scores, labels, lse, grad_out.reshape(1), dx, classes, scores.stride(0),
             dx.stride(0), 1.0 / rows, BLOCK=BLOCK, num_warps=8)
        return dx, None


def fused_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fused kernels on any tensors Triton runs on: ``F.cross_entropy(scores.float(),
    labels)`` (mean over the rows) without float32 copies of ``scores``."""
    if scores.dim() != 2 or labels.shape != scores.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"scores must be [rows, classes] and labels int64 [rows], got "
                         f"{list(scores.shape)} and {labels.dtype} {list(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("no rows: the mean loss of zero masked tokens is undefined")
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    # a label out of range would read another row's logit: an error, as F.cross_entropy's
    # (checked on the device, without a host sync)
    torch._assert_async(((labels >= 0) & (labels < scores.shape[1])).all(),
                        "masked-LM labels must be class indices in [0, vocab_size)")
    return _CrossEntropy.apply(scores, labels)


def masked_lm_cross_entropy(scores: torch.Tensor, labels: torch.Tensor,
                            fused: bool = True) -> torch.Tensor:
    """The masked-LM loss: the fused kernels where they run (``fused``, CUDA, not compiling,
    at least one row), else ``F.cross_entropy(scores.float(), labels)``."""
    if (fused and triton is not None and scores.device.type in FUSED_DEVICES
            and not torch.compiler.is_compiling() and scores.dim() == 2
            and scores.shape[0] > 0 and scores.is_floating_point()):
        return fused_cross_entropy(scores, labels)
    return F.cross_entropy(scores.float(), labels)


def reference(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The float64 oracle."""
    return F.cross_entropy(scores.double(), labels)
