"""Fused block-sparse flash attention vs the float64 dense oracle (forward and gradients).

On a machine without CUDA, conftest sets TRITON_INTERPRET=1 and the same Triton kernels run
on CPU tensors at small shapes; on CUDA the shapes are larger.
"""
import zlib

import pytest
import torch

from reference import assert_rel_close, kernel_cases, reference_attention, rel_error

from sparse_attn.ops.fused import (FusedBlockSparseAttention, TileConfig, cached_plan,
                                   clear_caches, fused_block_sparse_attention, fused_supported,
                                   get_plan, set_fused_config)
from sparse_attn.ops.fused import config as fused_config
from sparse_attn.ops.fused.lut import get_lut, items_per_row, lut_cache_size, split_chunk
from sparse_attn.ops.fused.plan import plan_cache_size

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the device machine)")

# Small shapes on the interpreter, larger on a GPU.
SEQ = 1024 if CUDA else 256
BATCH = 2
HEADS = 4 if CUDA else 2


# ----------------------------------------------------------------------------- layouts
def random_layout(heads, nb, p=0.3, causal=False, gen=None):
    L = (torch.rand(heads, nb, nb, generator=gen) < p).long()
    L[:, torch.arange(nb), torch.arange(nb)] = 1
    return L.tril() if causal else L


def bigbird_like(heads, nb, rand=1, window=3, glob=1, causal=False, gen=None):
    L = torch.zeros(heads, nb, nb, dtype=torch.long)
    w = window // 2
    for h in range(heads):
        for r in range(nb):
            L[h, r, torch.randint(0, nb, (rand,), generator=gen)] = 1
            L[h, r, max(0, r - w):min(nb, r + w + 1)] = 1
    L[:, :glob, :] = 1
    L[:, :, :glob] = 1
    return L.tril() if causal else L


def fixed_like(heads, nb, local=4, glob=1, causal=False):
    L = torch.zeros(heads, nb, nb, dtype=torch.long)
    for i in range(0, nb, local):
        L[:, i:i + local, i:i + local] = 1
    for h in range(heads):  # a different global column per head
        off = local - (1 + h % (local // glob)) * glob
        for i in range(off, nb, local):
            L[h, :, i:i + glob] = 1
    return L.tril() if causal else L


def make_inputs(batch, heads, seq, d, dtype, seed=0, layout="strided"):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq, d)
    if layout == "bnhd":  # [batch, seq, heads, d] storage seen as [batch, heads, seq, d]
        mk = lambda: torch.randn(batch, seq, heads, d, generator=g).transpose(1, 2)
    else:
        mk = lambda: torch.randn(*shape, generator=g)
    return [mk().to(DEV, dtype).requires_grad_() for _ in range(3)]


def run_and_compare(q, k, v, layout, block, *, causal=False, kpm=None, scale=None,
                    factor=1.0, fn=None, check_grads=True):
    fn = fn or (lambda *a, **kw: fused_block_sparse_attention(*a, **kw))
    out = fn(q, k, v, layout, block, scale=scale, causal=causal, key_padding_mask=kpm)
    assert out.shape == q.shape and out.dtype == q.dtype
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, layout, block, scale=scale, causal=causal,
                              key_padding_mask=kpm)
    assert_rel_close(out, ref, q.dtype, factor)
    if not check_grads:
        return out
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do.double())
    for name, a, b in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad),
                       ("dv", v.grad, vd.grad)):
        assert a is not None and a.shape == b.shape, name
        err = rel_error(a, b)
        tol = {torch.float16: 5e-3, torch.bfloat16: 2e-2}[q.dtype] * factor * 2
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
    return out


@pytest.fixture(autouse=True)
def _fresh_config():
    set_fused_config()
    yield
    set_fused_config()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype,block,d,causal,padded", kernel_cases((16, 32, 64, 128), CUDA))
