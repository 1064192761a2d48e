"""Tile configurations of the fused kernels, the settings that override them, and the rule
for when a kernel moves its tiles by TMA.

    tiles = kernel_tiles(head_dim, block)       # FusedTiles(fwd=..., dq=..., dkdv=...)
    set_fused_config(64, 16, fwd=TileConfig(128, 32, 4, 3))
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import common

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - a Triton without host tensor descriptors
    TensorDescriptor = None

__all__ = ["TileConfig", "FusedTiles", "DEFAULT_TILES", "PACKED_TILES", "KERNELS", "kernel_tiles",
           "set_fused_config", "split_min", "grouping", "tma_kernels", "tma_forced", "TMA_MIN_WORK",
           "tma_strides_ok", "tma_layout_ok", "descriptor"]

KERNELS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class TileConfig:
    """Launch configuration of one fused kernel.

    block_m, block_n: the query and key tile (rows); num_warps, num_stages: Triton's;
    one_loop: send every tile through the masked loop rather than the full tiles through a
    mask-free loop first (fewer pipeline fills when rows are short and mostly partial);
    maxnreg: cap on registers per thread (None: the compiler's choice).
    """
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    one_loop: bool = False
    maxnreg: Optional[int] = None

    @classmethod
    def of(cls, cfg) -> "TileConfig":
        """A TileConfig, or one from ``(block_m, block_n, num_warps, num_stages[, one_loop[,
        maxnreg]])``."""
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, (tuple, list)) or not 4 <= len(cfg) <= 6:
            raise ValueError(f"a tile config is a TileConfig or (block_m, block_n, num_warps, "
                             f"num_stages[, one_loop[, maxnreg]]), got {cfg!r}")
        return cls(*cfg)


@dataclass(frozen=True)
class FusedTiles:
    """The tile configs of the three kernels of one (head_dim, block)."""
    fwd: TileConfig
    dq: TileConfig
    dkdv: TileConfig


def _t(*cfg):
    return TileConfig(*cfg)


# Chosen by measurement on H100 and H200 (docs/design-notes.md): 64x64 tiles at head_dim 64,
# capped at 168 registers in the backward (three programs per SM instead of two).
_BWD64 = TileConfig(64, 64, 4, 3, maxnreg=168)
DEFAULT_TILES = {  # head_dim -> block (None: any other block) -> FusedTiles
    32: {None: FusedTiles(_t(64, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 3))},
    64: {None: FusedTiles(_t(64, 64, 4, 2), _BWD64, _BWD64),
         16: FusedTiles(_t(64, 32, 4, 3), _t(64, 32, 4, 3), _t(32, 64, 4, 3)),
         32: FusedTiles(_t(64, 64, 4, 3), _t(64, 64, 4, 3), _t(32, 64, 4, 3)),
         128: FusedTiles(_t(64, 64, 4, 2), _BWD64, _BWD64)},
    128: {None: FusedTiles(_t(64, 64, 4, 3), _t(64, 64, 4, 2), _t(64, 64, 4, 2))},
}

# Packed tiles (``grouping``) fill 64x64 tiles at blocks 16/32: there the block-64 configs win.
# H100 Fx16 16k: fwd 64x32 0.908 -> 64x64 0.765 ms; bwd 2.43 -> 2.12 (dk/dv 64x64, cap 168).
PACKED_TILES = {  # head_dim -> block -> FusedTiles, for layouts on packed tiles
    64: {16: FusedTiles(_t(64, 64, 4, 3), _t(64, 64, 4, 3), _BWD64),
         32: FusedTiles(_t(64, 64, 4, 3), _t(64, 64, 4, 3), _BWD64)},
}

SPLIT_MIN_DEFAULT = 16
# Work a launch must have (multiply-adds over its tile products) before it takes TMA eagerly:
# 2**34 is 64k tiles of 64 x 64 x 64, long enough to hide a descriptor's host cost.
TMA_MIN_WORK = 1 << 34

_overrides: dict = {}     # (head_dim, block or None) -> {kernel: TileConfig}
_tiles_cache: dict = {}
_tma: Optional[frozenset] = None  # None: the default rule; else the kernels forced to TMA
_split_min = SPLIT_MIN_DEFAULT
_group = True
_listeners: list = []


def on_change(fn: Callable[[bool], None]) -> None:
    """Call ``fn(luts_changed)`` whenever a setting changes (caches built on them drop)."""
    _listeners.append(fn)


def _changed(luts: bool) -> None:
    _tiles_cache.clear()
    for fn in _listeners:
        fn(luts)


def kernel_tiles(head_dim: int, block: int, packed: bool = False) -> FusedTiles:
    """The tile configs for this head_dim and block (``packed``: for a layout on packed
    tiles), overrides applied."""
    hit = _tiles_cache.get((head_dim, block, packed))
    if hit is None:
        table = DEFAULT_TILES[head_dim]
        base = table.get(block, table[None])
        if packed:
            base = PACKED_TILES.get(head_dim, {}).get(block, base)
        chosen = {name: getattr(base, name) for name in KERNELS}
        chosen.update(_overrides.get((head_dim, None), {}))
        chosen.update(_overrides.get((head_dim, block), {}))
        hit = _tiles_cache[(head_dim, block, packed)] = FusedTiles(**chosen)
    return hit


def split_min() -> int:
    """The shortest run of tiles a look-up-table row is cut into."""
    return _split_min


def grouping():
    """Whether fine layouts run on packed tiles (``sparse_attn.ops.fused.grouping``): True
    where they pay, False never, "always" wherever they apply."""
    return _group


def set_fused_config(head_dim=None, block=None, *, split_min=None, tma=None, group=None,
                     **kernels):
    """Override tile configs, e.g. ``set_fused_config(64, 16, fwd=TileConfig(128, 32, 4, 3))``
    (``block`` None: every block of that head_dim), the shortest run of tiles a LUT row is
    cut into (``split_min``; rows up to that length are never split), or which kernels load
    tiles by TMA (``tma``: True, False, or some of "fwd", "dq", "dkdv"; at every launch, on a
    GPU of compute capability 9+ or in the interpreter), or whether fine layouts run on
    packed tiles (``group``: True, where they pay, the default; False; "always", wherever
    they apply, for tests and comparisons).

    ``set_fused_config()`` with no argument clears every override. Used by the benchmarks.
    """
    global _tma, _split_min, _group
    if head_dim is None and split_min is None and tma is None and group is None and not kernels:
        luts = _split_min != SPLIT_MIN_DEFAULT or _group is not True
        _overrides.clear()
        _tma, _split_min, _group = None, SPLIT_MIN_DEFAULT, True
        _changed(luts)
        return
    if group is not None and group is not True and group is not False and group != "always":
        raise ValueError(f"group must be True, False or 'always', got {group!r}")
    if tma is not None:
        names = KERNELS if tma is True else () if tma is False else tuple(tma)
        if isinstance(tma, str) or any(n not in KERNELS for n in names):
            raise ValueError(f"tma must be True, False or some of {KERNELS}, got {tma!r}")
    if split_min is not None and (not isinstance(split_min, int) or isinstance(split_min, bool)
                                  or split_min < 1):
        raise ValueError(f"split_min must be a positive int, got {split_min!r}")
    if kernels:
        if head_dim not in DEFAULT_TILES:
            raise ValueError(f"tile configs need head_dim in {tuple(DEFAULT_TILES)}, "
                             f"got {head_dim!r}")
        bad = [name for name in kernels if name not in KERNELS]
        if bad:
            raise ValueError(f"tile configs are for the kernels 'fwd', 'dq' and 'dkdv', "
                             f"got {bad[0]!r}")
        kernels = {name: TileConfig.of(cfg) for name, cfg in kernels.items()}
        _overrides.setdefault((head_dim, block), {}).update(kernels)
    if tma is not None:
        _tma = frozenset(names)
    luts = (split_min is not None and split_min != _split_min) or \
        (group is not None and group != _group)
    if split_min is not None:
        _split_min = split_min
    if group is not None:
        _group = group
    _changed(luts)


# --------------------------------------------------------------------------------------
# TMA. On Hopper a kernel can move its tiles with one copy instruction through a host tensor
# descriptor (bit-identical results; 3-5% less GPU time forward+backward on an H200). A
# descriptor argument costs host time at every launch, though (with Triton 3.6 a forward
# launch takes 14 us with pointers, 48 us with its four descriptors), and an eager batch-1
# step is bound by host time. So by default a kernel takes TMA only where the GPU time it
# saves counts: inside a CUDA-graph capture, for launches of at least TMA_MIN_WORK, and at a
# plan's first call (so that a capture never compiles it).
# --------------------------------------------------------------------------------------
def tma_forced() -> bool:
    """Whether set_fused_config(tma=...) forces the choice at every launch."""
    return _tma is not None


def tma_kernels(device: torch.device) -> frozenset:
    """The kernels that may load tiles by TMA on this device."""
    if TensorDescriptor is None:
        return frozenset()
    if common.interpreting():
        return _tma if _tma is not None else frozenset()
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return frozenset()
    return _tma if _tma is not None else frozenset(KERNELS)


def tma_strides_ok(strides, elem: int) -> bool:
    """Whether these strides (in elements of ``elem`` bytes) are multiples of 16 bytes, as a
    TMA descriptor's must be."""
    return all(s * elem % 16 == 0 for s in strides)


def tma_layout_ok(t: torch.Tensor) -> bool:
    """Whether a descriptor can describe t [B, H, N, D] (last stride 1, the others multiples
    of 16 bytes; the base is checked per call)."""
    return t.stride(-1) == 1 and tma_strides_ok(t.stride()[:-1], t.element_size())


def descriptor(t: torch.Tensor, rows: int):
    """Host TMA descriptor over t [B, H, N, D] for tiles of ``rows`` rows of one (b, h)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])
