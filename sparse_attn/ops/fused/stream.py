"""The walk of the streamed forward (``kernels/fused_forward_stream.py``): every row's tiles
of a row look-up table, concatenated in row order and cut into runs of equal length, one
program each. A row cut by a run's end is a split row: each of its pieces leaves a partial
result in a workspace slot, and the merge kernel combines them.

    stream = get_stream(lut, runs)     # cached on the Lut
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .lut import Lut

__all__ = ["Stream", "get_stream", "make_stream", "stream_runs"]


@dataclass(eq=False)
class Stream:
    """The walk of one row Lut in ``n_runs`` runs (see the kernel's docstring for ``table``)."""
    table: torch.Tensor           # [3, n_tiles] int32: key tile, row id, flags
    bits: Optional[torch.Tensor]  # [n_tiles] int64 unit masks (fine layouts), else None
    split: torch.Tensor           # [3, n_split] int32: split row, its first slot, its pieces
    n_tiles: int
    n_runs: int
    n_slots: int
    n_split: int
    has_empty: bool               # some row has no tile (a placeholder column, all masked)


def stream_runs(per_sm: int, batch: int, device: torch.device) -> int:
    """Runs per batch for ``per_sm`` programs per multiprocessor over ``batch`` batches."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    return max(1, -(-per_sm * n_sm // batch))


def make_stream(lut: Lut, runs: int) -> Stream:
    """The walk of ``lut`` (a "row" table) in at most ``runs`` runs. One host sync."""
    device = lut.idx.device
    lens = lut.ntot.cpu().to(torch.int64)
    R = lens.numel()
    eff = lens.clamp(min=1)  # a row with no tile walks one placeholder column
    T = int(eff.sum())
    runs = max(1, min(int(runs), T))
    start = torch.cumsum(eff, 0) - eff
    row = torch.repeat_interleave(torch.arange(R), eff)
    pos = torch.arange(T) - start[row]
    g = torch.arange(T)
    bounds = torch.arange(runs + 1) * T // runs
    run = torch.searchsorted(bounds, g, right=True) - 1
    first = (pos == 0) | (g == bounds[run])
    last = (pos == eff[row] - 1) | (g == bounds[run + 1] - 1)
    piece = torch.cumsum(first.to(torch.int64), 0) - 1
    piece_row = row[first]
    pieces = torch.bincount(piece_row, minlength=R)
    split_rows = torch.nonzero(pieces > 1).flatten()
    is_split = (pieces > 1)[piece_row]
    n_slots = int(is_split.sum())
    slot = torch.full((piece_row.numel(),), -1, dtype=torch.int64)
    slot[is_split] = torch.arange(n_slots)  # a row's pieces are consecutive: so are its slots
    first_piece = torch.cumsum(pieces, 0) - pieces
    split = torch.stack([split_rows, slot[first_piece[split_rows]], pieces[split_rows]])
    empty = (lens == 0)[row]
    flags = first.to(torch.int64) | last.to(torch.int64) << 1 | empty.to(torch.int64) << 2 | \
        (slot[piece] + 1) << 3
    flat = row.to(device) * lut.n_other + pos.to(device)
    tiles = lut.idx.reshape(-1)[flat]
    table = torch.stack([tiles, row.to(device, torch.int32), flags.to(device, torch.int32)])
    bits = lut.bits.reshape(-1)[flat].contiguous() if lut.bits is not None else None
    return Stream(table=table.to(torch.int32).contiguous(), bits=bits,
                  split=split.to(device=device, dtype=torch.int32).contiguous(), n_tiles=T,
                  n_runs=runs, n_slots=n_slots, n_split=split_rows.numel(),
                  has_empty=bool(empty.any()))


def get_stream(lut: Lut, runs: int) -> Stream:
    """``make_stream(lut, runs)``, kept on the Lut (whose cache bounds it)."""
    hit = lut.streams.get(runs)
    if hit is None:
        hit = lut.streams[runs] = make_stream(lut, runs)
    return hit
