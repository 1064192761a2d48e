"""Fused block-sparse flash attention: look-up tables, autograd and the public function.

    out = fused_block_sparse_attention(q, k, v, layout, block, scale=None, causal=False,
                                       key_padding_mask=None)

One Triton kernel computes the forward pass: for each query tile it loops over the nonzero
key tiles of its row of the layout with an online softmax, never writing the block-sparse
score tensor to memory. The backward pass is FlashAttention-2 style: one kernel for dQ (over
the row look-up table; it also writes delta = rowsum(dO * O)) and one for dK/dV (over the
column look-up table: the query tiles that see a key tile).

On GPUs with TMA (compute capability 9+) the kernels move their tiles with it, through host
tensor descriptors (bit-identical results; the pointer path stays for older GPUs, the
interpreter and misaligned tensors).

Tiles are tensor-core sized (64 or 128 rows/columns). A layout whose block is smaller than a
tile (block 16 or 32) runs on the tile-level layout (a tile is visited when any of its
blocks is nonzero) and the empty blocks inside a visited tile are masked in registers from a
per-tile bit mask. Tiles that are entirely kept run with no mask at all.

Supported: CUDA tensors (or CPU tensors when TRITON_INTERPRET=1), float16 and bfloat16,
head_dim 32, 64 or 128, any power-of-two block >= 16 (DeepSpeed's 16, 32, 64, 128), a
different layout per head. float32 inputs are rejected (ValueError): use the three-kernel
path, or cast to bf16. `fused_supported` says, without raising, whether a call can take this
path and why not.

Look-up tables are built the first time a layout is seen (device ops and one host sync for
the work list) and cached on the device per (layout tensor, block, tile sizes, seq, causal,
device); a call that hits the cache does no host sync in forward or backward. Rows (columns)
of the LUT much longer than the average, such as BigBird's global rows and columns, are cut
into several work items that run in parallel and leave fp32 partial results: in the
forward the row's last item to finish merges them (an arrival counter per split row, zeroed
for every call, so calls on other streams or in other CUDA graphs never share one); in the
backward a small kernel sums them. The cache holds a reference to the layout and keys on
its storage, shape, strides and version counter, so views of one layout hit and an in-place
change of the layout rebuilds.

An eager call is cheap on the host: its signature (shapes, strides, dtypes and devices of the
inputs and the mask; the layout; block, scale, causal) is checked once and worked out into a
plan (LUTs, tile configs, every scalar kernel argument, ``launch.Prepared`` launches), and a
later call with the same signature only allocates its outputs and launches. Plans are cached
per caller (``plan(tag, ...)``), because the public function and the dispatcher accept
different inputs. The op is registered
as ``torch.ops.sparse_attn.fused_attention_fwd`` / ``..._bwd`` (torch.library.custom_op,
with fake and autograd registrations), so ``torch.compile`` traces it without graph breaks.
"""
import os
from collections import OrderedDict
from typing import Optional

import torch

try:
    import triton
    from .kernels import fused_attention as _k
    _HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing
    triton = None
    _k = None
    _HAVE_TRITON = False
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - a Triton without host tensor descriptors
    TensorDescriptor = None

from .caching import build_outside_graph_pools, layout_identity
from .launch import Launcher, direct_context

# launched as _fwd_kernel(grid, *args, **constexprs): Triton's launcher, minus its per-launch
# bookkeeping once a specialization has been compiled (see launch.py)
_fwd_kernel = Launcher(_k, "fused_attn_fwd_kernel")
_dq_kernel = Launcher(_k, "fused_attn_bwd_dq_kernel")
_dkdv_kernel = Launcher(_k, "fused_attn_bwd_dkdv_kernel")
_reduce_kernel = Launcher(_k, "fused_attn_bwd_reduce_kernel")


__all__ = ["fused_block_sparse_attention", "fused_supported", "FusedBlockSparseAttention",
           "set_fused_config"]

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 128)

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, one_loop[, maxnreg]]) per kernel. BLOCK_M is the
# query tile, BLOCK_N the key tile; maxnreg caps registers per thread (None: the compiler's
# choice). Keyed by head_dim, then by block (None = any block). Chosen by
# scripts/bench_attention.py and benchmarks/experiments/ on an H100 (see
# benchmarks/NOTES_fused.md). The 64x64 backward kernels at head_dim 64 run 3-6% faster capped
# at 168 registers (three programs per SM instead of two; exp_maxnreg.py). With TMA loads
# (H200, exp_fwd_tiles_tma.py) the head_dim-64 forward is best at 64x64 tiles and 2 stages
# for blocks 64 and 128 (block 128: 5-10% faster than the 128x64 tiles of 8 warps it had).
_BWD64 = (64, 64, 4, 3, False, 168)
_CONFIGS = {
    32: {None: dict(fwd=(128, 64, 4, 3), dq=(128, 64, 4, 3), dkdv=(64, 64, 4, 3))},
    64: {None: dict(fwd=(64, 64, 4, 2), dq=_BWD64, dkdv=_BWD64),
         16: dict(fwd=(64, 32, 4, 3), dq=(64, 32, 4, 3), dkdv=(32, 64, 4, 3)),
         32: dict(fwd=(64, 64, 4, 3), dq=(64, 64, 4, 3), dkdv=(32, 64, 4, 3)),
         128: dict(fwd=(64, 64, 4, 2), dq=_BWD64, dkdv=_BWD64)},
    128: {None: dict(fwd=(128, 64, 8, 3), dq=(128, 64, 8, 2), dkdv=(64, 64, 8, 2))},
}
_OVERRIDE = {}

