"""The streamed forward (``TileConfig.stream``: one program walks many rows' tiles in one
loop) against the float64 dense oracle, forward and gradients (the backward reads its
output and LSE), and its walk tables against the row look-up table they come from.

On a machine without CUDA the kernels run in Triton's interpreter at small shapes.
"""
import zlib

import pytest
import torch

from reference import kernel_cases
from test_fused_attention import (BATCH, CUDA, DEV, HEADS, SEQ, make_inputs, random_layout,
                                  run_and_compare)
from test_packed_tiles import ds_layout, mixed_layout

from sparse_attn.ops.fused import TileConfig, get_plan, kernel_tiles, set_fused_config
from sparse_attn.ops.fused.lut import get_lut
from sparse_attn.ops.fused.stream import make_stream


@pytest.fixture(autouse=True)
def _fresh_config():
    set_fused_config()
    yield
    set_fused_config()


def streamed(d, per_sm, block=None, **over):
    """Turn the streamed forward on for head_dim d (at this block, or every block), on the
    tile config the plan would pick."""
    base = kernel_tiles(d, block or 64).fwd
    set_fused_config(d, block, fwd=TileConfig(**{**base.__dict__, "stream": per_sm, **over}))


@pytest.mark.parametrize("per_sm", [1, 3])
@pytest.mark.parametrize("dtype,block,d,causal,padded", kernel_cases((16, 64, 128), CUDA))
def test_matrix(per_sm, dtype, block, d, causal, padded):
    seed = zlib.crc32(f"{per_sm}{dtype}{block}{d}{causal}{padded}".encode()) % 10000
    gen = torch.Generator().manual_seed(seed)
    layout = random_layout(HEADS, SEQ // block, p=0.3, causal=causal, gen=gen)
    layout[:, 0] = 1  # a long row, cut into pieces
    q, k, v = make_inputs(BATCH, HEADS, SEQ, d, dtype, seed)
    kpm = None
    if padded:
        kpm = torch.zeros(BATCH, SEQ)
        kpm[0, SEQ - 37:] = float("-inf")
        kpm[1, :7] = torch.rand(7, generator=gen)
        kpm = kpm.to(DEV)
    streamed(d, per_sm)
    run_and_compare(q, k, v, layout, block, causal=causal, kpm=kpm)
    assert get_plan(q, k, v, layout, block, None, causal, kpm).fwd[0].n_runs >= 1


@pytest.mark.parametrize("name", ["tutorial", "bigbird"])
@pytest.mark.parametrize("block", [16, 32])
def test_packed_tiles(name, block):
    """Fine layouts on packed tiles: gathered queries and keys through the walk."""
    set_fused_config(group="always")
    layout = ds_layout(name, block, SEQ)
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.bfloat16, seed=block)
    streamed(64, 2, block)
    run_and_compare(q, k, v, layout, block)


def test_mixed_packed_causal_padded():
    set_fused_config(group="always")
    gen = torch.Generator().manual_seed(5)
    layout = mixed_layout(HEADS, SEQ // 16, gen, causal=True)
    q, k, v = make_inputs(2, HEADS, SEQ, 64, torch.float16, seed=5)
    kpm = torch.zeros(2, SEQ, device=DEV)
    kpm[1, -40:] = float("-inf")
    streamed(64, 2, 16)
    run_and_compare(q, k, v, layout, 16, causal=True, kpm=kpm)


def test_empty_rows_and_fully_padded_batch():
    """Rows with no tile walk a placeholder column: output 0, finite gradients."""
    block, d = 64, 64
    layout = random_layout(HEADS, SEQ // block, p=0.4)
    layout[0, 1] = 0      # a tile row with nothing to see
    layout[1] = 0         # a head that sees nothing
    q, k, v = make_inputs(2, HEADS, SEQ, d, torch.float16, seed=3)
    kpm = torch.zeros(2, SEQ, device=DEV)
    kpm[1] = float("-inf")
    streamed(d, 2)
    out = run_and_compare(q, k, v, layout, block, kpm=kpm)
    assert get_plan(q, k, v, layout, block, None, False, kpm).fwd[0].has_empty
    assert (out[1] == 0).all() and (out[0, 1] == 0).all()
    assert (out[0, 0, block:2 * block] == 0).all()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("runs", [1, 2, 5, 13, 10 ** 6])
def test_walk_covers_each_tile_once(runs):
    """The walk lists every (row, tile) of the LUT once, in row order; each piece starts
    and ends once; a split row's pieces take consecutive slots, as SPLIT says."""
    gen = torch.Generator().manual_seed(runs % 97)
    layout = random_layout(3, 8, p=0.3, gen=gen)
    layout[0, 2] = 0
    layout[1, 0] = 1
    lut = get_lut(layout, 32, 64, 64, 256, False, torch.device("cpu"), "row")
    st = make_stream(lut, runs)
    tiles, rows, flags = (t.long() for t in st.table)
    lens = lut.ntot.long()
    assert st.n_tiles == int(lens.clamp(min=1).sum()) and st.n_runs == min(runs, st.n_tiles)
    want = [(r, int(lut.idx[r, j])) for r in range(lens.numel()) for j in range(lens[r])]
    got = [(int(r), int(t)) for r, t, f in zip(rows, tiles, flags) if not f & 4]
    assert got == want
    assert [int(r) for r, f in zip(rows, flags) if f & 4] == \
        torch.nonzero(lens == 0).flatten().tolist()
    bounds = [c * st.n_tiles // st.n_runs for c in range(st.n_runs + 1)]
    starts = torch.nonzero(flags & 1).flatten().tolist()
    ends = torch.nonzero(flags & 2).flatten().tolist()
    assert len(starts) == len(ends)
    pieces = {}
    for s, e in zip(starts, ends):
        assert s <= e and len(set(rows[s:e + 1].tolist())) == 1
        assert not any(s < b <= e for b in bounds)  # a piece never crosses a run's end
        pieces.setdefault(int(rows[s]), []).append(int(flags[s] >> 3) - 1)
    split = {int(r): (int(a), int(n)) for r, a, n in zip(*st.split)}
    for r, slots in pieces.items():
        if len(slots) == 1:
            assert slots == [-1] and r not in split
        else:
            a, n = split[r]
            assert slots == list(range(a, a + n))
    assert st.n_slots == sum(n for _, n in split.values())


def test_stream_is_a_forward_setting():
    with pytest.raises(ValueError, match="stream is a forward setting"):
        set_fused_config(64, None, dq=TileConfig(64, 64, stream=2))
    with pytest.raises(ValueError, match="non-negative int"):
        set_fused_config(64, None, fwd=TileConfig(64, 64, stream=-1))