def test_matrix(dtype, block, d, causal, padded):
    seed = zlib.crc32(f"{dtype}{block}{d}{causal}{padded}".encode()) % 10000
    gen = torch.Generator().manual_seed(seed)
    nb = SEQ // block
    layout = random_layout(HEADS, nb, p=0.3, causal=causal, gen=gen)  # differs per head
    q, k, v = make_inputs(BATCH, HEADS, SEQ, d, dtype, seed)
    kpm = None
    if padded:
        kpm = torch.zeros(BATCH, SEQ)
        kpm[0, SEQ - 37:] = float("-inf")           # padded tail
        kpm[1, :7] = torch.rand(7, generator=gen)   # other additive values
        kpm[1, SEQ // 2:] = float("-inf")
        kpm = kpm.to(DEV)
    run_and_compare(q, k, v, layout, block, causal=causal, kpm=kpm)


@pytest.mark.parametrize("kind", ["bigbird", "fixed"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_deepspeed_like_layouts(kind, block, causal):
    gen = torch.Generator().manual_seed(block)
    nb = SEQ // block
    if kind == "bigbird":
        layout = bigbird_like(HEADS, nb, causal=causal, gen=gen)
    else:
        layout = fixed_like(HEADS, nb, local=4, causal=causal)
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.bfloat16, seed=block + 7)
    run_and_compare(q, k, v, layout.bool(), block, causal=causal)


def test_split_min_knob():
    """Rows up to split_min tiles stay whole (no merge launches); the reset restores it."""
    block = 16
    layout = bigbird_like(HEADS, SEQ // block, gen=torch.Generator().manual_seed(5))
    dev = torch.device(DEV)

    def n_split():
        return get_lut(layout, block, 64, 32, SEQ, False, dev, "row").n_split

    set_fused_config(split_min=1)
    assert n_split() > 0
    set_fused_config(split_min=10 ** 6)
    assert n_split() == 0
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.bfloat16, seed=4)
    run_and_compare(q, k, v, layout, block)
    set_fused_config()
    assert fused_config.split_min() == fused_config.SPLIT_MIN_DEFAULT
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="split_min"):
            set_fused_config(split_min=bad)
    with pytest.raises(ValueError, match="head_dim"):
        set_fused_config(fwd=(64, 64, 4, 3))
    with pytest.raises(ValueError, match="tile config"):
        set_fused_config(64, None, fwd=(64, 64))
    with pytest.raises(ValueError, match="'fwd', 'dq' and 'dkdv'"):
        set_fused_config(64, None, bwd=(64, 64, 4, 3))
    set_fused_config()


@pytest.mark.parametrize("block", [16, 64])
def test_causal_drops_blocks_above_the_diagonal(block):
    """causal=True with a layout that is not lower-triangular: every key after its query is
    dropped, whole blocks above the diagonal included (as in the other backends)."""
    gen = torch.Generator().manual_seed(block + 1)
    nb = SEQ // block
    layout = random_layout(HEADS, nb, p=0.4, gen=gen)  # blocks on both sides of the diagonal
    layout[:, torch.arange(nb), torch.arange(nb)] = 1
    assert layout.triu(1).any()
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.bfloat16, seed=block + 3)
    run_and_compare(q, k, v, layout, block, causal=True)


def test_fully_padded_batch_row_and_empty_rows():
    block, d = 32, 64
    nb = SEQ // block
    layout = random_layout(HEADS, nb, p=0.3)
    layout[0, 2] = 0          # a block row with no visible key in head 0
    layout[1, :, :] = 0       # a head that sees nothing
    q, k, v = make_inputs(2, HEADS, SEQ, d, torch.float16, seed=3)
    kpm = torch.zeros(2, SEQ, device=DEV)
    kpm[1] = float("-inf")    # batch row 1 fully padded
    out = run_and_compare(q, k, v, layout, block, kpm=kpm)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert (out[0, 1] == 0).all()
    assert (out[0, 0, 2 * block:3 * block] == 0).all()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
        assert (g[1] == 0).all()
        assert (g[0, 1] == 0).all()
    assert (q.grad[0, 0, 2 * block:3 * block] == 0).all()


