"""Residual add, dropout and LayerNorm as one kernel forward and one backward (on GPUs).

Each block of a pre-LayerNorm BERT layer ends with ``s = residual + dropout(h)``, and the next
block starts by normalizing ``s``. Eager PyTorch runs that as three kernels forward (dropout,
add, LayerNorm) and four backward (LayerNorm's input and weight gradients, the dropout's, the
sum of the two gradients that reach ``s``), each a pass over a ``[tokens, hidden]`` tensor;
``add_dropout_norm`` makes one pass each way (and a small reduce of the LayerNorm weight and
bias gradients), and keeps no dropout mask: the backward draws the same mask again from the
same Philox counters.

The mask comes from the device's default generator as ``F.dropout``'s does: a call takes the
generator's seed and offset and advances the offset, so ``torch.manual_seed`` makes a run
repeat, and ``torch.utils.checkpoint`` (which restores the generator) replays the mask when it
recomputes a layer. It is not the mask ``F.dropout`` would draw; its distribution is the same.

Shapes: ``residual`` and ``h`` ``[..., hidden]`` of one float dtype; ``s`` and the
normalized output have their shape and dtype; the statistics are float32. The fused path runs
for CUDA tensors outside ``torch.compile`` and autocast (where inductor fuses the plain ops
itself, or LayerNorm computes in float32); everywhere else the plain ops run.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional, Tuple

import torch
from torch import nn

from sparse_attn.ops.launch import Launcher

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - a PyTorch without Triton: the plain ops only
    triton = None

__all__ = ["add_dropout_norm", "fused_add_dropout_norm", "keep_mask", "reference"]

#: devices whose tensors take the fused kernels (the tests add "cpu" under the interpreter)
FUSED_DEVICES = ("cuda",)
#: elements of one forward tile (rows x the hidden size rounded up to a power of two)
TILE_ELEMENTS = 4096
#: the largest hidden size the fused path takes (a whole row is held in one tile)
MAX_HIDDEN = 8192
# straight into the compiled kernels after their first launch (``sparse_attn.ops.launch``):
# ``kernel[grid]`` costs ~35 us of host time a launch, 48 launches a BERT-base step
_FWD = Launcher(sys.modules[__name__], "add_dropout_norm_fwd_kernel")
_BWD = Launcher(sys.modules[__name__], "add_dropout_norm_bwd_kernel")


if triton is not None:
    @triton.jit
    def _keep(seed, call, rows, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The dropout keep mask ``[BLOCK_M, BLOCK_N]`` of ``rows`` (int64 ``[BLOCK_M]``): True
        with probability 1 - p. Column c of row r takes word c % 4 of one Philox-4x32 draw with
        key ``seed`` and counter (r * BLOCK_N / 4 + c // 4, ``call``)."""
        quarter = rows[:, None] * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)[None, :]
        lo = quarter.to(tl.uint32)
        hi = (quarter >> 32).to(tl.uint32)
        zero = lo * 0
        call = call.to(tl.int64)
        call_lo = zero + call.to(tl.uint32)
        call_hi = zero + (call >> 32).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, lo, hi, call_lo, call_hi)
        # 24 random bits a column: uniform on [0, 1), exact in float32
        u0 = (r0 >> 8).to(tl.float32)
        u1 = (r1 >> 8).to(tl.float32)
        u2 = (r2 >> 8).to(tl.float32)
        u3 = (r3 >> 8).to(tl.float32)
        u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
        return u * (1.0 / 16777216.0) >= p

    @triton.jit(do_not_specialize=["seed", "call"])
    def keep_mask_kernel(KEEP, n_rows, N, p, seed, call,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        inside = (rows < n_rows)[:, None] & (cols < N)[None, :]
        keep = _keep(seed, call, rows, p, BLOCK_M, BLOCK_N)
        tl.store(KEEP + rows[:, None] * N + cols[None, :], keep.to(tl.int8), mask=inside)

    @triton.jit(do_not_specialize=["seed", "call"])
    def add_dropout_norm_fwd_kernel(R, H, S, Y, W, B, MEAN, RSTD, n_rows, N, eps, p, scale,
                                    seed, call, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    DROPOUT: tl.constexpr, NORM: tl.constexpr):
        """One tile of BLOCK_M rows: S = R + dropout(H); with NORM also Y = LayerNorm(S), its
        mean and 1/std (of S as stored, so that the backward sees the same numbers)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_in = rows < n_rows
        col_in = cols < N
        inside = row_in[:, None] & col_in[None, :]
        offs = rows[:, None] * N + cols[None, :]
        h = tl.load(H + offs, mask=inside, other=0.0).to(tl.float32)
        if DROPOUT:
            h = tl.where(_keep(seed, call, rows, p, BLOCK_M, BLOCK_N), h * scale, 0.0)
        s = (tl.load(R + offs, mask=inside, other=0.0).to(tl.float32) + h).to(S.dtype.element_ty)
        tl.store(S + offs, s, mask=inside)
        if NORM:
            s = s.to(tl.float32)
            mean = tl.sum(s, axis=1) / N
            centered = tl.where(inside, s - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
            w = tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=col_in, other=0.0).to(tl.float32)
            y = centered * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)
            tl.store(MEAN + rows, mean, mask=row_in)
            tl.store(RSTD + rows, rstd, mask=row_in)

    @triton.jit(do_not_specialize=["seed", "call"])
    def add_dropout_norm_bwd_kernel(DY, DS, S, W, MEAN, RSTD, DR, DH, DWB, n_rows, N, p,
                                    scale, seed, call, tiles_per_program,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    DROPOUT: tl.constexpr, NORM: tl.constexpr,
                                    HAS_DS: tl.constexpr):
        """``tiles_per_program`` consecutive tiles of BLOCK_M rows. The gradient reaching S
        (DS plus, with NORM, LayerNorm's input gradient from DY) is R's gradient (DR, stored
        with NORM only: without it DR is DS itself); DH is it through the same dropout mask.
        With NORM the program's sums of DY * normalized S and of DY go to row
        ``program_id`` of DWB[0] and DWB[1] (float32 ``[2, programs, N]``)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_in = cols < N
        if NORM:
            w = tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(0, tiles_per_program):
            rows = (pid * tiles_per_program + t).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_in = rows < n_rows
            inside = row_in[:, None] & col_in[None, :]
            offs = rows[:, None] * N + cols[None, :]
            if HAS_DS:
                g = tl.load(DS + offs, mask=inside, other=0.0).to(tl.float32)
            else:
                g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if NORM:
                mean = tl.load(MEAN + rows, mask=row_in, other=0.0)
                rstd = tl.load(RSTD + rows, mask=row_in, other=0.0)
                s = tl.load(S + offs, mask=inside, other=0.0).to(tl.float32)
                normed = tl.where(inside, (s - mean[:, None]) * rstd[:, None], 0.0)
                dy = tl.load(DY + offs, mask=inside, other=0.0).to(tl.float32)
                wdy = dy * w[None, :]
                c1 = tl.sum(normed * wdy, axis=1) / N
                c2 = tl.sum(wdy, axis=1) / N
                g += (wdy - normed * c1[:, None] - c2[:, None]) * rstd[:, None]
                dw += dy * normed
                db += dy
                tl.store(DR + offs, g.to(DR.dtype.element_ty), mask=inside)
            if DROPOUT:
                g = tl.where(_keep(seed, call, rows, p, BLOCK_M, BLOCK_N), g * scale, 0.0)
            tl.store(DH + offs, g.to(DH.dtype.element_ty), mask=inside)
        if NORM:
            tl.store(DWB + pid * N + cols, tl.sum(dw, axis=0), mask=col_in)
            tl.store(DWB + (tl.num_programs(0) + pid) * N + cols, tl.sum(db, axis=0),
                     mask=col_in)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv costs ~10 us a call from Python (a constexpr function)


@functools.lru_cache(maxsize=None)
def _tile(n: int) -> Tuple[int, int]:
    """(rows, columns) of a tile for a hidden size ``n``: columns the next power of two."""
    block_n = max(16, 1 << (n - 1).bit_length())
    return max(1, TILE_ELEMENTS // block_n), block_n


_SMS = {}


def _programs(device: torch.device, tiles: int) -> int:
    """Backward programs: a few per multiprocessor (each writes one row of the weight
    gradients' partial sums), at most one per tile."""
    if device.type != "cuda":
        return max(1, min(tiles, 4))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(tiles, 4 * _SMS[index]))


#: XORed into the generator's seed: PyTorch's dropout kernels draw Philox words with the seed
#: itself as the key, so a key of our own keeps their words and ours from coinciding
KEY_SALT = 0x9E3779B97F4A7C15


def next_philox(device: torch.device) -> Tuple[int, int]:
    """(seed, call) for one dropout mask on ``device``, taken from its default generator as a
    dropout kernel takes it (CUDA: the generator's seed and offset, the offset advanced by 4;
    CPU, the interpreter's tests: two draws of the CPU generator). No device sync."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        call = gen.get_offset()
        gen.set_offset(call + 4)
        return (gen.initial_seed() ^ KEY_SALT) & (2 ** 63 - 1), call
    seed, call = torch.randint(0, 2 ** 62, (2,)).tolist()
    return seed, call


def keep_mask(n_rows: int, n: int, p: float, seed: int, call: int,
              device: torch.device) -> torch.Tensor:
    """The dropout keep mask (bool ``[n_rows, n]``) that the kernels draw for these rows, seed
    and call: what the tests build their reference with."""
    block_m, block_n = _tile(n)
    keep = torch.empty(n_rows, n, dtype=torch.int8, device=device)
    keep_mask_kernel[(_cdiv(n_rows, block_m),)](keep, n_rows, n, float(p), seed, call,
                                                      BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()


class _AddDropoutNorm(torch.autograd.Function):
    """``(residual, h, weight, bias, p, eps, seed, call)`` -> ``s`` (``weight`` None) or
    ``(s, LayerNorm(s))``; contiguous ``[..., n]`` inputs, taken as ``[rows, n]`` (no views:
    each would be one more autograd node a call)."""

    @staticmethod
    def forward(ctx, residual, h, weight, bias, p, eps, seed, call):
        n = residual.shape[-1]
        rows = residual.numel() // n
        block_m, block_n = _tile(n)
        norm = weight is not None
        s = torch.empty_like(residual)
        y = torch.empty_like(residual) if norm else s
        mean = torch.empty(rows if norm else 0, dtype=torch.float32, device=residual.device)
        rstd = torch.empty_like(mean)
        _FWD((_cdiv(rows, block_m),),
             residual, h, s, y, weight if norm else s, bias if norm else s, mean, rstd, rows, n,
             float(eps), float(p), 1.0 / (1.0 - p), seed, call, BLOCK_M=block_m,
             BLOCK_N=block_n, DROPOUT=p > 0, NORM=norm, num_warps=8 if block_n >= 1024 else 4)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(s if norm else None, weight, mean, rstd)
        ctx.meta = (p, seed, call, norm, bias.dtype if norm else None)
        return (s, y) if norm else s

    @staticmethod
    def backward(ctx, ds, dy=None):
        s, weight, mean, rstd = ctx.saved_tensors
        p, seed, call, norm, bias_dtype = ctx.meta
        if norm and dy is None:  # only s was used: LayerNorm contributes nothing
            norm = False
        if ds is None and not norm:
            return (None,) * 8
        if not norm and p == 0:
            return ds, ds, None, None, None, None, None, None
        # the kernel reads and writes rows: upstream gradients may come with other strides
        ds = ds.contiguous() if ds is not None else None
        dy = dy.contiguous() if norm else None
        ref = ds if ds is not None else dy
        n = ref.shape[-1]
        rows = ref.numel() // n
        block_m, block_n = _tile(n)
        tiles = _cdiv(rows, block_m)
        programs = _programs(ref.device, tiles)
        per_program = _cdiv(tiles, programs)
        programs = _cdiv(tiles, per_program)
        dr = torch.empty_like(ref) if norm else ds
        dh = torch.empty_like(ref) if p > 0 else dr
        partial = torch.empty(2, programs if norm else 1, n, dtype=torch.float32,
                              device=ref.device)
        stand_in = partial  # for the pointers a constexpr switch leaves unread
        _BWD((programs,),
             dy if norm else stand_in, ds if ds is not None else stand_in,
             s if norm else stand_in, weight if norm else stand_in,
             mean, rstd, dr, dh, partial, rows, n, float(p),
             1.0 / (1.0 - p), seed, call, per_program, BLOCK_M=block_m, BLOCK_N=block_n,
             DROPOUT=p > 0, NORM=norm, HAS_DS=ds is not None,
             num_warps=8 if block_n >= 1024 else 4)
        dw = db = None
        if norm:  # one reduce (and one cast) for both
            dw, db = partial.sum(1).to(weight.dtype).unbind(0)
            db = db if bias_dtype == weight.dtype else db.to(bias_dtype)
        return dr, dh, dw, db, None, None, None, None


def fused_add_dropout_norm(residual: torch.Tensor, h: torch.Tensor, p: float,
                           weight: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None, eps: float = 1e-12,
                           seed: Optional[int] = None, call: Optional[int] = None):
    """The fused kernels on any tensors Triton runs on: ``s = residual + dropout(h, p)``, and
    with ``weight`` (and ``bias``, ``[n]``) also ``LayerNorm(s)``; returns ``(s, normed)``
    (``normed`` None without ``weight``). ``seed``/``call`` pick the mask (default: the next
    of the device's generator, ``next_philox``). Gradients reach ``residual``, ``h``,
    ``weight`` and ``bias``."""
    if residual.shape != h.shape or residual.dtype != h.dtype:
        raise ValueError(f"residual and h must have one shape and dtype, got "
                         f"{list(residual.shape)} {residual.dtype} and {list(h.shape)} {h.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n = residual.shape[-1]
    if weight is not None and (weight.shape != (n,) or bias is None or bias.shape != (n,)):
        raise ValueError(f"LayerNorm weight and bias must both be [{n}], got "
                         f"{None if weight is None else list(weight.shape)} and "
                         f"{None if bias is None else list(bias.shape)}")
    if p > 0 and (seed is None or call is None):
        seed, call = next_philox(residual.device)
    out = _AddDropoutNorm.apply(residual.contiguous(), h.contiguous(), weight, bias, float(p),
                                float(eps), int(seed or 0), int(call or 0))
    return (out, None) if weight is None else out


def _fusable(residual, h, norm) -> bool:
    if triton is None or residual.device.type not in FUSED_DEVICES:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(residual.device.type):
        return False
    if residual.shape != h.shape or residual.dtype != h.dtype or not residual.is_floating_point():
        return False
    if residual.shape[-1] > MAX_HIDDEN:  # a row is one tile: past this it would spill
        return False
    return norm is None or (norm.weight is not None and norm.bias is not None
                            and tuple(norm.normalized_shape) == (residual.shape[-1],))


def add_dropout_norm(residual: torch.Tensor, h: torch.Tensor, dropout: nn.Dropout,
                     norm: Optional[nn.LayerNorm] = None, fused: bool = True):
    """``s = residual + dropout(h)`` and ``norm(s)`` (None without ``norm``), as
    ``(s, normed)``: the fused kernels where they run (``fused`` and ``_fusable``), else the
    modules themselves."""
    p = dropout.p if dropout.training else 0.0
    if fused and _fusable(residual, h, norm):
        if norm is None:
            return fused_add_dropout_norm(residual, h, p)
        return fused_add_dropout_norm(residual, h, p, norm.weight, norm.bias, norm.eps)
    s = residual + dropout(h)
    return s, (norm(s) if norm is not None else None)


def reference(residual, h, keep, p, weight=None, bias=None, eps=1e-12):
    """The float64 oracle: ``(s, LayerNorm(s) or None)`` with the keep mask ``keep``."""
    r, x = residual.double(), h.double()
    s = r + torch.where(keep, x / (1.0 - p), torch.zeros_like(x)) if p > 0 else r + x
    if weight is None:
        return s, None
    return s, torch.nn.functional.layer_norm(s, s.shape[-1:], weight.double(), bias.double(),
                                             eps)
