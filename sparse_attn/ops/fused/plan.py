"""Plans: what one call signature of the fused attention fixes, worked out once.

A call's signature (shapes, strides, dtypes and devices of q, k, v and the key padding mask;
the layout; block, scale, causal) is checked once and turned into a ``Plan``: tile configs,
look-up tables, every scalar kernel argument and ``launch.Prepared`` launches. A later call
with the same signature allocates its outputs and launches, nothing else (an eager batch-1
training step is bound by host time).

    plan = get_plan(q, k, v, layout, block, scale, causal, key_padding_mask)
    out, lse = plan.forward(q, k, v, plan.key_padding(key_padding_mask))
"""
from typing import Optional

import torch

from .. import common
from ..caching import TABLE_BYTES, layout_identity
from ..checks import additive_key_padding, check_fused_call
from ..launch import Launcher, direct_context
from . import config
from .grouping import clear_groups, tiles_and_groups
from .lut import clear_luts, get_lut

try:
    from ..kernels import fused_backward as _bwd
    from ..kernels import fused_forward as _fwd
except Exception:  # pragma: no cover - triton missing
    _fwd = _bwd = None

__all__ = ["Plan", "get_plan", "cached_plan", "clear_caches", "plan_cache_size"]

LOG2E = 1.4426950408889634

# launched as _fwd_kernel.prepare(grid, **constexprs).launch(...): see launch.py
_fwd_kernel = Launcher(_fwd, "fused_attn_fwd_kernel")
_dq_kernel = Launcher(_bwd, "fused_attn_bwd_dq_kernel")
_dkdv_kernel = Launcher(_bwd, "fused_attn_bwd_dkdv_kernel")
_reduce_kernel = Launcher(_bwd, "fused_attn_bwd_reduce_kernel")


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """t with a unit last stride (the kernels' one requirement on memory format)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class Launches:
    """The launches of one kernel of a plan: ``pointer``; ``tma`` (None where the plan cannot
    use TMA); ``always`` (take TMA at every call: forced, or work of at least TMA_MIN_WORK;
    else only inside a CUDA-graph capture); ``tma_ready`` (the TMA launch has run once, so
    its kernel is loaded: a capture must not be the first to load it, so the first call
    takes TMA whatever the rule says)."""

    __slots__ = ("pointer", "tma", "always", "tma_ready")

    def __init__(self, pointer, tma, always):
        self.pointer, self.tma, self.always, self.tma_ready = pointer, tma, always, False

    def launch(self, ctx, head, tiles, tail):
        """Launch with ``head`` arguments, then descriptors over ``tiles`` ((tensor, rows)
        pairs; None in the pointer variant, or when a base is not 16-byte aligned), then
        ``tail``."""
        tma = self.tma
        if tma is not None and (self.always or not self.tma_ready
                                or torch.cuda.is_current_stream_capturing()):
            ptrs = 0
            for t, _ in tiles:
                ptrs |= t.data_ptr()
            if not ptrs & 15:
                self.tma_ready = True
                descs = [config.descriptor(t, rows) for t, rows in tiles]
                return tma.launch(ctx, *head, *descs, *tail)
        return self.pointer.launch(ctx, *head, *[None] * len(tiles), *tail)


def signature(q, k, v, layout, block, scale, causal, kpm) -> tuple:
    """Everything a plan depends on, and everything the checks look at."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, layout_identity(layout), block, scale,
            causal, None if kpm is None else (kpm.shape, kpm.stride(), kpm.dtype, kpm.device))


