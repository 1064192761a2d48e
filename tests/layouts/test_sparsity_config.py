"""Layouts against loop-by-loop restatements of DeepSpeed's rules (DESIGN.md), plus
structural properties: shapes, symmetry, empty upper triangles, determinism by seed."""
import subprocess
import sys
import textwrap

import pytest
import torch

from sparse_attn.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
    layout_checksum,
)


# ---- restated rules (cell by cell, no shared code with the library) ----

def fixed_expected(h, nb, local, glob, uni, horizontal, patterns):
    L = torch.zeros(nb, nb, dtype=torch.int64)
    for r in range(nb):
        for c in range(nb):
            same_window = r // local == c // local
            if same_window and (not uni or c <= r):
                L[r, c] = 1
    offset = local - (1 + h % patterns) * glob
    reps = []
    full = nb - nb % local
    for w in range(0, full, local):
        reps.append(w + offset)
    if full < nb:
        reps.append(min(full + offset, nb - glob))
    for s in reps:
        for c in range(s, s + glob):
            for r in range(nb):
                if not uni or r >= s:
                    L[r, c] = 1
            if horizontal:
                L[c, :] = 1
    if uni:
        L = torch.tril(L)
    return L


def band(nb, width, uni=False):
    L = torch.zeros(nb, nb, dtype=torch.int64)
    half = width // 2
    for r in range(nb):
        for c in range(nb):
            if r - half <= c <= (r if uni else r + half):
                L[r, c] = 1
    return L


def variable_local_expected(nb, windows, uni):
    L = torch.zeros(nb, nb, dtype=torch.int64)
    starts, s, i = [], 0, 0
    while s < nb:
        size = windows[min(i, len(windows) - 1)]
        starts.append((s, min(s + size, nb)))
        s += size
        i += 1
    for a, b in starts:
        for r in range(a, b):
            for c in range(a, b):
                if not uni or c <= r:
                    L[r, c] = 1
    return L


SEQS = [64, 256, 272, 512]  # 272: nb not a multiple of the window


@pytest.mark.parametrize("seq,local,glob,uni,horizontal,patterns", [
    (s, lo, g, u, hz, p)
    for s in SEQS for lo, g in [(4, 1), (4, 2), (3, 1), (8, 4)]
    for u in (False, True) for hz in (False, True) for p in (1, 2)
    if not (u and hz) and p <= lo // g
])
def test_fixed_matches_rules(seq, local, glob, uni, horizontal, patterns):
    heads = 4
    cfg = FixedSparsityConfig(heads, 16, different_layout_per_head=patterns > 1,
                              num_local_blocks=local, num_global_blocks=glob,
                              attention="unidirectional" if uni else "bidirectional",
                              horizontal_global_attention=horizontal,
                              num_different_global_patterns=patterns)
    layout = cfg.make_layout(seq)
    nb = seq // 16
    assert layout.shape == (heads, nb, nb) and layout.dtype == torch.int64
    for h in range(heads):
        exp = fixed_expected(h if patterns > 1 else 0, nb, local, glob, uni, horizontal,
                             patterns)
        assert torch.equal(layout[h], exp), f"head {h}"


def test_fixed_deepspeed_tutorial_example():
    # The tutorial's block: 4 local blocks, 1 global, 4 patterns: head h's representative is
    # block 3 - h % 4 of every window.
    cfg = FixedSparsityConfig(8, 16, True, num_local_blocks=4, num_global_blocks=1,
                              num_different_global_patterns=4)
    layout = cfg.make_layout(16 * 16)
    for h in range(8):
        cols = [c for c in range(16) if layout[h, :, c].all()]
        assert cols == [w + 3 - h % 4 for w in range(0, 16, 4)]