@pytest.mark.parametrize("block,seq", [(16, 144), (32, 160), (64, 192)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_seq_not_multiple_of_tile(block, seq, causal):
    if CUDA:
        seq = seq * 5  # still not a multiple of 128
    gen = torch.Generator().manual_seed(seq)
    layout = random_layout(HEADS, seq // block, p=0.4, causal=causal, gen=gen)
    q, k, v = make_inputs(2, HEADS, seq, 64, torch.float16, seed=seq)
    kpm = torch.zeros(2, seq, device=DEV)
    kpm[0, -5:] = float("-inf")
    run_and_compare(q, k, v, layout, block, causal=causal, kpm=kpm)


@pytest.mark.parametrize("cfg", [
    dict(fwd=(64, 64, 4, 2), dq=(64, 32, 4, 2), dkdv=(32, 64, 4, 2)),
    dict(fwd=(128, 128, 8, 2), dq=(128, 128, 8, 2), dkdv=(128, 128, 8, 2)),  # 64 bits/tile
    dict(fwd=(64, 128, 4, 2), dq=(32, 128, 4, 2), dkdv=(128, 32, 4, 2)),
    dict(fwd=(64, 32, 4, 3, True), dq=(64, 32, 4, 3, True), dkdv=(32, 64, 4, 3, True)),
    dict(fwd=(64, 64, 4, 3, False, 128), dq=(64, 64, 4, 2, True, 168),
         dkdv=(64, 64, 4, 3, False, 168)),  # register caps (ignored by the interpreter)
    dict(fwd=TileConfig(block_m=128, block_n=32, num_warps=4, num_stages=2),
         dq=TileConfig(block_m=32, block_n=64), dkdv=TileConfig(64, 32, one_loop=True)),
])
@pytest.mark.parametrize("block", [16, 128])
def test_other_tile_configs(cfg, block):
    set_fused_config(64, None, **cfg)
    gen = torch.Generator().manual_seed(block)
    layout = random_layout(HEADS, SEQ // block, p=0.3, gen=gen)
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.bfloat16, seed=11)
    kpm = torch.zeros(1, SEQ, device=DEV)
    kpm[0, -17:] = float("-inf")
    run_and_compare(q, k, v, layout, block, kpm=kpm, causal=True)


@pytest.mark.parametrize("batch", [1, 4])
def test_work_items_cover_each_row_once(batch):
    """Each LUT row becomes max(1, round(L / S)) contiguous items that cover it exactly once,
    S from the whole call's tiles (so a larger batch cuts rows into fewer, longer items), and
    each record carries its first tile; tables are cached per batch."""
    nb = 64
    layout = bigbird_like(HEADS, nb, rand=0, window=1)  # rows of 2 tiles and one of 64
    dev = torch.device(DEV)
    lut = get_lut(layout, 64, 64, 64, nb * 64, False, dev, "row", batch=batch)
    if batch == 1:
        assert lut.n_split > 0  # the global row is cut
    lens = lut.ntot.cpu().long()
    S = split_chunk(int(lens.sum()) * batch, dev)
    work = lut.work.cpu().long()
    assert work.shape == (5, lut.n_work)
    idx = lut.idx.cpu().long()
    assert (work[4] == idx[work[0], work[1]]).all()  # each item's first tile
    for r in range(lens.numel()):
        mine = work[:, work[0] == r]
        spans = sorted(zip(mine[1].tolist(), mine[2].tolist()))
        assert len(spans) == max(1, (int(lens[r]) + S // 2) // S)
        assert spans[0][0] == 0 and spans[-1][1] == lens[r]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(hi - lo <= S + S // 2 for lo, hi in spans)
        assert ((mine[3] >= 0) == (len(spans) > 1)).all()  # a workspace slot iff split
    one = get_lut(layout, 64, 64, 64, nb * 64, False, dev, "row", batch=1)
    assert (one is lut) == (batch == 1)
    assert one.n_work >= lut.n_work


@pytest.mark.parametrize("block, causal, want", [(64, False, True), (128, False, True),
                                                 (64, True, False), (16, False, False)])
def test_all_full_tables(block, causal, want):
    """A table with no partial tile (coarse layout, no causal mask, sequence a multiple of
    the tile) sets all_full, and then the kernels get no NFULL pointer; then both kinds of
    table run against the reference."""
    nb = SEQ // block
    layout = bigbird_like(HEADS, nb, causal=causal, gen=torch.Generator().manual_seed(block))
    dev = torch.device(DEV)
    for kind in ("row", "col"):
        lut = get_lut(layout, block, 64, 64, SEQ, causal, dev, kind)
        assert lut.all_full == want
        assert (lut.nfull_arg is None) == want
        assert lut.all_full == bool((lut.nfull == lut.ntot).all())
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=block)
    run_and_compare(q, k, v, layout, block, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("block", [16, 64])
def test_split_long_rows(dtype, block):
    """Rows/columns longer than the chunk are cut into work items merged afterwards (the
    BigBird global row/column); force tiny chunks so that every path splits."""
    set_fused_config(split_min=1)
    set_fused_config(64, None, fwd=(64, 32, 4, 2), dq=(64, 32, 4, 2), dkdv=(32, 64, 4, 2))
    try:
        gen = torch.Generator().manual_seed(block)
        nb = SEQ // block
        layout = bigbird_like(HEADS, nb, gen=gen)
        layout[0, :, 1:] = 0  # head 0: the first block column only, rows see one block
        q, k, v = make_inputs(2, HEADS, SEQ, 64, dtype, seed=21)
        kpm = torch.zeros(2, SEQ, device=DEV)
        kpm[1] = float("-inf")
        kpm[0, :block] = float("-inf")  # head 0 sees nothing in batch 0
        kpm[0, -9:] = 0.25
        lut = get_lut(layout, block, 64, 32, SEQ, False, q.device, "row")
        assert lut.n_split > 0
        out = run_and_compare(q, k, v, layout, block, kpm=kpm)
        assert (out[1] == 0).all() and (out[0, 0] == 0).all()
        assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all()
        # the forward's merge counts each row's arrivals from zero at every call, and merges
        # the items in slot order whichever of them arrives last: the same bits every time
        for _ in range(2):
            again = fused_block_sparse_attention(q.detach(), k.detach(), v.detach(), layout,
                                                 block, key_padding_mask=kpm)
            assert torch.equal(again, out.detach())
    finally:
        clear_caches()


@pytest.mark.parametrize("S", [1, 16, 46, 47, 90])
def test_items_per_row_bound(S):
    """A row of L tiles becomes the fewest items (at least one) whose near-equal ranges
    (i * L // n) are at most ceil(1.2 S) tiles long."""
    lens = torch.arange(0, 600)
    n = items_per_row(lens, S)
    assert (n >= 1).all()
    assert (-(-lens // n) <= -(-6 * S // 5)).all()  # ranges i * L // n: at most ceil(L / n)
    assert ((n == 1) | (5 * lens > 6 * S * (n - 1))).all()  # one item fewer: too long


def _count_descriptors(monkeypatch):
    """Count the TMA descriptors the plans make (forward: four; dq, dk/dv: two each)."""
    made = []
    real = fused_config.descriptor
    monkeypatch.setattr(fused_config, "descriptor",
                        lambda t, rows: made.append(rows) or real(t, rows))
    return made


# (dtype, block, head_dim, causal, key padding, seq, memory format): a coarse all-full table,
# fine layouts with partial tiles, a sequence that is not a multiple of the tile (the
# descriptor's bounds zero the rows past N), [B, N, H, D] views, split rows (block 16)
_TMA_CASES = [
    pytest.param(torch.bfloat16, 64, 64, False, False, SEQ, "strided", id="bf16-b64-full"),
    pytest.param(torch.float16, 16, 64, True, True, SEQ, "bnhd", id="fp16-b16-causal-kpm-bnhd"),
    pytest.param(torch.bfloat16, 32, 32, False, True, SEQ - 32, "strided",
                 id="bf16-b32-d32-kpm-uneven"),
    pytest.param(torch.float16, 128, 128, True, False, SEQ, "bnhd", id="fp16-b128-d128-causal"),
]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype,block,d,causal,padded,seq,fmt", _TMA_CASES)
def test_tma_and_pointer_paths(tma, dtype, block, d, causal, padded, seq, fmt, monkeypatch):
    """Either way of loading the tiles that a row / column walks (TMA descriptors, or pointer
    tensors) against the reference, and the two bit-identical. On a GPU with TMA the default
    is TMA; the pointer path is what older GPUs and misaligned tensors take."""
    made = _count_descriptors(monkeypatch)
    gen = torch.Generator().manual_seed(block + d)
    layout = bigbird_like(HEADS, -(-seq // block), causal=causal, gen=gen)
    q, k, v = make_inputs(BATCH, HEADS, seq, d, dtype, seed=block, layout=fmt)
    kpm = None
    if padded:
        kpm = torch.zeros(BATCH, seq, device=DEV)
        kpm[0, seq - 21:] = float("-inf")
        kpm[1, :5] = 0.5
    outs = []
    for use in (not tma, tma):  # the last run is the one compared with the reference
        set_fused_config(tma=use)
        for t in (q, k, v):
            t.grad = None
        made.clear()
        torch.manual_seed(0)  # the same incoming gradient both times
        out = run_and_compare(q, k, v, layout, block, causal=causal, kpm=kpm)
        outs.append((out.detach(), q.grad, k.grad, v.grad))
        # fwd: q, k, v, out; dq: k, v; dk/dv: q, dO; none for a kernel whose tiles are all
        # gathered (packed tiles)
        groups = get_plan(q, k, v, layout, block, None, causal, kpm).groups
        gq, gk = groups.qmap is not None, groups.kmap is not None
        want = (0 if gq and gk else 4) + (0 if gk else 2) + (0 if gq else 2)
        assert len(made) == (want if use else 0), made
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_tma_falls_back_per_call_and_per_plan(monkeypatch):
    """A base that is not 16-byte aligned takes the pointer kernel for that call (the plan
    stays); strides that are not multiples of 16 bytes make a plan without TMA."""
    made = _count_descriptors(monkeypatch)
    set_fused_config(tma=True)
    block, d = 64, 64
    layout = bigbird_like(HEADS, SEQ // block, gen=torch.Generator().manual_seed(3))
    q, k, v = make_inputs(1, HEADS, SEQ, d, torch.float16, seed=3)
    n = k.numel()
    buf = torch.randn(n + 4, device=DEV, dtype=torch.float16)
    k_off = buf[4:].view_as(k).copy_(k.detach()).requires_grad_()  # base 8 bytes off
    assert k_off.data_ptr() % 16 == 8 and k_off.stride() == k.stride()
    run_and_compare(q, k_off, v, layout, block)
    assert len(made) == 2  # forward and dq use k: pointers; dk/dv (q, dO) still TMA
    made.clear()
    wide = torch.randn(1, HEADS, SEQ, d + 4, device=DEV, dtype=torch.float16)
    v_odd = wide[..., :d].copy_(v.detach()).requires_grad_()  # row stride 136 bytes
    assert v_odd.stride(2) * 2 % 16 != 0
    for t in (q, k_off):
        t.grad = None
    run_and_compare(q, k, v_odd, layout, block)
    assert len(made) == 2  # only dk/dv (q, dO) fit a descriptor
    with pytest.raises(ValueError, match="tma"):
        set_fused_config(tma="fwd")
    with pytest.raises(ValueError, match="tma"):
        set_fused_config(tma=("fwd", "bwd"))


@pytest.mark.parametrize("min_work, capturing, expect", [
    (1, False, 8),       # large launches: TMA always
    (1 << 60, False, 0),  # small launches: pointers (descriptors would cost more host time)
    (1 << 60, True, 8),   # ... unless a CUDA graph is being captured
])
def test_tma_default_by_work_and_capture(min_work, capturing, expect, monkeypatch):
    """Unforced (the default on a GPU with TMA), a kernel takes its TMA variant for launches
    of at least _TMA_MIN_WORK, or while a CUDA graph is captured, and at a plan's first call
    (so that a capture never loads a kernel); the results do not change."""
    made = _count_descriptors(monkeypatch)
    block, d = 32, 64
    layout = bigbird_like(HEADS, SEQ // block, gen=torch.Generator().manual_seed(4))
    q, k, v = make_inputs(BATCH, HEADS, SEQ, d, torch.bfloat16, seed=4)
    set_fused_config(tma=False)
    torch.manual_seed(0)
    ref = run_and_compare(q, k, v, layout, block)
    ref_grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    set_fused_config()  # the default; in the interpreter it would be pointers only
    monkeypatch.setattr(fused_config, "tma_kernels",
                        lambda device: frozenset(fused_config.KERNELS))
    monkeypatch.setattr(fused_config, "TMA_MIN_WORK", min_work)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    fused_block_sparse_attention(q, k, v, layout, block).sum().backward()  # first calls
    assert len(made) == 8, made
    made.clear()
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(0)
    out = run_and_compare(q, k, v, layout, block)
    assert len(made) == expect, made
    assert torch.equal(out, ref)
    for t, g in zip((q, k, v), ref_grads):
        assert torch.equal(t.grad, g)


@pytest.mark.parametrize("scale", [0.3, -0.3])
def test_scale_and_noncontiguous_inputs(scale):
    """A custom scale (a negative one takes the forward kernel's other variant: the row max
    of the raw products is then not the max of the scaled scores) on [B, N, H, D] inputs."""
    block = 32
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(5))
    q, k, v = make_inputs(2, HEADS, SEQ, 64, torch.float16, seed=5, layout="bnhd")
    assert not q.is_contiguous()
    run_and_compare(q, k, v, layout, block, scale=scale)


@pytest.mark.parametrize("inputs, grad", [("bnhd", "contiguous"), ("strided", "bnhd"),
                                         ("bnhd", "bnhd")])
def test_memory_formats_of_inputs_outputs_and_gradients(inputs, grad):
    """The output and the gradients take the memory format of q, k, v (so a [B, N, H, D]
    projection seen as [B, H, N, D] needs no copy either way); an incoming gradient in any
    format with a unit last stride is read in place."""
    block = 16
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(8))
    q, k, v = make_inputs(2, HEADS, SEQ, 64, torch.bfloat16, seed=8, layout=inputs)
    out = fused_block_sparse_attention(q, k, v, layout, block)
    assert out.stride() == q.stride()
    g = torch.Generator().manual_seed(9)
    if grad == "bnhd":
        do = torch.randn(2, SEQ, HEADS, 64, generator=g).transpose(1, 2).to(DEV, q.dtype)
    else:
        do = torch.randn(2, HEADS, SEQ, 64, generator=g).to(DEV, q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for t, gr in zip((q, k, v), grads):
        assert gr.stride() == t.stride()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, layout, block)
    assert_rel_close(out, ref, q.dtype)
    for a, b in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), do.double())):
        assert_rel_close(a, b, q.dtype, factor=2)


def test_custom_op_eager_autograd():
    """The registered op (what torch.compile sees) differentiates in eager mode too."""
    block = 64
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(9))
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=9)

    def fn(q, k, v, layout, block, scale=None, causal=False, key_padding_mask=None):
        out, _ = torch.ops.sparse_attn.fused_attention_fwd(q, k, v, layout, key_padding_mask,
                                                           block, q.shape[-1] ** -0.5, causal)
        return out
    run_and_compare(q, k, v, layout, block, fn=fn, causal=True)


def test_autograd_function():
    block = 32
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(9))
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.bfloat16, seed=10)

    def fn(q, k, v, layout, block, scale=None, causal=False, key_padding_mask=None):
        plan = get_plan(q, k, v, layout, block, scale, causal, key_padding_mask)
        return FusedBlockSparseAttention.apply(q, k, v, plan.key_padding(key_padding_mask),
                                               plan)
    run_and_compare(q, k, v, layout, block, fn=fn)


def test_one_plan_serves_fresh_inputs_and_gradients_in_any_format():
    """Calls with one signature share a plan (checked and worked out once); each call still
    computes its own inputs: fresh q, k, v and mask values every call, the incoming gradient
    contiguous in one call and [B, N, H, D] in the next (the backward keys on its strides),
    a float16 [B, 1, 1, N] mask converted per call."""
    clear_caches()
    block = 32
    layout = bigbird_like(HEADS, SEQ // block, gen=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(12)
    for call, grad_format in enumerate(("contiguous", "bnhd", "contiguous")):
        q, k, v = make_inputs(2, HEADS, SEQ, 64, torch.bfloat16, seed=20 + call, layout="bnhd")
        kpm = torch.zeros(2, 1, 1, SEQ, dtype=torch.float16)
        kpm[call % 2, ..., -(call + 1) * 7:] = float("-inf")
        kpm = kpm.to(DEV)
        out = fused_block_sparse_attention(q, k, v, layout, block, key_padding_mask=kpm)
        if grad_format == "bnhd":
            do = torch.randn(2, SEQ, HEADS, 64, generator=g).transpose(1, 2).to(DEV, q.dtype)
        else:
            do = torch.randn(2, HEADS, SEQ, 64, generator=g).to(DEV, q.dtype)
        grads = torch.autograd.grad(out, (q, k, v), do)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qd, kd, vd, layout, block, key_padding_mask=kpm.view(2, SEQ))
        assert_rel_close(out, ref, q.dtype)
        for a, b in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), do.double())):
            assert_rel_close(a, b, q.dtype, factor=2)
    assert plan_cache_size() == 1
    assert len(cached_plan(q, k, v, layout, block, None, False, kpm).bwd) == 2