class Plan:
    """One checked call signature, worked out: tile configs, look-up tables, scalar kernel
    arguments and launches. The output and the gradients take the memory format of q, k, v
    (so a [B, N, H, D] projection seen as [B, H, N, D] needs no copy either way)."""

    def __init__(self, q, k, v, layout, block, scale, causal, kpm):
        self.layout = layout  # keeps the storage behind the LUT cache keys alive
        self.lkey = layout_identity(layout)
        self.block, self.causal = int(block), bool(causal)
        self.copy_qkv = any(t.stride(-1) != 1 for t in (q, k, v))
        q, k, v = contiguous_rows(q), contiguous_rows(k), contiguous_rows(v)
        B, H, N, D = self.shape = q.shape
        self.scale = float(D ** -0.5) if scale is None else float(scale)
        self.device = q.device
        self.elem = q.element_size()
        self.tiles, self.groups = tiles_and_groups(layout, self.block, N, self.device, D,
                                                   self.lkey)
        self.maps = (self.groups.qmap, self.groups.kmap)
        self.upcast = common.interpreting() and common.needs_upcast(q)
        self.qkv_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        self.out_strides, self.dk_strides, self.dv_strides = (
            torch.empty_like(t, device="meta").stride() for t in (q, k, v))
        # the mask is passed as it is when it is float32 and dense, else converted per call
        self.kpm_direct = kpm is None or (kpm.dtype == torch.float32 and kpm.is_contiguous())
        self.has_kpm = kpm is not None
        self.s_kpm = N if kpm is not None else 0
        # TMA per kernel where allowed and q/k/v's strides fit a descriptor (the bases, which
        # change per call, are checked per call; a misaligned one takes the pointer kernel)
        tma = config.tma_kernels(self.device)
        ok = config.tma_layout_ok
        # (a gathered tile moves through pointers: no TMA where every tile is gathered)
        gq, gk = (m is not None for m in self.maps)
        self.tma_fwd = "fwd" in tma and all(map(ok, (q, k, v))) and not (gq and gk)  # out: as q
        self.tma_dq = "dq" in tma and ok(k) and ok(v) and not gk
        self.tma_dkdv = "dkdv" in tma and ok(q) and not gq  # and dO's, per backward key
        self.fwd = None
        self.bwd = {}

    def key_padding(self, kpm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The mask as the kernels read it: additive float32 [B, N], dense (or None)."""
        if self.kpm_direct:
            return kpm
        return additive_key_padding(kpm, self.shape[0], self.shape[2])

    def _lut(self, kind, tiles):
        return get_lut(self.layout, self.block, tiles.block_m, tiles.block_n, self.shape[2],
                       self.causal, self.device, kind, self.lkey, self.shape[0], self.groups)

    def _meta(self, lut, tiles, tma):
        N, D = self.shape[2], self.shape[3]
        TM, TN = tiles.block_m, tiles.block_n
        meta = dict(BLOCK_M=TM, BLOCK_N=TN, HEAD_DIM=D, UNIT_M=lut.unit_m, UNIT_N=lut.unit_n,
                    FINE=lut.fine, CAUSAL=self.causal, HAS_KPM=self.has_kpm,
                    EVEN=N % TM == 0 and N % TN == 0, BITS32=lut.bits32, UPCAST=self.upcast,
                    ONE_LOOP=tiles.one_loop, ALL_FULL=lut.all_full and not tiles.one_loop,
                    HAS_SPLIT=lut.n_slots > 0, TMA=tma, GATHER_Q=self.maps[0] is not None,
                    GATHER_K=self.maps[1] is not None, num_warps=tiles.num_warps,
                    num_stages=tiles.num_stages)
        if tiles.maxnreg is not None and not common.interpreting():
            meta["maxnreg"] = tiles.maxnreg
        return meta

    def _prepare(self, launcher, grid, lut, tiles, tma, **extra) -> Launches:
        pointer = launcher.prepare(grid, **extra, **self._meta(lut, tiles, False))
        if not tma:
            return Launches(pointer, None, False)
        work = self.shape[0] * lut.n_tiles * tiles.block_m * tiles.block_n * self.shape[3]
        return Launches(pointer, launcher.prepare(grid, **extra, **self._meta(lut, tiles, True)),
                        config.tma_forced() or work >= config.TMA_MIN_WORK)

    def _forward_launches(self):
        B, H, N, _ = self.shape
        tiles = self.tiles.fwd
        lut = self._lut("row", tiles)
        main = self._prepare(_fwd_kernel, (lut.n_work * B,), lut, tiles, self.tma_fwd,
                             POS_SCALE=self.scale > 0)
        so = self.out_strides
        ints = (*self.qkv_strides, *so[:3], self.s_kpm, B, H, N, lut.n_own, lut.n_other,
                lut.n_work, lut.n_split, self.groups.n_map, self.scale * LOG2E)
        return lut, main, ints

    def forward(self, q, k, v, kpm):
        """out [B, H, N, D] in q's dtype and memory format, lse [B, H, N] float32.
        ``kpm``: as ``key_padding`` returns it."""
        if self.copy_qkv:
            q, k, v = contiguous_rows(q), contiguous_rows(k), contiguous_rows(v)
        if self.fwd is None:
            self.fwd = self._forward_launches()
        lut, main, ints = self.fwd
        B, H, N, D = self.shape
        TM, TN = self.tiles.fwd.block_m, self.tiles.fwd.block_n
        out = torch.empty_like(q)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        ws_acc = ws_ml = None
        split = (None, None, None)
        if lut.n_slots:
            # the split rows' partial results and how many of each row's items are done,
            # zeroed per call (a shared counter could be raced by a call on another stream)
            ws_acc = torch.empty((lut.n_slots * B, TM, D), dtype=torch.float32, device=q.device)
            ws_ml = torch.empty((lut.n_slots * B, 2, TM), dtype=torch.float32, device=q.device)
            count = torch.zeros((lut.n_split * B,), dtype=torch.int32, device=q.device)
            split = (lut.split, lut.slot_split, count)
        ctx = direct_context((q, k, v, out, lse, kpm, ws_acc, ws_ml))
        main.launch(ctx, (q, k, v, out, lse, kpm), ((q, TM), (k, TN), (v, TN), (out, TM)),
                    (lut.idx, lut.bits, lut.nfull_arg, lut.work, ws_acc, ws_ml, *split,
                     *self.maps, *ints))
        return out, lse

    def _reduce(self, lut, block, two, ints, tmap):
        """The launch that sums a backward kernel's split items (None: nothing split), and
        its token map (None: contiguous tiles)."""
        if not lut.n_split:
            return None, ints, tmap
        N, D = self.shape[2], self.shape[3]
        return _reduce_kernel.prepare((lut.n_split * self.shape[0],), BLOCK=block, HEAD_DIM=D,
                                      EVEN=N % block == 0, TWO=two, GATHER=tmap is not None,
                                      num_warps=4), ints, tmap

    def _backward_launches(self, so, sdo):
        B, H, N, D = self.shape
        sdq, sdk, sdv = self.out_strides, self.dk_strides, self.dv_strides
        common_ints = (self.s_kpm, B, H, N)
        # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads
        tiles = self.tiles.dq
        dq_lut = self._lut("row", tiles)
        dq = self._prepare(_dq_kernel, (dq_lut.n_work * B,), dq_lut, tiles, self.tma_dq)
        n_map = self.groups.n_map
        dq_ints = (*self.qkv_strides, *so[:3], *sdo[:3], *sdq[:3], *common_ints, dq_lut.n_own,
                   dq_lut.n_other, dq_lut.n_work, n_map, self.scale * LOG2E, self.scale)
        dq_reduce = self._reduce(dq_lut, tiles.block_m, False,
                                 (*sdq[:3], *sdq[:3], B, H, N, dq_lut.n_own, dq_lut.n_split,
                                  n_map, self.scale, self.scale), self.maps[0])
        tiles = self.tiles.dkdv
        kv_lut = self._lut("col", tiles)
        tma_dkdv = self.tma_dkdv and config.tma_strides_ok(sdo[:3], self.elem)
        dkdv = self._prepare(_dkdv_kernel, (kv_lut.n_work * B,), kv_lut, tiles, tma_dkdv)
        dkdv_ints = (*self.qkv_strides, *sdo[:3], *sdk[:3], *sdv[:3], *common_ints,
                     kv_lut.n_own, kv_lut.n_other, kv_lut.n_work, n_map, self.scale * LOG2E,
                     self.scale)
        kv_reduce = self._reduce(kv_lut, tiles.block_n, True,
                                 (*sdk[:3], *sdv[:3], B, H, N, kv_lut.n_own, kv_lut.n_split,
                                  n_map, self.scale, 1.0), self.maps[1])
        return dq_lut, dq, dq_ints, dq_reduce, kv_lut, dkdv, dkdv_ints, kv_reduce

    def backward(self, do, q, k, v, out, lse, kpm):
        """(dq, dk, dv), each in the memory format of its input. ``kpm`` as for forward."""
        if self.copy_qkv:
            q, k, v = contiguous_rows(q), contiguous_rows(k), contiguous_rows(v)
        do, out = contiguous_rows(do), contiguous_rows(out)
        key = (do.stride(), out.stride(), do.dtype)
        launches = self.bwd.get(key)
        if launches is None:
            launches = self.bwd[key] = self._backward_launches(out.stride(), do.stride())
        dq_lut, dq_k, dq_ints, (dq_red, dq_red_ints, dq_map), kv_lut, dkdv_k, dkdv_ints, \
            (kv_red, kv_red_ints, kv_map) = launches
        B, H, N, D = self.shape
        dq_tiles, kv_tiles = self.tiles.dq, self.tiles.dkdv
        dev = q.device
        delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ws_dq = ws_dk = ws_dv = None
        if dq_lut.n_slots:
            ws_dq = torch.empty((dq_lut.n_slots * B, dq_tiles.block_m, D), dtype=torch.float32,
                                device=dev)
        if kv_lut.n_slots:
            shape = (kv_lut.n_slots * B, kv_tiles.block_n, D)
            ws_dk = torch.empty(shape, dtype=torch.float32, device=dev)
            ws_dv = torch.empty(shape, dtype=torch.float32, device=dev)
        ctx = direct_context((q, k, v, out, do, dq, dk, dv, lse, delta, kpm, ws_dq, ws_dk,
                              ws_dv))
        dq_k.launch(ctx, (q, k, v, out, do, dq, lse, delta, kpm),
                    ((k, dq_tiles.block_n), (v, dq_tiles.block_n)),
                    (dq_lut.idx, dq_lut.bits, dq_lut.nfull_arg, dq_lut.work, ws_dq, *self.maps,
                     *dq_ints))
        if dq_red is not None:
            dq_red.launch(ctx, ws_dq, dq, ws_dq, dq, dq_lut.split, dq_map, *dq_red_ints)
        dkdv_k.launch(ctx, (q, k, v, do, dk, dv, lse, delta, kpm),
                      ((q, kv_tiles.block_m), (do, kv_tiles.block_m)),
                      (kv_lut.idx, kv_lut.bits, kv_lut.nfull_arg, kv_lut.work, ws_dk, ws_dv,
                       *self.maps, *dkdv_ints))
        if kv_red is not None:
            kv_red.launch(ctx, ws_dk, dk, ws_dv, dv, kv_lut.split, kv_map, *kv_red_ints)
        return dq, dk, dv


_PLANS: dict = {}
_PLANS_SIZE = 64  # as the LUT cache: a plan keeps its LUTs alive (tens of MB each at 64k)
# Bytes of tables the plans may hold (a plan keeps its LUTs alive past the LUT cache's own
# bound). Tables grow with the square of the sequence, so at long sequences the count bound
# alone would let batches of varying length keep gigabytes per length ever seen.
PLAN_TABLE_BYTES = TABLE_BYTES


def table_bytes(layout: torch.Tensor) -> int:
    """About the bytes of the tables of one layout ``[H, nb, nb]``: the row and column LUTs
    (int32 tile index and int64 bits per (row, column) of tiles, tiles no smaller than the
    block)."""
    return layout.numel() * 24


def cached_plan(q, k, v, layout, block, scale, causal, kpm) -> Optional[Plan]:
    """The plan of an earlier call with this signature (which passed the checks), or None."""
    return _PLANS.get(signature(q, k, v, layout, block, scale, causal, kpm))


def get_plan(q, k, v, layout, block, scale, causal, kpm) -> Plan:
    """The plan for this call, checked and built when its signature is new."""
    key = signature(q, k, v, layout, block, scale, causal, kpm)
    hit = _PLANS.get(key)
    if hit is None:
        check_fused_call(q, k, v, layout, block, kpm)
        held = {p.lkey: table_bytes(p.layout) for p in _PLANS.values()}
        held[layout_identity(layout)] = table_bytes(layout)
        if sum(held.values()) > PLAN_TABLE_BYTES:
            clear_caches()  # the plans and the tables they hold; this call's are rebuilt
        elif len(_PLANS) >= _PLANS_SIZE:
            _PLANS.clear()  # many signatures of few layouts: the tables stay cached
        hit = _PLANS[key] = Plan(q, k, v, layout, block, scale, causal, kpm)
    return hit


def plan_cache_size() -> int:
    return len(_PLANS)


def clear_caches() -> None:
    """Drop every look-up table and every plan (which hold tables and tile configs)."""
    clear_luts()
    clear_groups()
    _PLANS.clear()


def _settings_changed(luts: bool) -> None:
    _PLANS.clear()
    if luts:
        clear_luts()
        clear_groups()


config.on_change(_settings_changed)