# Kernels that move tiles by TMA, through host tensor descriptors, on GPUs that have it
# (compute capability 9+): one copy instruction per tile instead of a [rows, head_dim] address
# tensor. The forward loads Q, K, V and stores O so; dq loads K, V; dk/dv loads Q, dO. H200,
# bf16, head_dim 64: forward+backward 3-5% faster (benchmarks/NOTES_fused.md). Outputs are
# bit-identical to the pointer path, which stays for older GPUs, the interpreter, and tensors
# whose base or strides are not 16-byte aligned.
# A descriptor argument costs host time at every launch, though: with Triton 3.6, 3-4 us to
# build and about 4 us more in Triton's launcher, which encodes it (H200 host: a forward
# launch took 14 us with pointers and 48 us with its four descriptors;
# benchmarks/experiments/probe_tma_host2_h200.log), and an eager batch-1 BERT step is bound
# by host time. So by default a kernel takes its TMA variant only where the GPU time it saves
# is what counts: while a CUDA graph is being captured (a replay pays no host cost), and for
# launches of at least _TMA_MIN_WORK multiply-adds per tile product (B x tiles x BLOCK_M x
# BLOCK_N x head_dim; 2**34 is 64k tiles of 64 x 64 x 64, some 250 us of forward on an
# H200), which keep the GPU busy well past the host's launch work; and at a plan's first call
# (see _Launches). set_fused_config(tma=...) forces it either way, at every launch.
_KERNELS = ("fwd", "dq", "dkdv")
_TMA_DEFAULT = frozenset(_KERNELS)
_TMA = None  # None: _TMA_DEFAULT on GPUs with TMA, nothing in the interpreter; else forced
_TMA_MIN_WORK = 1 << 34


def set_fused_config(head_dim=None, block=None, *, split_min=None, tma=None, **kernels):
    """Override tile configs, e.g. ``set_fused_config(64, 16, fwd=(128, 32, 4, 3))``, the
    shortest run of tiles a LUT row is cut into (``split_min``; rows up to that length are
    never split, which saves the merge work at the cost of one long program), or which
    kernels load tiles by TMA (``tma``: True, False, or some of "fwd", "dq", "dkdv"; wherever
    it can run: a GPU of compute capability 9+, or the interpreter; at every launch, not only
    the large or graph-captured ones that the default picks).

    ``set_fused_config()`` with no argument clears every override. Used by the benchmarks.
    """
    global _SPLIT_MIN, _TMA
    _CONFIG_CACHE.clear()
    _PLANS.clear()
    if head_dim is None and split_min is None and tma is None and not kernels:  # reset
        _OVERRIDE.clear()
        _TMA = None
        if _SPLIT_MIN != _SPLIT_MIN_DEFAULT:
            _SPLIT_MIN = _SPLIT_MIN_DEFAULT
            clear_lut_cache()
        return
    if tma is not None:
        names = _KERNELS if tma is True else () if tma is False else tuple(tma)
        bad = [n for n in names if n not in _KERNELS]
        if bad or isinstance(tma, str):
            raise ValueError(f"tma must be True, False or some of {_KERNELS}, got {tma!r}")
        _TMA = frozenset(names)
    if split_min is not None:
        if not isinstance(split_min, int) or isinstance(split_min, bool) or split_min < 1:
            raise ValueError(f"split_min must be a positive int, got {split_min!r}")
        _SPLIT_MIN = split_min
        clear_lut_cache()
    if kernels:
        if head_dim not in _CONFIGS:
            raise ValueError(f"tile configs need head_dim in {tuple(_CONFIGS)}, got {head_dim!r}")
        for name, cfg in kernels.items():
            if name not in ("fwd", "dq", "dkdv"):
                raise ValueError(f"tile configs are for the kernels 'fwd', 'dq' and 'dkdv', "
                                 f"got {name!r}")
            _tiles(cfg)
        _OVERRIDE.setdefault((head_dim, block), {}).update(kernels)


def _tiles(cfg):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, one_loop[, maxnreg]]) -> 6-tuple. one_loop
    sends every tile through the masked loop instead of a mask-free loop over full tiles then
    a masked one (fewer pipeline fills when rows are short and mostly partial)."""
    if not 4 <= len(cfg) <= 6:
        raise ValueError(f"a tile config is (BLOCK_M, BLOCK_N, num_warps, num_stages"
                         f"[, one_loop[, maxnreg]]), got {cfg!r}")
    return tuple(cfg) + (False, None)[len(cfg) - 4:]


_CONFIG_CACHE = {}


def _config(head_dim, block):
    """{kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages, one_loop)}, overrides applied."""
    cfg = _CONFIG_CACHE.get((head_dim, block))
    if cfg is None:
        table = _CONFIGS[head_dim]
        cfg = dict(table.get(block, table[None]))
        cfg.update(_OVERRIDE.get((head_dim, None), {}))
        cfg.update(_OVERRIDE.get((head_dim, block), {}))
        cfg = _CONFIG_CACHE[(head_dim, block)] = {name: _tiles(c) for name, c in cfg.items()}
    return cfg


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def _interpret():
    # Triton reads the variable when a kernel is defined, so reading it once is enough
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tma_kernels(device):
    """The kernels that may load tiles by TMA on this device (see _TMA)."""
    if TensorDescriptor is None:
        return frozenset()
    if _interpret():
        return _TMA if _TMA is not None else frozenset()
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return frozenset()
    return _TMA if _TMA is not None else _TMA_DEFAULT


def _tma_strides_ok(strides, elem):
    """Whether these strides (in elements of ``elem`` bytes) are multiples of 16 bytes, as a
    TMA descriptor's strides must be."""
    return all(s * elem % 16 == 0 for s in strides)