def test_one_validator_for_every_entry_point():
    """The public fused function and block_sparse_attention apply the same rules with the
    same messages: a [B, 1, 1, N] mask is taken by both (one plan serves both), a wrong one
    is refused by both; and a planned call does not let a call with another signature skip
    the checks."""
    from sparse_attn.ops import block_sparse_attention

    clear_caches()
    block = 64
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(13))
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=13)
    kpm4 = torch.zeros(1, 1, 1, SEQ, device=DEV)
    kpm4[..., -9:] = float("-inf")
    with torch.no_grad():
        want = fused_block_sparse_attention(q, k, v, layout, block, key_padding_mask=kpm4)
        out = block_sparse_attention(q, k, v, layout, block, key_padding_mask=kpm4,
                                     backend="fused")
        assert torch.equal(out, want) and plan_cache_size() == 1
        assert_rel_close(out, reference_attention(q, k, v, layout, block,
                                                  key_padding_mask=kpm4.view(1, SEQ)), q.dtype)
        bad = torch.zeros(1, SEQ // 2, device=DEV)
        for fn in (fused_block_sparse_attention,
                   lambda *a, **kw: block_sparse_attention(*a, backend="fused", **kw)):
            with pytest.raises(ValueError, match="key_padding_mask has shape"):
                fn(q, k, v, layout, block, key_padding_mask=bad)
            with pytest.raises(ValueError, match="layout"):
                fn(q, k, v, layout[:1], block)


def test_lut_cache_hits_and_rebuilds_on_change():
    clear_caches()
    block = 32
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(1))
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=1)
    with torch.no_grad():
        fused_block_sparse_attention(q, k, v, layout, block)
        n = lut_cache_size()
        assert n == 1
        fused_block_sparse_attention(q, k, v, layout, block)
        fused_block_sparse_attention(q, k, v, layout[:, :, :], block)  # a view hits too
        assert lut_cache_size() == n
        layout[:, 0, :] = 1 - layout[:, 0, :]  # in place: must rebuild
        layout[:, 0, 0] = 1
        out = fused_block_sparse_attention(q, k, v, layout, block)
        assert lut_cache_size() == n + 1
    ref = reference_attention(q, k, v, layout, block)
    assert_rel_close(out, ref, q.dtype)