@pytest.mark.parametrize("seq,uni,windows,ranges,horizontal", [
    (s, u, w, r, hz) for s in (128, 256, 304) for u in (False, True)
    for w in ([4], [2, 3], [1, 4, 2]) for r in (False, True) for hz in (False, True)
    if not (u and hz)  # horizontal global attention is bidirectional only: an error case
])
def test_variable_matches_rules(seq, uni, windows, ranges, horizontal):
    nb = seq // 16
    starts, ends = ([1, 6, 40], [3, 8, 44]) if ranges else ([0, 5, 99], None)
    cfg = VariableSparsityConfig(2, 16, num_random_blocks=0, local_window_blocks=windows,
                                 global_block_indices=starts, global_block_end_indices=ends,
                                 attention="unidirectional" if uni else "bidirectional",
                                 horizontal_global_attention=horizontal)
    layout = cfg.make_layout(seq)
    exp = variable_local_expected(nb, windows, uni)
    spans = zip(starts, ends) if ends else ((s, s + 1) for s in starts)
    for s, e in spans:
        if s >= nb:
            continue
        for c in range(s, min(e, nb)):
            exp[(0 if not uni else s):, c] = 1
            if horizontal:
                exp[c, :] = 1
    if uni:
        exp = torch.tril(exp)
    assert torch.equal(layout[0], exp) and torch.equal(layout[1], exp)


@pytest.mark.parametrize("uni", [False, True])
@pytest.mark.parametrize("rand,window,glob", [(0, 3, 1), (1, 3, 1), (3, 5, 2), (2, 1, 0)])
def test_bigbird_structure(uni, rand, window, glob):
    seq, heads = 512, 3
    cfg = BigBirdSparsityConfig(heads, 16, True, num_random_blocks=rand,
                                num_sliding_window_blocks=window, num_global_blocks=glob,
                                attention="unidirectional" if uni else "bidirectional", seed=7)
    layout = cfg.make_layout(seq)
    nb = seq // 16
    structured = band(nb, window)
    structured[:glob, :] = 1
    structured[:, :glob] = 1
    if uni:
        structured = torch.tril(structured)
    for h in range(heads):
        assert ((layout[h] - structured) >= 0).all(), "window/global blocks missing"
        extra = layout[h] - structured
        for r in range(nb):
            # random blocks: at most `rand` per row beyond the structured ones, inside 0..r
            # when unidirectional
            assert extra[r].sum() <= rand
            if uni:
                assert extra[r, r + 1:].sum() == 0
        if rand and not uni:
            assert layout[h].sum() > structured.sum(), "no random block drawn"
    if uni:
        assert (torch.triu(layout, 1) == 0).all()


@pytest.mark.parametrize("uni", [False, True])
@pytest.mark.parametrize("ranges", [False, True])
def test_bslongformer_matches_rules(uni, ranges):
    seq = 384
    nb = seq // 16
    starts, ends = ([0, 10, 30], [2, 12, 33]) if ranges else ([0, 7, 50], None)
    cfg = BSLongformerSparsityConfig(2, 16, num_sliding_window_blocks=5,
                                     global_block_indices=starts, global_block_end_indices=ends,
                                     attention="unidirectional" if uni else "bidirectional")
    exp = band(nb, 5)
    spans = zip(starts, ends) if ends else ((s, s + 1) for s in starts)
    for s, e in spans:
        if s < nb:
            exp[s:min(e, nb), :] = 1
            exp[:, s:min(e, nb)] = 1
    if uni:
        exp = torch.tril(exp)
    layout = cfg.make_layout(seq)
    assert torch.equal(layout[0], exp) and torch.equal(layout[1], exp)


@pytest.mark.parametrize("uni", [False, True])
@pytest.mark.parametrize("window", [1, 3, 4, 7])
def test_local_sliding_window(uni, window):
    cfg = LocalSlidingWindowSparsityConfig(2, 32, num_sliding_window_blocks=window,
                                           attention="unidirectional" if uni else "bidirectional")
    layout = cfg.make_layout(32 * 12)
    assert torch.equal(layout[1], band(12, window, uni))


def test_local_sliding_window_default_is_unidirectional():
    assert LocalSlidingWindowSparsityConfig(1).attention == "unidirectional"


