"""Packed tiles (``sparse_attn.ops.fused.grouping``): fine layouts whose tiles are groups of
blocks, not contiguous ranges. The orders and tables are checked for coverage; the kernels on
gathered tiles against the float64 dense oracle, forward and gradients.

On a machine without CUDA the kernels run in Triton's interpreter at small shapes.
"""
import zlib

import pytest
import torch

from reference import assert_rel_close, kernel_cases, reference_attention, rel_error

from sparse_attn.ops.fused import (clear_caches, fused_block_sparse_attention, get_plan,
                                   kernel_tiles, set_fused_config)
from sparse_attn.ops.fused.grouping import (IDENTITY, PACK_GAIN, block_orders, get_groups,
                                            tile_area, tiles_and_groups)
from sparse_attn.ops.fused.lut import get_lut
from sparse_attn.sparsity_config import (BigBirdSparsityConfig, BSLongformerSparsityConfig,
                                         FixedSparsityConfig, VariableSparsityConfig)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SEQ = 1024 if CUDA else 256
HEADS = 4 if CUDA else 2
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the device machine)")


@pytest.fixture(autouse=True)
def _fresh_config():
    """Packing wherever it applies (the kernels on packed tiles, whatever the layout); the
    tests of the rule that decides where packing pays set group=True themselves."""
    set_fused_config()
    set_fused_config(group="always")
    yield
    set_fused_config()


def mixed_layout(heads, nb, gen, causal=False, p=0.06):
    """Rows and columns of mixed patterns, different per head: windows of 4 blocks, a global
    column and a global row at a per-head position, and random blocks (``p`` of them)."""
    L = torch.zeros(heads, nb, nb, dtype=torch.long)
    for i in range(0, nb, 4):
        L[:, i:i + 4, i:i + 4] = 1
    for h in range(heads):
        g = (3 + 2 * h) % nb
        L[h, :, g] = 1
        L[h, (1 + h) % nb, :] = 1
        L[h][torch.rand(nb, nb, generator=gen) < p] = 1
    return L.tril() if causal else L


def ds_layout(name, block, seq):
    """The DeepSpeed layouts users run at fine blocks."""
    if name == "tutorial":
        cfg = FixedSparsityConfig(HEADS, block, num_local_blocks=4, num_global_blocks=1,
                                  different_layout_per_head=True,
                                  num_different_global_patterns=min(4, HEADS))
    elif name == "fixed_unidirectional":
        cfg = FixedSparsityConfig(HEADS, block, num_local_blocks=4, num_global_blocks=1,
                                  attention="unidirectional")
    elif name == "bigbird":
        cfg = BigBirdSparsityConfig(HEADS, block, num_random_blocks=1, num_global_blocks=1)
    elif name == "variable":
        cfg = VariableSparsityConfig(HEADS, block, num_random_blocks=1, local_window_blocks=[4],
                                     global_block_indices=[0, 8])
    else:
        cfg = BSLongformerSparsityConfig(HEADS, block, num_sliding_window_blocks=3,
                                         global_block_indices=[0, 5])
    return cfg.make_layout(seq)


def make_inputs(batch, seq, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, seq, d, generator=g).to(DEV, dtype).requires_grad_()
            for _ in range(3)]


def compare(q, k, v, layout, block, causal=False, kpm=None):
    out = fused_block_sparse_attention(q, k, v, layout, block, causal=causal,
                                       key_padding_mask=kpm)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, layout, block, causal=causal, key_padding_mask=kpm)
    assert_rel_close(out, ref, q.dtype)
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do.double())
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[q.dtype]
    for name, a, b in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        err = rel_error(a, b)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
    return out


# ------------------------------------------------------------------------------ orders
def test_global_blocks_go_first_in_order():
    """Fixed: the global column of every window goes first (in order), the windows' other
    blocks keep their order; rows (all alike) keep the identity."""
    L = FixedSparsityConfig(1, 16, num_local_blocks=4, num_global_blocks=1).make_layout(512)
    qo, ko = block_orders(L)
    nb = L.shape[1]
    assert torch.equal(qo[0], torch.arange(nb))
    glob = torch.arange(3, nb, 4)
    assert torch.equal(ko[0, :glob.numel()], glob)
    rest = torch.tensor([i for i in range(nb) if i % 4 != 3])
    assert torch.equal(ko[0, glob.numel():], rest)


def test_dense_and_coarse_layouts_keep_contiguous_tiles():
    tiles = kernel_tiles(64, 16)
    dense = torch.ones(2, 16, 16, dtype=torch.long)
    assert get_groups(dense, 16, 256, torch.device(DEV), tiles) is IDENTITY
    coarse = ds_layout("bigbird", 64, 1024)
    assert get_groups(coarse, 64, 1024, torch.device(DEV), kernel_tiles(64, 64)) is IDENTITY
    set_fused_config(group=False)
    L = mixed_layout(2, 16, torch.Generator().manual_seed(0))
    assert get_groups(L, 16, 256, torch.device(DEV), tiles) is IDENTITY