def test_table_byte_budget_drops_other_layouts_tables(monkeypatch):
    """Past PLAN_TABLE_BYTES of tables the plans of other layouts go with their tables (long
    sequences of varying length would otherwise keep gigabytes per length); every call still
    computes its own layout's attention."""
    from sparse_attn.ops.fused import plan as plan_mod

    clear_caches()
    block = 32
    gen = torch.Generator().manual_seed(21)
    layouts = [random_layout(HEADS, SEQ // block, gen=gen) for _ in range(2)]
    one = plan_mod.table_bytes(layouts[0])
    monkeypatch.setattr(plan_mod, "PLAN_TABLE_BYTES", one + one // 2)
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=21)
    with torch.no_grad():
        for i, layout in enumerate(layouts + layouts[:1]):
            out = fused_block_sparse_attention(q, k, v, layout, block)
            assert_rel_close(out, reference_attention(q, k, v, layout, block), q.dtype)
            assert plan_cache_size() == 1 and lut_cache_size() == 1
        monkeypatch.setattr(plan_mod, "PLAN_TABLE_BYTES", 3 * one)
        fused_block_sparse_attention(q, k, v, layouts[1], block)
        assert plan_cache_size() == 2 and lut_cache_size() == 2


def test_layouts_of_past_calls_are_not_pinned():
    """Once the caches drop a layout's tables, nothing of ours keeps the layout alive (long
    sequences of varying length bring a new device layout per length: GiBs each)."""
    import gc
    import weakref

    clear_caches()
    block = 32
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(23))
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=23)
    with torch.no_grad():
        fused_block_sparse_attention(q, k, v, layout, block)
    alive = weakref.ref(layout)
    clear_caches()
    del layout
    gc.collect()
    assert alive() is None