def _tma_layout_ok(t):
    """Whether a TMA descriptor can describe t ([B, H, N, D], last stride 1): every other
    stride a multiple of 16 bytes (the base is checked per call)."""
    return t.stride(-1) == 1 and _tma_strides_ok(t.stride()[:-1], t.element_size())


def _descriptor(t, rows):
    """Host TMA descriptor over t [B, H, N, D] for tiles of ``rows`` rows of one (b, h)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


class _Launches:
    """The launches of one kernel of a plan: ``pointer``, ``tma`` (None where the plan cannot
    use TMA), ``always`` (take the TMA launch at every call: forced, or work of at least
    _TMA_MIN_WORK; else only while a CUDA graph is being captured) and ``tma_ready`` (the
    TMA launch has run once, so its kernel is compiled and loaded: a capture must not be
    the first to load it, so the first call takes it whatever the rule says)."""

    __slots__ = ("pointer", "tma", "always", "tma_ready")

    def __init__(self, pointer, tma, always):
        self.pointer, self.tma, self.always, self.tma_ready = pointer, tma, always, False


def _launch(launches, ctx, head, tiles, tail):
    """Launch one kernel of a plan (``launches``: a _Launches). The TMA variant gets
    descriptors over ``tiles`` ((tensor, rows) pairs), provided every such tensor's base is
    16-byte aligned; the pointer variant gets None in their place. ``head`` and ``tail``: the
    kernel's arguments before and after them."""
    tma = launches.tma
    if tma is not None and (launches.always or not launches.tma_ready
                            or torch.cuda.is_current_stream_capturing()):
        ptrs = 0
        for t, _ in tiles:
            ptrs |= t.data_ptr()
        if not ptrs & 15:
            launches.tma_ready = True
            return tma.launch(ctx, *head, *[_descriptor(t, rows) for t, rows in tiles], *tail)
    return launches.pointer.launch(ctx, *head, *[None] * len(tiles), *tail)


def fused_supported(q, k, v, *, rpe=None, attn_mask=None, layout=None, block=None):
    """None when ``fused_block_sparse_attention`` can take this call, else a short reason.

    ``layout`` and ``block`` are optional; when given they are checked too.
    """
    if rpe is not None:
        return "rpe is not supported by the fused kernel"
    if attn_mask is not None:
        return "attn_mask is not supported by the fused kernel"
    if not _HAVE_TRITON:
        return "triton is not installed"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} must be 4-D [batch, heads, seq, head_dim], got {tuple(t.shape)}"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} not supported (float16 or bfloat16 only)"
        if t.device.type != "cuda" and not (_interpret() and t.device.type == "cpu"):
            return f"{name} is on {t.device}; needs CUDA (or CPU with TRITON_INTERPRET=1)"
    if not (q.shape == k.shape == v.shape):
        return f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v dtypes differ"
    if not (q.device == k.device == v.device):
        return "q, k, v devices differ"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not supported (32, 64 or 128)"
    if block is not None:
        if not _block_ok(block):
            return f"block {block} not supported (a power of two >= 16)"
        if q.shape[2] % block:
            return f"seq {q.shape[2]} is not a multiple of block {block}"
    if layout is not None:
        nb = q.shape[2] // block if block else None
        if layout.dim() != 3 or layout.shape[0] != q.shape[1] or (
                nb is not None and tuple(layout.shape[1:]) != (nb, nb)):
            return f"layout shape {tuple(layout.shape)} does not match q {tuple(q.shape)}"
    return None


def _block_ok(block):
    return isinstance(block, int) and block >= 16 and (block & (block - 1)) == 0