def test_dense():
    layout = DenseSparsityConfig(3, 32).make_layout(128)
    assert layout.shape == (3, 4, 4) and bool(layout.all())


def all_configs(heads=4, block=16):
    return [
        DenseSparsityConfig(heads, block),
        FixedSparsityConfig(heads, block),
        FixedSparsityConfig(heads, block, True, num_different_global_patterns=4),
        FixedSparsityConfig(heads, block, attention="unidirectional", num_global_blocks=2),
        VariableSparsityConfig(heads, block, True, num_random_blocks=2,
                               local_window_blocks=[2, 4], global_block_indices=[0, 3]),
        VariableSparsityConfig(heads, block, num_random_blocks=2, attention="unidirectional",
                               global_block_indices=[2], global_block_end_indices=[5]),
        BigBirdSparsityConfig(heads, block, True, num_random_blocks=2),
        BigBirdSparsityConfig(heads, block, attention="unidirectional"),
        BSLongformerSparsityConfig(heads, block),
        LocalSlidingWindowSparsityConfig(heads, block),
    ]


@pytest.mark.parametrize("cfg", all_configs(), ids=lambda c: repr(c)[:60])
def test_properties(cfg):
    layout = cfg.make_layout(cfg.block * 20)
    assert layout.shape == (4, 20, 20) and layout.dtype == torch.int64
    assert set(layout.unique().tolist()) <= {0, 1}
    assert (layout.diagonal(dim1=1, dim2=2) == 1).all(), "every block sees itself"
    if cfg.attention == "unidirectional":
        assert (torch.triu(layout, 1) == 0).all(), "unidirectional sees the future"
    if not cfg.different_layout_per_head:
        assert (layout == layout[0]).all()


def test_bidirectional_symmetry_where_deepspeed_is_symmetric():
    for cfg in [BSLongformerSparsityConfig(2, 16), DenseSparsityConfig(2, 16),
                FixedSparsityConfig(2, 16, horizontal_global_attention=True),
                BigBirdSparsityConfig(2, 16, num_random_blocks=0),
                LocalSlidingWindowSparsityConfig(2, 16, attention="bidirectional")]:
        layout = cfg.make_layout(320)
        assert torch.equal(layout, layout.transpose(1, 2)), repr(cfg)


@pytest.mark.parametrize("cls", [BigBirdSparsityConfig, VariableSparsityConfig])
def test_random_blocks_are_seeded(cls):
    a = cls(4, 16, True, num_random_blocks=2, seed=3).make_layout(1024)
    b = cls(4, 16, True, num_random_blocks=2, seed=3).make_layout(1024)
    c = cls(4, 16, True, num_random_blocks=2, seed=4).make_layout(1024)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "heads should draw different random blocks"
    assert layout_checksum(a) == layout_checksum(b) != layout_checksum(c)