def test_layout_cache_bounds_bytes_counting_shared_layouts_once():
    from sparse_attn.ops.caching import LayoutCache

    mib = 1 << 20
    cache = LayoutCache(64, max_bytes=10 * mib)
    layouts = [torch.zeros(mib // 8, dtype=torch.int64) for _ in range(3)]  # 1 MiB each
    table = lambda n: (lambda: {"idx": torch.zeros(n * mib, dtype=torch.uint8)})  # noqa: E731
    cache.get("a-row", layouts[0], torch.device("cpu"), table(3))
    cache.get("a-col", layouts[0], torch.device("cpu"), table(3))
    assert len(cache) == 2 and cache.nbytes() == 7 * mib  # the shared layout counted once
    cache.get("b-row", layouts[1], torch.device("cpu"), table(3))  # 11 MiB: the oldest goes
    assert len(cache) == 2 and cache.nbytes() == 8 * mib
    cache.get("a-col", layouts[0], torch.device("cpu"), table(3))  # a hit: now the newest
    cache.get("c-row", layouts[2], torch.device("cpu"), table(20))  # alone past the bound
    assert len(cache) == 1 and cache.nbytes() == 21 * mib
    cache.get("c-col", layouts[2], torch.device("cpu"), table(20))  # its layout's pair stays
    assert len(cache) == 2 and cache.nbytes() == 41 * mib
    cache.get("a-row", layouts[0], torch.device("cpu"), table(3))  # both of c's go
    assert len(cache) == 1 and cache.nbytes() == 4 * mib


def test_bad_inputs_raise_value_error():
    q, k, v = make_inputs(1, 2, 128, 64, torch.float16)
    L = torch.ones(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="float32"):
        fused_block_sparse_attention(q.float(), k.float(), v.float(), L, 32)
    with pytest.raises(ValueError, match="head_dim"):
        q2 = q[..., :48]
        fused_block_sparse_attention(q2, q2, q2, L, 32)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        q3 = q[:, :, :120]
        fused_block_sparse_attention(q3, q3, q3, L, 32)
    with pytest.raises(ValueError, match="layout"):
        fused_block_sparse_attention(q, k, v, torch.ones(3, 4, 4), 32)
    with pytest.raises(ValueError, match="layout"):
        fused_block_sparse_attention(q, k, v, torch.ones(2, 8, 8, dtype=torch.long), 32)
    with pytest.raises(ValueError, match="block"):
        fused_block_sparse_attention(q, k, v, torch.ones(2, 16, 16, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fused_block_sparse_attention(q, k, v, L, 32, key_padding_mask=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="same shape"):
        fused_block_sparse_attention(q, k[:, :1], v, L, 32)
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        fused_block_sparse_attention(q, k, v, L, 32,
                                     key_padding_mask=torch.zeros(1, 128, device="meta"))


def test_fused_supported_reasons():
    q, k, v = make_inputs(1, 2, 128, 64, torch.float16)
    assert fused_supported(q, k, v) is None
    assert fused_supported(q, k, v, layout=torch.ones(2, 4, 4, dtype=torch.long), block=32) is None
    assert "rpe" in fused_supported(q, k, v, rpe=torch.zeros(1))
    assert "attn_mask" in fused_supported(q, k, v, attn_mask=torch.zeros(1))
    assert "dtype" in fused_supported(q.float(), k.float(), v.float())
    assert "head_dim" in fused_supported(q[..., :16], k[..., :16], v[..., :16])
    assert "block" in fused_supported(q, k, v, block=8)
    if CUDA:
        assert "cuda" in fused_supported(q.cpu(), k.cpu(), v.cpu()).lower()


def test_torch_compile_fullgraph_aot_eager():
    """No graph break: the op traces under fullgraph=True (aot_eager needs no compiler)."""
    block = 32
    layout = random_layout(HEADS, SEQ // block, gen=torch.Generator().manual_seed(2))
    kpm = torch.zeros(1, SEQ, device=DEV)
    kpm[0, -3:] = float("-inf")

    def f(q, k, v):
        return fused_block_sparse_attention(q, k, v, layout, block, key_padding_mask=kpm) * 2

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, k, v = make_inputs(1, HEADS, SEQ, 64, torch.float16, seed=2)
    run_and_compare(q, k, v, layout, block, kpm=kpm, factor=1.0,
                    fn=lambda q, k, v, *a, **kw: cf(q, k, v) / 2)


def test_opcheck():
    block = 64
    layout = random_layout(2, 128 // block, gen=torch.Generator().manual_seed(4))
    q, k, v = make_inputs(1, 2, 128, 32, torch.float16, seed=4)
    torch.library.opcheck(torch.ops.sparse_attn.fused_attention_fwd.default,
                          (q, k, v, layout, None, block, 0.125, False),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_torch_compile_inductor_gpu(causal):
    block = 64
    layout = bigbird_like(HEADS, SEQ // block, causal=causal,
                          gen=torch.Generator().manual_seed(8))
    lin = torch.nn.Linear(64, 64, device=DEV, dtype=torch.bfloat16)

    def f(q, k, v):
        return lin(fused_block_sparse_attention(lin(q), k, v, layout, block, causal=causal))

    cf = torch.compile(f, fullgraph=True)
    q, k, v = make_inputs(2, HEADS, SEQ, 64, torch.bfloat16, seed=8)
    out = cf(q, k, v)
    ref = f(q, k, v)
    assert_rel_close(out, ref.double(), torch.bfloat16)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@gpu_only
@pytest.mark.parametrize("block", [16, 64, 128])
def test_gpu_long_sequence(block):
    seq = 4096
    layout = bigbird_like(4, seq // block, gen=torch.Generator().manual_seed(block))
    q, k, v = make_inputs(1, 4, seq, 64, torch.bfloat16, seed=block)
    run_and_compare(q, k, v, layout, block)


@gpu_only
def test_gpu_no_host_sync_after_first_call():
    block = 64
    layout = random_layout(HEADS, SEQ // block).to(DEV)
    q, k, v = make_inputs(2, HEADS, SEQ, 64, torch.bfloat16, seed=1)
    fused_block_sparse_attention(q, k, v, layout, block).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_block_sparse_attention(q, k, v, layout, block)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