def test_tile_area_counts_visited_tiles():
    """Against a loop over the tiles, on a permuted mixed layout."""
    gen = torch.Generator().manual_seed(3)
    L = mixed_layout(3, 10, gen)
    qo = torch.stack([torch.randperm(10, generator=gen) for _ in range(3)])
    ko = torch.stack([torch.randperm(10, generator=gen) for _ in range(3)])
    for tm, tn in ((64, 32), (32, 64), (64, 64)):
        want = 0
        for h in range(3):
            P = L[h][qo[h]][:, ko[h]]
            for i in range(0, 10, tm // 16):
                for j in range(0, 10, tn // 16):
                    want += bool(P[i:i + tm // 16, j:j + tn // 16].any()) * tm * tn
        assert int(tile_area(L, qo, ko, 16, tm, tn)) == want


@pytest.mark.parametrize("name,block,packed", [
    ("fixed", 16, "k"), ("tutorial", 16, "k"), ("fixed", 32, "k"),
    ("variable", 16, None), ("bigbird", 16, None)])
def test_packing_only_where_it_pays(name, block, packed):
    """The default rule (group=True) on DeepSpeed layouts at 4096: Fixed packs its key side
    only (its rows are all alike); Variable, whose 4-block windows are aligned with the
    contiguous tiles, would cover more area packed (H100: 30% slower) and stays contiguous;
    BigBird's orders are the identity."""
    set_fused_config(group=True)
    seq = 4096
    if name == "fixed":
        layout = FixedSparsityConfig(4, block, num_local_blocks=4,
                                     num_global_blocks=1).make_layout(seq)
    else:
        layout = ds_layout(name, block, seq)
    tiles, groups = tiles_and_groups(layout, block, seq, torch.device(DEV), 64)
    got = None if not groups.any else "qk" if groups.qmap is not None and \
        groups.kmap is not None else "q" if groups.qmap is not None else "k"
    assert got == packed
    if packed:
        f, c = tiles.fwd, kernel_tiles(64, block).fwd
        on_dev = layout.to(DEV)  # the orders live where the kernel runs
        kept = tile_area(on_dev, groups.qorder, groups.korder, block, f.block_m, f.block_n)
        assert kept < PACK_GAIN * tile_area(on_dev, None, None, block, c.block_m, c.block_n)
    else:
        assert tiles == kernel_tiles(64, block)


def _covered(lut, groups, H, nb, block, TM, TN, kind):
    """How often each (query block, key block) of each head is visited by a kept unit of the
    table: [H, nb, nb] counts."""
    a, c = TM // block, TN // block
    ident = torch.arange(nb).expand(H, nb)
    qo = ident if groups.qorder is None else groups.qorder.cpu()
    ko = ident if groups.korder is None else groups.korder.cpu()
    counts = torch.zeros(H, nb, nb, dtype=torch.long)
    idx, ntot, bits = lut.idx.cpu(), lut.ntot.cpu(), lut.bits.cpu()
    for r in range(idx.shape[0]):
        h, own = divmod(r, lut.n_own)
        for e in range(int(ntot[r])):
            other = int(idx[r, e])
            qt, kt = (own, other) if kind == "row" else (other, own)
            word = int(bits[r, e])
            for u in range(a * c):
                if word >> u & 1:
                    i, j = qt * a + u // c, kt * c + u % c
                    if i < nb and j < nb:
                        counts[h, qo[h, i], ko[h, j]] += 1
    return counts


@pytest.mark.parametrize("kind", ["row", "col"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("block,TM,TN", [(16, 64, 32), (16, 32, 64), (16, 64, 64), (32, 64, 64)])
def test_tables_cover_every_kept_block_once(kind, causal, block, TM, TN):
    nb = 20
    L = mixed_layout(3, nb, torch.Generator().manual_seed(block + TM), causal=causal)
    dev = torch.device(DEV)
    groups = get_groups(L, block, nb * block, dev, kernel_tiles(64, block))
    assert groups.qorder is not None and groups.korder is not None  # not trivial
    for order in (groups.qorder, groups.korder):  # each a permutation of the blocks
        assert torch.equal(order.sort(-1).values.cpu(), torch.arange(nb).expand(3, nb))
    lut = get_lut(L, block, TM, TN, nb * block, causal, dev, kind, groups=groups)
    want = L.tril() if causal else L
    assert torch.equal(_covered(lut, groups, 3, nb, block, TM, TN, kind), want)


# ------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("dtype,block,d,causal,padded", kernel_cases((16, 32), CUDA))
def test_packed_matches_reference(dtype, block, d, causal, padded):
    seed = zlib.crc32(f"{dtype}{block}{d}{causal}{padded}".encode()) % 10000
    gen = torch.Generator().manual_seed(seed)
    layout = mixed_layout(HEADS, SEQ // block, gen, causal=causal)
    q, k, v = make_inputs(2, SEQ, d, dtype, seed)
    kpm = None
    if padded:
        kpm = torch.zeros(2, SEQ)
        kpm[0, SEQ - 37:] = float("-inf")
        kpm[1, :7] = torch.rand(7, generator=gen)
        kpm[1, SEQ // 2:] = float("-inf")
        kpm = kpm.to(DEV)
    compare(q, k, v, layout, block, causal=causal, kpm=kpm)
    groups = get_plan(q, k, v, layout, block, None, causal, kpm).groups
    assert groups.qmap is not None and groups.kmap is not None


@pytest.mark.parametrize("name,causal", [("tutorial", False), ("fixed_unidirectional", True),
                                         ("bigbird", False), ("variable", False),
                                         ("bslongformer", False)])
@pytest.mark.parametrize("block", [16, 32])
def test_deepspeed_layouts(name, causal, block):
    layout = ds_layout(name, block, SEQ)
    q, k, v = make_inputs(2, SEQ, 64, torch.bfloat16, seed=block)
    kpm = torch.zeros(2, SEQ, device=DEV)
    kpm[1, -block - 3:] = float("-inf")
    compare(q, k, v, layout, block, causal=causal, kpm=kpm)


@pytest.mark.parametrize("block,seq", [(16, 144), (32, 224)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_seq_not_multiple_of_tile(block, seq, causal):
    """The token maps end in rows past N (read as 0, never stored)."""
    if CUDA:
        seq *= 5
    layout = mixed_layout(HEADS, seq // block, torch.Generator().manual_seed(seq), causal)
    q, k, v = make_inputs(2, seq, 64, torch.float16, seed=seq)
    kpm = torch.zeros(2, seq, device=DEV)
    kpm[0, -5:] = float("-inf")
    compare(q, k, v, layout, block, causal=causal, kpm=kpm)
    assert get_plan(q, k, v, layout, block, None, causal, kpm).groups.any


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_rows_on_packed_tiles(dtype):
    """Long rows cut into items: the forward's merge and the backward's reduction store
    through the token maps."""
    set_fused_config(split_min=1)
    try:
        layout = mixed_layout(HEADS, SEQ // 16, torch.Generator().manual_seed(5), p=0.0)
        q, k, v = make_inputs(2, SEQ, 64, dtype, seed=5)
        kpm = torch.zeros(2, SEQ, device=DEV)
        kpm[1, :16] = float("-inf")
        out = compare(q, k, v, layout, 16, kpm=kpm)
        plan = get_plan(q, k, v, layout, 16, None, False, kpm)
        assert plan.groups.any
        tiles = plan.tiles
        for kind, t in (("row", tiles.fwd), ("row", tiles.dq), ("col", tiles.dkdv)):
            lut = get_lut(layout, 16, t.block_m, t.block_n, SEQ, False, q.device, kind,
                          batch=2, groups=plan.groups)
            assert lut.n_split > 0, kind
        again = fused_block_sparse_attention(q.detach(), k.detach(), v.detach(), layout, 16,
                                             key_padding_mask=kpm)
        assert torch.equal(again, out.detach())
    finally:
        clear_caches()


def test_packing_on_and_off_agree():
    """The same layout with packing off (contiguous tiles): both match the reference."""
    layout = ds_layout("tutorial", 16, SEQ)
    q, k, v = make_inputs(1, SEQ, 64, torch.float16, seed=9)
    on = compare(q, k, v, layout, 16)
    assert get_plan(q, k, v, layout, 16, None, False, None).groups.any
    set_fused_config(group=False)
    for t in (q, k, v):
        t.grad = None
    off = compare(q, k, v, layout, 16)
    assert not get_plan(q, k, v, layout, 16, None, False, None).groups.any
    assert rel_error(on, off.double()) < 2e-3


def test_bad_group_setting():
    with pytest.raises(ValueError, match="group"):
        set_fused_config(group="yes")


@gpu_only
def test_gpu_packed_no_host_sync_after_first_call():
    layout = ds_layout("tutorial", 16, SEQ).to(DEV)
    q, k, v = make_inputs(2, SEQ, 64, torch.bfloat16, seed=1)
    fused_block_sparse_attention(q, k, v, layout, 16).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_block_sparse_attention(q, k, v, layout, 16)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu_only
def test_gpu_packed_compile_and_graphs():
    """Inductor (fullgraph) and a CUDA graph replay over packed tiles."""
    layout = ds_layout("tutorial", 16, SEQ)
    q, k, v = make_inputs(2, SEQ, 64, torch.bfloat16, seed=3)
    f = lambda q, k, v: fused_block_sparse_attention(q, k, v, layout, 16) * 2
    ref = f(q, k, v).detach()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    assert_rel_close(out, ref.double(), torch.bfloat16)
    static = [t.detach().clone() for t in (q, k, v)]
    f(*static)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = f(*static)
    g.replay()
    assert torch.equal(gout, ref)