def test_same_layout_in_another_process():
    code = textwrap.dedent("""
        from sparse_attn.sparsity_config import BigBirdSparsityConfig, layout_checksum
        print(layout_checksum(BigBirdSparsityConfig(4, 16, True, num_random_blocks=3)
                              .make_layout(2048)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    here = layout_checksum(BigBirdSparsityConfig(4, 16, True, num_random_blocks=3)
                           .make_layout(2048))
    assert out == here


def test_user_defined_structure():
    class Diagonal(SparsityConfig):
        def make_layout(self, seq_len):
            layout = self.setup_layout(seq_len)
            layout[:, range(layout.shape[1]), range(layout.shape[1])] = 1
            return layout

    layout = Diagonal(2, 32).make_layout(128)
    assert torch.equal(layout[0], torch.eye(4, dtype=torch.int64))


def test_base_class_needs_make_layout():
    with pytest.raises(NotImplementedError, match="make_layout"):
        SparsityConfig(2).make_layout(64)


@pytest.mark.parametrize("seq", [100, 0, -16, 17])
def test_seq_not_multiple_of_block(seq):
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        FixedSparsityConfig(2, 16).make_layout(seq)


@pytest.mark.parametrize("make,match", [
    (lambda: FixedSparsityConfig(2, num_local_blocks=4, num_global_blocks=3), "divisible"),
    (lambda: FixedSparsityConfig(2, num_different_global_patterns=2),
     "needs different_layout_per_head"),
    (lambda: FixedSparsityConfig(2, different_layout_per_head=True,
                                 num_different_global_patterns=5), "at most"),
    (lambda: FixedSparsityConfig(2, attention="unidirectional",
                                 horizontal_global_attention=True), "bidirectional"),
    (lambda: FixedSparsityConfig(2, attention="sideways"), "attention must be one of"),
    (lambda: VariableSparsityConfig(2, global_block_indices=[0, 4],
                                    global_block_end_indices=[2]), "same length"),
    (lambda: VariableSparsityConfig(2, global_block_indices=[4],
                                    global_block_end_indices=[4]), "greater than"),
    (lambda: VariableSparsityConfig(2, attention="unidirectional",
                                    horizontal_global_attention=True), "bidirectional"),
    (lambda: VariableSparsityConfig(2, local_window_blocks=[]), "at least one"),
    (lambda: BSLongformerSparsityConfig(2, global_block_indices=[3],
                                        global_block_end_indices=[1]), "greater than"),
    (lambda: BigBirdSparsityConfig(2, num_random_blocks=-1), "num_random_blocks"),
    (lambda: SparsityConfig(0), "num_heads"),
    (lambda: SparsityConfig(2, block=0), "block"),
])
def test_invalid_combinations(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [
    lambda: BigBirdSparsityConfig(2, 16, num_random_blocks=5),
    lambda: BigBirdSparsityConfig(2, 16, num_sliding_window_blocks=9),
    lambda: BSLongformerSparsityConfig(2, 16, num_sliding_window_blocks=9),
    lambda: VariableSparsityConfig(2, 16, num_random_blocks=5),
])
def test_too_few_blocks(make):
    with pytest.raises(ValueError, match="blocks of the sequence"):
        make().make_layout(64)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_block_sizes(block):
    for cfg in all_configs(2, block):
        assert cfg.make_layout(block * 8).shape == (2, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block=8), "block must be one of"), (dict(block=24), "block must be one of"),
    (dict(block=0), "block must be one of"), (dict(block=16.0), "block must be one of"),
    (dict(block=True), "block must be one of"),
    (dict(different_layout_per_head="no"), "different_layout_per_head must be True or False"),
    (dict(different_layout_per_head=1), "different_layout_per_head must be True or False"),
])
def test_layout_classes_check_block_and_flags(kwargs, match):
    """The same block rule as the JSON block and the ops (16, 32, 64, 128), and real bools."""
    for cls in (FixedSparsityConfig, BigBirdSparsityConfig, DenseSparsityConfig):
        with pytest.raises(ValueError, match=match):
            cls(2, **{"block": 16, **kwargs})


@pytest.mark.parametrize("seed", [10 ** 30, -1, "abc", 1.5, True, None])
def test_random_layouts_check_their_seed(seed):
    for cls in (BigBirdSparsityConfig, VariableSparsityConfig):
        with pytest.raises(ValueError, match="seed must be an integer"):
            cls(2, 16, seed=seed)


def test_a_layout_denser_than_half_warns_once():
    cfg = FixedSparsityConfig(2, 16, num_local_blocks=64)
    with pytest.warns(UserWarning, match="keeps 100% of the blocks"):
        cfg.make_layout(16 * 64)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg.make_layout(16 * 64)                               # once per config
        FixedSparsityConfig(2, 16).make_layout(16 * 64)        # the tutorial's: sparse
        DenseSparsityConfig(2, 16).make_layout(16 * 64)        # dense by request
        FixedSparsityConfig(2, 16, num_local_blocks=8).make_layout(16 * 8)  # short: normal