def _check(q, k, v, layout, block, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the fused kernel takes float16 or "
                             f"bfloat16 (float32 is not supported: cast, or use the "
                             f"three-kernel path)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape [batch, heads, seq, head_dim], got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not (_interpret() and q.device.type == "cpu"):
        raise ValueError(f"q is on {q.device}; the fused kernel needs CUDA tensors (or CPU "
                         f"tensors with TRITON_INTERPRET=1)")
    B, H, N, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim (q.shape[-1]) is {D}; allowed: {SUPPORTED_HEAD_DIMS}")
    if not _block_ok(block):
        raise ValueError(f"block is {block!r}; allowed: a power of two >= 16 (16, 32, 64, 128)")
    if N % block:
        raise ValueError(f"seq (q.shape[2]) = {N} is not a multiple of block = {block}")
    nb = N // block
    if not isinstance(layout, torch.Tensor) or tuple(layout.shape) != (H, nb, nb):
        got = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout)
        raise ValueError(f"layout must be [heads, seq // block, seq // block] = "
                         f"[{H}, {nb}, {nb}], got {got}")
    if layout.dtype.is_floating_point or layout.is_complex():
        raise ValueError(f"layout must be an integer (0/1) or bool tensor, got {layout.dtype}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or \
                not key_padding_mask.dtype.is_floating_point:
            raise ValueError("key_padding_mask must be an additive float tensor [batch, seq] "
                             "(0 keeps, -inf drops)")
        if key_padding_mask.numel() != B * N or key_padding_mask.shape[0] != B or \
                key_padding_mask.shape[-1] != N:
            raise ValueError(f"key_padding_mask must be [batch, seq] = [{B}, {N}] (singleton "
                             f"middle dims allowed), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}; it must be on "
                             f"q's device, {q.device}")


# --------------------------------------------------------------------------------------
# Look-up tables
# --------------------------------------------------------------------------------------
class _Lut:
    """Row- or column-major LUT for one (layout, block, BLOCK_M, BLOCK_N, causal, device) and
    batch size (which sets how long rows are cut into work items)."""
    __slots__ = ("idx", "bits", "nfull", "ntot", "n_tiles", "all_full", "nfull_arg", "work",
                 "n_work", "n_slots", "split", "slot_split", "n_split", "n_own", "n_other",
                 "unit_m", "unit_n", "fine", "bits32")


def _tile_tables(layout, block, TM, TN, N, causal, device):
    """Per tile (i, j): nonzero, full (no mask needed) and the unit bit mask (int64)."""
    H = layout.shape[0]
    L = layout.to(device=device, non_blocking=True).bool()
    ur, uc = min(TM, block), min(TN, block)
    if block > ur:
        L = L.repeat_interleave(block // ur, 1)
    if block > uc:
        L = L.repeat_interleave(block // uc, 2)
    n_qt, n_kt = -(-N // TM), -(-N // TN)
    a, c = TM // ur, TN // uc
    pr, pc = n_qt * a - L.shape[1], n_kt * c - L.shape[2]
    if pr or pc:
        L = torch.nn.functional.pad(L, (0, pc, 0, pr))
    units = L.view(H, n_qt, a, n_kt, c).permute(0, 1, 3, 2, 4).reshape(H, n_qt, n_kt, a * c)
    nz = units.any(-1)
    full = units.all(-1)
    if causal:
        i = torch.arange(n_qt, device=device)[:, None]
        j = torch.arange(n_kt, device=device)[None, :]
        above = j * TN > (i + 1) * TM - 1
        cross = (j + 1) * TN - 1 > i * TM
        nz = nz & ~above
        full = full & ~cross
    fine = a * c > 1
    if fine:
        shifts = torch.arange(a * c, device=device, dtype=torch.int64)
        bits = (units.to(torch.int64) << shifts).sum(-1)
    else:
        bits = None
    return nz, full, bits, (ur, uc, fine, a * c <= 32)


def _split_chunk(total_tiles, device):
    """Target length of one work item, in tiles. ``total_tiles``: the tiles of the whole call
    (every batch). A row (column) of the LUT of length L becomes ceil(L / 1.2 S) near-equal
    items (at least one) that run in parallel and are merged: a BigBird global row
    would otherwise be one program walking the whole row while the GPU idles. S is the
    share of one program slot (an SM holds ~4 programs of these kernels), so that no item
    outlasts what every slot has to do anyway; shorter items only add merge work (H200
    sweep: benchmarks/experiments/exp_chunk.py)."""
    if device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n_sm = 4
    return max(_SPLIT_MIN, -(-total_tiles // (4 * n_sm)))


def _items_per_row(lens, S):
    """Work items of each LUT row (column) of ``lens`` tiles, for target length S:
    ceil(L / 1.2 S), at least one, so that an item is at most 1.2 S long. (round(L / S),
    items of up to 1.5 S, left BigBird 64's 64-tile global rows whole at 4096 x4, where
    they outlast the rest of the grid: H200 forward 96.7 -> 91.4 us,
    benchmarks/experiments/exp_merge2_h200.log.)"""
    return torch.clamp(-(-lens * 5 // (6 * S)), min=1)


_SPLIT_MIN_DEFAULT = 16
_SPLIT_MIN = _SPLIT_MIN_DEFAULT


def _make_lut(nz, full, bits, meta, batch):
    """nz/full/bits [H, n_own, n_other] -> _Lut: per row the tiles, full ones first, and the
    work items (row, lo, hi, slot, first tile), longest first, for a call of ``batch``
    batches (the items are the same in every batch; their length depends on the whole call's
    work). One host sync (the work list), once."""
    H, n_own, n_other = nz.shape
    device = nz.device
    key = nz.to(torch.int8) + full.to(torch.int8)
    order_in_row = torch.sort(key, dim=-1, descending=True, stable=True).indices
    lut = _Lut()
    lut.idx = order_in_row.to(torch.int32).reshape(H * n_own, n_other).contiguous()
    if bits is not None:
        lut.bits = torch.gather(bits, -1, order_in_row).reshape(H * n_own, n_other).contiguous()
    else:
        lut.bits = None  # coarse layout: no masks inside tiles
    lut.nfull = full.sum(-1).to(torch.int32).reshape(-1).contiguous()
    lut.ntot = nz.sum(-1).reshape(-1).to(torch.int32).contiguous()
    counts = torch.stack([lut.ntot, lut.nfull]).cpu().to(torch.int64)  # the one host sync
    lens = counts[0]
    lut.n_tiles = int(lens.sum())  # of one batch
    lut.all_full = bool(counts[1].sum() == lut.n_tiles)  # no tile needs a mask
    lut.nfull_arg = None if lut.all_full else lut.nfull  # the kernels then never read it
    S = _split_chunk(lut.n_tiles * batch, device)
    nc = _items_per_row(lens, S)
    R = lens.numel()
    n_items = int(nc.sum())
    item_row = torch.repeat_interleave(torch.arange(R), nc)
    first = torch.cumsum(nc, 0) - nc
    ci = torch.arange(n_items) - torch.repeat_interleave(first, nc)
    ncr = torch.repeat_interleave(nc, nc)
    lr = torch.repeat_interleave(lens, nc)
    lo = ci * lr // ncr
    hi = (ci + 1) * lr // ncr
    is_split = ncr > 1
    slot = torch.full((n_items,), -1, dtype=torch.int64)
    lut.n_slots = int(is_split.sum())
    slot[is_split] = torch.arange(lut.n_slots)
    # Launch order: items at least half a chunk long first, longest first (they bound the
    # run time); the rest in natural (head, tile) order, so that neighbouring tiles, which
    # share most of their key/value tiles, run together and hit L2.
    ln = hi - lo
    order = torch.sort(torch.where(ln >= (S + 1) // 2, ln, torch.zeros_like(ln)),
                       descending=True, stable=True).indices
    work = torch.stack([item_row[order], lo[order], hi[order], slot[order]]).to(torch.int32)
    work = work.to(device)
    # and each item's first tile, IDX[row, lo] (lo < n_other always; a row with no tile is one
    # item with lo = hi = 0, whose kernel never reads it)
    first_tile = lut.idx[work[0].long(), work[1].long()]
    lut.work = torch.cat([work, first_tile[None]]).contiguous()  # [5, n_work]
    lut.n_work = n_items
    split_rows = torch.nonzero(nc > 1).flatten()
    lut.n_split = split_rows.numel()
    s_start = slot[first[split_rows]] if lut.n_split else torch.zeros(0, dtype=torch.int64)
    split = torch.stack([split_rows, s_start, nc[split_rows]]).to(torch.int32)
    lut.split = split.to(device).contiguous()  # [3, n_split]: row, first slot, items
    # split row of each slot (slots run row by row, nc[row] of them per split row)
    lut.slot_split = torch.repeat_interleave(
        torch.arange(lut.n_split), nc[split_rows]).to(torch.int32).to(device).contiguous()
    lut.n_own, lut.n_other = n_own, n_other
    lut.unit_m, lut.unit_n, lut.fine, lut.bits32 = meta
    return lut


_LUT_CACHE = OrderedDict()
_LUT_CACHE_SIZE = 64


def _get_lut(layout, block, TM, TN, N, causal, device, kind, layout_key=None, batch=1):
    """kind 'row' (forward, dq) or 'col' (dk/dv), for calls of ``batch`` batches. Cached;
    built with device ops only. ``layout_key``: ``layout_identity(layout)`` when the caller
    has it already."""
    if layout_key is None:
        layout_key = layout_identity(layout)
    key = (layout_key, block, TM, TN, N, causal, device, kind, batch)
    hit = _LUT_CACHE.get(key)
    if hit is not None:
        _LUT_CACHE.move_to_end(key)
        return hit[1]

    def build():
        nz, full, bits, meta = _tile_tables(layout, block, TM, TN, N, causal, device)
        if kind == "col":
            nz, full = nz.transpose(1, 2), full.transpose(1, 2)
            bits = bits.transpose(1, 2) if bits is not None else None
        return _make_lut(nz, full, bits, meta, batch)

    lut = build_outside_graph_pools(build, device)
    _LUT_CACHE[key] = (layout, lut)  # the reference keeps the storage (and its key) alive
    while len(_LUT_CACHE) > _LUT_CACHE_SIZE:
        _LUT_CACHE.popitem(last=False)
    return lut


def clear_lut_cache():
    """Drop every look-up table and every plan (which hold tables and tile configs)."""
    _LUT_CACHE.clear()
    _PLANS.clear()


# --------------------------------------------------------------------------------------
# Plans: what a call signature fixes, worked out once
# --------------------------------------------------------------------------------------
def _upcast(q):
    return bool(_interpret() and q.dtype == torch.bfloat16 and q.device.type == "cpu")


def _prep(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _signature(q, k, v, layout, block, scale, causal, kpm):
    """Everything a plan depends on, and everything the checks look at."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, layout_identity(layout), block, scale,
            causal, None if kpm is None else (kpm.shape, kpm.stride(), kpm.dtype, kpm.device))


class _Plan:
    """One call signature (shapes, strides, dtypes and devices of q, k, v and the key padding
    mask; the layout; block, scale, causal), worked out once after the call was checked: tile
    configs, look-up tables, the scalar kernel arguments and ``Prepared`` launches. A call
    that hits a plan allocates its outputs and launches; nothing else."""

    def __init__(self, q, k, v, layout, block, scale, causal, kpm):
        self.layout = layout  # keeps the storage behind the LUT cache keys alive
        self.lkey = layout_identity(layout)
        self.block, self.causal = int(block), bool(causal)
        D = q.shape[-1]
        self.scale = float(D ** -0.5) if scale is None else float(scale)
        self.copy_qkv = any(t.stride(-1) != 1 for t in (q, k, v))
        q, k, v = _prep(q), _prep(k), _prep(v)
        B, H, N, D = self.shape = q.shape
        self.device = q.device
        self.elem = q.element_size()
        self.cfg = _config(D, block)
        self.upcast = _upcast(q)
        self.qkv_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        # the output and the gradients take the memory format of q (k, v): for a [B, N, H, D]
        # projection seen as [B, H, N, D] (Hugging Face), out.transpose(1, 2) is then
        # contiguous and neither the incoming gradient nor the outgoing ones need a copy
        self.out_strides, self.dk_strides, self.dv_strides = (
            torch.empty_like(t, device="meta").stride() for t in (q, k, v))
        # key padding: passed as it is when it is float32 and dense, else converted per call
        self.kpm_direct = kpm is None or (kpm.dtype == torch.float32 and kpm.is_contiguous())
        self.has_kpm = kpm is not None
        self.s_kpm = N if kpm is not None else 0
        # TMA per kernel: allowed here, and q/k/v's strides fit a descriptor (the bases, which
        # change per call, are checked per call; a misaligned one takes the pointer kernel)
        tma = _tma_kernels(self.device)
        self.tma_fwd = "fwd" in tma and all(map(_tma_layout_ok, (q, k, v)))  # out: as q
        self.tma_dq = "dq" in tma and _tma_layout_ok(k) and _tma_layout_ok(v)
        self.tma_dkdv = "dkdv" in tma and _tma_layout_ok(q)  # and dO's, per backward key
        self.fwd = None
        self.bwd = {}

    def key_padding(self, kpm):
        """The mask as the kernels read it: float32 [B, N], dense (or None)."""
        if self.kpm_direct:
            return kpm
        B, _, N, _ = self.shape
        return kpm.reshape(B, N).to(torch.float32).contiguous()

    def _lut(self, kind, tiles):
        TM, TN = tiles[:2]
        return _get_lut(self.layout, self.block, TM, TN, self.shape[2], self.causal,
                        self.device, kind, self.lkey, self.shape[0])

    def _meta(self, lut, tiles, tma):
        TM, TN, warps, stages, one_loop, maxnreg = tiles
        N, D = self.shape[2], self.shape[3]
        meta = dict(BLOCK_M=TM, BLOCK_N=TN, HEAD_DIM=D, UNIT_M=lut.unit_m, UNIT_N=lut.unit_n,
                    FINE=lut.fine, CAUSAL=self.causal, HAS_KPM=self.has_kpm,
                    EVEN=N % TM == 0 and N % TN == 0, BITS32=lut.bits32, UPCAST=self.upcast,
                    ONE_LOOP=one_loop, ALL_FULL=lut.all_full and not one_loop,
                    HAS_SPLIT=lut.n_slots > 0, TMA=tma, num_warps=warps,
                    num_stages=stages)
        if maxnreg is not None and not _interpret():
            meta["maxnreg"] = maxnreg
        return meta

    def _prepare(self, launcher, grid, lut, tiles, tma, **extra):
        """The _Launches of one kernel (with a TMA launch if ``tma``)."""
        pointer = launcher.prepare(grid, **extra, **self._meta(lut, tiles, False))
        if not tma:
            return _Launches(pointer, None, False)
        work = self.shape[0] * lut.n_tiles * tiles[0] * tiles[1] * self.shape[3]
        return _Launches(pointer, launcher.prepare(grid, **extra, **self._meta(lut, tiles, True)),
                         _TMA is not None or work >= _TMA_MIN_WORK)

    def _forward_launches(self):
        B, H, N, _ = self.shape
        tiles = self.cfg["fwd"]
        lut = self._lut("row", tiles)
        main = self._prepare(_fwd_kernel, (lut.n_work * B,), lut, tiles, self.tma_fwd,
                             POS_SCALE=self.scale > 0)
        so = self.out_strides
        ints = (*self.qkv_strides, *so[:3], self.s_kpm, B, H, N, lut.n_own, lut.n_other,
                lut.n_work, lut.n_split, self.scale * LOG2E)
        return lut, main, ints

    def forward(self, q, k, v, kpm):
        """out [B, H, N, D] in q's dtype and memory format, lse [B, H, N] float32.
        ``kpm``: as ``key_padding`` returns it."""
        if self.copy_qkv:
            q, k, v = _prep(q), _prep(k), _prep(v)
        if self.fwd is None:
            self.fwd = self._forward_launches()
        lut, main, ints = self.fwd
        B, H, N, D = self.shape
        TM, TN = self.cfg["fwd"][:2]
        out = torch.empty_like(q)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        if lut.n_slots:
            # the split rows' partial results, and how many of each row's items are done
            # (zeroed per call: a counter shared between calls could be raced by a call on
            # another stream or a concurrently replayed graph)
            ws_acc = torch.empty((lut.n_slots * B, TM, D), dtype=torch.float32, device=q.device)
            ws_ml = torch.empty((lut.n_slots * B, 2, TM), dtype=torch.float32, device=q.device)
            count = torch.zeros((lut.n_split * B,), dtype=torch.int32, device=q.device)
            split = (lut.split, lut.slot_split, count)
        else:  # no split row: no workspace (HAS_SPLIT is False)
            ws_acc = ws_ml = None
            split = (None, None, None)
        ctx = direct_context((q, k, v, out, lse, kpm, ws_acc, ws_ml))
        _launch(main, ctx, (q, k, v, out, lse, kpm), ((q, TM), (k, TN), (v, TN), (out, TM)),
                (lut.idx, lut.bits, lut.nfull_arg, lut.work, ws_acc, ws_ml, *split, *ints))
        return out, lse

    def _backward_launches(self, so, sdo):
        B, H, N, D = self.shape
        sdq, sdk, sdv = self.out_strides, self.dk_strides, self.dv_strides
        common = (self.s_kpm, B, H, N)
        # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads
        tiles = self.cfg["dq"]
        dq_lut = self._lut("row", tiles)
        dq = self._prepare(_dq_kernel, (dq_lut.n_work * B,), dq_lut, tiles, self.tma_dq)
        dq_ints = (*self.qkv_strides, *so[:3], *sdo[:3], *sdq[:3], *common, dq_lut.n_own,
                   dq_lut.n_other, dq_lut.n_work, self.scale * LOG2E, self.scale)
        TM = tiles[0]
        dq_reduce = None
        if dq_lut.n_split:
            dq_reduce = _reduce_kernel.prepare((dq_lut.n_split * B,), BLOCK=TM, HEAD_DIM=D,
                                               EVEN=N % TM == 0, TWO=False, num_warps=4)
        dq_reduce_ints = (*sdq[:3], *sdq[:3], B, H, N, dq_lut.n_own, dq_lut.n_split,
                          self.scale, self.scale)
        tiles = self.cfg["dkdv"]
        kv_lut = self._lut("col", tiles)
        tma_dkdv = self.tma_dkdv and _tma_strides_ok(sdo[:3], self.elem)
        dkdv = self._prepare(_dkdv_kernel, (kv_lut.n_work * B,), kv_lut, tiles, tma_dkdv)
        dkdv_ints = (*self.qkv_strides, *sdo[:3], *sdk[:3], *sdv[:3], *common, kv_lut.n_own,
                     kv_lut.n_other, kv_lut.n_work, self.scale * LOG2E, self.scale)
        TN = tiles[1]
        kv_reduce = None
        if kv_lut.n_split:
            kv_reduce = _reduce_kernel.prepare((kv_lut.n_split * B,), BLOCK=TN, HEAD_DIM=D,
                                               EVEN=N % TN == 0, TWO=True, num_warps=4)
        kv_reduce_ints = (*sdk[:3], *sdv[:3], B, H, N, kv_lut.n_own, kv_lut.n_split,
                          self.scale, 1.0)
        return (dq_lut, dq, dq_ints, dq_reduce, dq_reduce_ints,
                kv_lut, dkdv, dkdv_ints, kv_reduce, kv_reduce_ints)

    def backward(self, do, q, k, v, out, lse, kpm):
        """(dq, dk, dv), each in the memory format of its input. ``kpm`` as for forward."""
        if self.copy_qkv:
            q, k, v = _prep(q), _prep(k), _prep(v)
        do, out = _prep(do), _prep(out)
        key = (do.stride(), out.stride(), do.dtype)
        launches = self.bwd.get(key)
        if launches is None:
            launches = self.bwd[key] = self._backward_launches(out.stride(), do.stride())
        (dq_lut, dq_k, dq_ints, dq_reduce, dq_reduce_ints,
         kv_lut, dkdv_k, dkdv_ints, kv_reduce, kv_reduce_ints) = launches
        B, H, N, D = self.shape
        dq_TM, dq_TN = self.cfg["dq"][:2]
        kv_TM, kv_TN = self.cfg["dkdv"][:2]
        dev = q.device
        delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ws_dq = ws_dk = ws_dv = None
        if dq_lut.n_slots:
            ws_dq = torch.empty((dq_lut.n_slots * B, dq_TM, D), dtype=torch.float32, device=dev)
        if kv_lut.n_slots:
            ws_dk = torch.empty((kv_lut.n_slots * B, kv_TN, D), dtype=torch.float32, device=dev)
            ws_dv = torch.empty((kv_lut.n_slots * B, kv_TN, D), dtype=torch.float32, device=dev)
        ctx = direct_context((q, k, v, out, do, dq, dk, dv, lse, delta, kpm, ws_dq, ws_dk,
                              ws_dv))
        _launch(dq_k, ctx, (q, k, v, out, do, dq, lse, delta, kpm), ((k, dq_TN), (v, dq_TN)),
                (dq_lut.idx, dq_lut.bits, dq_lut.nfull_arg, dq_lut.work, ws_dq, *dq_ints))
        if dq_reduce is not None:
            dq_reduce.launch(ctx, ws_dq, dq, ws_dq, dq, dq_lut.split, *dq_reduce_ints)
        _launch(dkdv_k, ctx, (q, k, v, do, dk, dv, lse, delta, kpm), ((q, kv_TM), (do, kv_TM)),
                (kv_lut.idx, kv_lut.bits, kv_lut.nfull_arg, kv_lut.work, ws_dk, ws_dv,
                 *dkdv_ints))
        if kv_reduce is not None:
            kv_reduce.launch(ctx, ws_dk, dk, ws_dv, dv, kv_lut.split, *kv_reduce_ints)
        return dq, dk, dv


_PLANS = {}
_PLANS_SIZE = 64  # as the LUT cache: a plan keeps its LUTs alive (tens of MB each at 64k)


def cached_plan(tag, q, k, v, layout, block, scale, causal, kpm):
    """The plan of an earlier call with this signature that ``tag``'s caller checked, or None.
    The tag names the caller: each caller checks calls in its own way, and a plan stands for
    "this signature passed that caller's checks"."""
    return _PLANS.get((tag,) + _signature(q, k, v, layout, block, scale, causal, kpm))


def plan(tag, q, k, v, layout, block, scale, causal, kpm):
    """The plan for this call, built (after ``_check``) when its signature is new."""
    key = (tag,) + _signature(q, k, v, layout, block, scale, causal, kpm)
    hit = _PLANS.get(key)
    if hit is None:
        _check(q, k, v, layout, block, kpm)
        if len(_PLANS) >= _PLANS_SIZE:
            _PLANS.clear()
        hit = _PLANS[key] = _Plan(q, k, v, layout, block, scale, causal, kpm)
    return hit


def _forward_impl(q, k, v, layout, kpm, block, scale, causal):
    p = plan("op", q, k, v, layout, block, scale, causal, kpm)
    return p.forward(q, k, v, p.key_padding(kpm))


def _backward_impl(do, q, k, v, out, lse, layout, kpm, block, scale, causal):
    p = plan("op", q, k, v, layout, block, scale, causal, kpm)
    return p.backward(do, q, k, v, out, lse, p.key_padding(kpm))


# --------------------------------------------------------------------------------------
# Custom ops (torch.compile) and autograd
# --------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_attn::fused_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor], block: int, scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, layout, key_padding_mask, block, scale, causal)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, layout, key_padding_mask, block, scale, causal):
    B, H, N, D = q.shape  # strides as _forward_impl gives them
    return (torch.empty_like(_prep(q)), q.new_empty((B, H, N), dtype=torch.float32))


@torch.library.custom_op("sparse_attn::fused_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, layout: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor], block: int, scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(do, q, k, v, out, lse, layout, key_padding_mask, block, scale, causal)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, out, lse, layout, key_padding_mask, block, scale, causal):
    return tuple(torch.empty_like(_prep(t)) for t in (q, k, v))  # as _backward_impl does


def _setup_context(ctx, inputs, output):
    q, k, v, layout, kpm, block, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, layout, kpm)
    ctx.block, ctx.scale, ctx.causal = block, scale, causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, layout, kpm = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, layout, kpm, ctx.block, ctx.scale,
                         ctx.causal)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class FusedBlockSparseAttention(torch.autograd.Function):
    """Thin autograd.Function over a plan's kernels: what the public function uses in eager
    mode (under torch.compile it uses the custom op instead).
    ``apply(q, k, v, key_padding_mask, plan)``, the mask as ``plan.key_padding`` gives it."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, plan):
        out, lse = plan.forward(q, k, v, kpm)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        dq, dk, dv = ctx.plan.backward(dout, q, k, v, out, lse, kpm)
        return dq, dk, dv, None, None


def attend(plan, q, k, v, key_padding_mask):
    """Run ``plan`` (eager mode) on a call with its signature."""
    return FusedBlockSparseAttention.apply(q, k, v, plan.key_padding(key_padding_mask), plan)


def fused_block_sparse_attention(q, k, v, layout, block, *, scale=None, causal=False,
                                 key_padding_mask=None):
    """Block-sparse attention in one fused Triton kernel (forward) and three (backward).

    q, k, v: [batch, heads, seq, head_dim], float16 or bfloat16 (float32 is rejected with a
    ValueError), head_dim 32, 64 or 128, CUDA (or CPU with TRITON_INTERPRET=1).
    layout: [heads, seq // block, seq // block] 0/1 (int or bool, any device); a different
    pattern per head is fine. block: a power of two >= 16.
    scale: softmax scale, default head_dim ** -0.5.
    causal: also drop keys after the query: the upper triangle of diagonal blocks, and whole
    blocks above the diagonal (unidirectional layouts have none).
    key_padding_mask: additive float [batch, seq] (0 keeps, -inf drops, other values are
    added to the scores of that key); no gradient flows to it.
    A query row that sees no key returns zeros (and zero gradients), never NaN.
    Returns [batch, heads, seq, head_dim] in q's dtype.
    """
    if torch.compiler.is_compiling():
        # traced as one opaque custom op (fake + autograd registrations): no graph break
        _check(q, k, v, layout, block, key_padding_mask)
        D = q.shape[-1]
        scale = float(D ** -0.5) if scale is None else float(scale)
        kpm = None
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(q.shape[0], q.shape[2])
        out, _ = _fwd_op(q, k, v, layout, kpm, int(block), scale, bool(causal))
        return out
    # eager: a plan per call signature (checked once) through a plain autograd.Function,
    # which costs less host time per call than the custom op's dispatch
    return attend(plan("fused", q, k, v, layout, block, scale, causal, key_padding_mask),
                  q, k, v, key_padding_mask)
