"""SparseSelfAttention and BertSparseSelfAttention against the float64 dense oracle."""
import pytest
import torch

from reference import assert_rel_close, reference_attention

from sparse_attn.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    VariableSparsityConfig,
)
from sparse_attn.sparse_self_attention import SparseSelfAttention
from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention

HEADS, BLOCK = 4, 16

CONFIGS = {
    "fixed": lambda: FixedSparsityConfig(HEADS, BLOCK, num_local_blocks=2),
    "fixed_perhead": lambda: FixedSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_local_blocks=4,
        num_different_global_patterns=4),
    "bigbird": lambda: BigBirdSparsityConfig(HEADS, BLOCK, different_layout_per_head=True,
                                             num_random_blocks=1, seed=3),
    "bslongformer": lambda: BSLongformerSparsityConfig(HEADS, BLOCK, global_block_indices=[0, 3]),
    "variable": lambda: VariableSparsityConfig(HEADS, BLOCK, num_random_blocks=1,
                                               local_window_blocks=[2, 3]),
    "local_uni": lambda: LocalSlidingWindowSparsityConfig(HEADS, BLOCK, attention="unidirectional"),
    "dense": lambda: DenseSparsityConfig(HEADS, BLOCK),
}


def _qkv(batch, seq, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, seq, dim, generator=g).to(dtype).requires_grad_()
            for _ in range(3)]


def _padding(batch, seq):
    """Additive [batch, seq] key padding: sequence b keeps its first seq - 7 * b tokens."""
    m = torch.zeros(batch, seq)
    for b in range(batch):
        m[b, seq - 7 * b:] = float("-inf")
    return m


def _check(ssa, q, k, v, dtype, ref_kwargs, fwd_kwargs, grads=True):
    out = ssa(q, k, v, **fwd_kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference_attention(q, k, v, ssa.get_layout(q.shape[2]), BLOCK,
                              causal=ssa.causal, **ref_kwargs)
    assert_rel_close(out, ref, dtype)
    if not grads:
        return
    g = torch.randn_like(ref)
    dq, dk, dv = torch.autograd.grad(out.float(), (q, k, v), g.float())
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        assert_rel_close(a, b, dtype, factor=2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_with_padding(name, dtype):
    seq, batch = 128, 2
    ssa = SparseSelfAttention(CONFIGS[name](), max_seq_length=256)
    q, k, v = _qkv(batch, seq, 16, dtype)
    kpm = _padding(batch, seq)
    _check(ssa, q, k, v, dtype, dict(key_padding_mask=kpm), dict(key_padding_mask=kpm))


@pytest.mark.parametrize("name", ["fixed", "bigbird", "local_uni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mul_modes_rpe_attn_mask(name, dtype):
    seq, batch = 64, 2
    ssa = SparseSelfAttention(CONFIGS[name](), key_padding_mask_mode="mul",
                              attn_mask_mode="mul", max_seq_length=64)
    q, k, v = _qkv(batch, seq, 8, dtype, seed=1)
    keep = torch.ones(batch, seq)
    keep[1, 50:] = 0
    am_keep = (torch.rand(seq, seq, generator=torch.Generator().manual_seed(2)) > 0.2).float()
    am_keep.fill_diagonal_(1)
    rpe = torch.randn(1, HEADS, seq, seq, generator=torch.Generator().manual_seed(3))
    add = lambda m: torch.zeros_like(m).masked_fill(m == 0, float("-inf"))
    _check(ssa, q, k, v, dtype,
           dict(key_padding_mask=add(keep), attn_mask=add(am_keep), rpe=rpe),
           dict(key_padding_mask=keep, attn_mask=am_keep, rpe=rpe))
    # bool masks mean True keeps in either mode
    _check(ssa, q, k, v, dtype,
           dict(key_padding_mask=add(keep), attn_mask=add(am_keep)),
           dict(key_padding_mask=keep.bool(), attn_mask=am_keep.bool()), grads=False)


def test_add_modes_and_bert_extended_mask():
    seq, batch, dtype = 64, 3, torch.float32
    ssa = SparseSelfAttention(CONFIGS["variable"](), key_padding_mask_mode="add",
                              attn_mask_mode="add", max_seq_length=128)
    q, k, v = _qkv(batch, seq, 8, dtype, seed=4)
    kpm = _padding(batch, seq)
    kpm[kpm == float("-inf")] = -10000.0  # BERT's classic large negative
    am = torch.randn(seq, seq, generator=torch.Generator().manual_seed(5))
    _check(ssa, q, k, v, dtype, dict(key_padding_mask=kpm, attn_mask=am),
           dict(key_padding_mask=kpm[:, None, None, :], attn_mask=am[None, None]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shorter_sequence_uses_corner(dtype):
    cfg = BigBirdSparsityConfig(HEADS, BLOCK, different_layout_per_head=True,
                                num_random_blocks=2, seed=7)
    ssa = SparseSelfAttention(cfg, max_seq_length=256)
    full = cfg.make_layout(256)
    for seq in (32, 80, 256):
        nb = seq // BLOCK
        assert torch.equal(ssa.get_layout(seq), full[:, :nb, :nb])
    # the corner differs from the layout built at the short length (random blocks depend on nb)
    assert not torch.equal(cfg.make_layout(80), full[:, :5, :5])
    q, k, v = _qkv(1, 80, 16, dtype, seed=8)
    out = ssa(q, k, v)
    ref = reference_attention(q, k, v, full[:, :5, :5], BLOCK)
    assert_rel_close(out, ref, dtype)
    # layouts are cached: the same tensor object every call
    assert ssa.get_layout(80) is ssa.get_layout(80)
    assert len(ssa.state_dict()) == 0


def test_equal_layouts_share_one_tensor_and_lengths_are_bounded():
    """The layers of a model hold equal layouts: they get one tensor per (length, device), so
    the backends build one set of tables for all of them; another layout gets its own. A
    module keeps the layouts of its LAYOUTS_PER_MODULE most recent lengths."""
    from sparse_attn import sparse_self_attention as ssa_mod

    def bigbird(seed):
        return BigBirdSparsityConfig(HEADS, BLOCK, different_layout_per_head=True,
                                     num_random_blocks=2, seed=seed)

    a, b = (SparseSelfAttention(bigbird(7), max_seq_length=512) for _ in range(2))
    other = SparseSelfAttention(bigbird(8), max_seq_length=512)
    assert a.get_layout(256) is b.get_layout(256)
    assert not torch.equal(other.get_layout(256), a.get_layout(256))
    assert torch.equal(a.get_layout(256), bigbird(7).make_layout(512)[:, :16, :16])
    # each module's own (equal) output is unchanged by the sharing
    q, k, v = _qkv(1, 256, 8, torch.float32, seed=9)
    assert_rel_close(b(q, k, v), reference_attention(q, k, v, bigbird(7).make_layout(512)[
        :, :16, :16], BLOCK), torch.float32)
    lengths = [BLOCK * n for n in range(1, 2 * ssa_mod.LAYOUTS_PER_MODULE + 2)]
    for seq in lengths:
        nb = seq // BLOCK
        assert torch.equal(a.get_layout(seq), a.master_layout[:, :nb, :nb])
    assert len(a._layouts) == ssa_mod.LAYOUTS_PER_MODULE
    assert [key[0] for key in a._layouts] == lengths[-ssa_mod.LAYOUTS_PER_MODULE:]
    # and no more than LAYOUT_BYTES_PER_MODULE of them, the latest always
    full = a.get_layout(512)
    assert b.get_layout(512) is full
    nbytes = full.numel() * full.element_size()
    ssa_mod.LAYOUT_BYTES_PER_MODULE, saved = nbytes // 2, ssa_mod.LAYOUT_BYTES_PER_MODULE
    try:
        assert a.get_layout(496) is not None and list(a._layouts) == [(496, None)]
        assert (512, None) not in a._layouts and b.get_layout(512) is full  # b still holds it
    finally:
        ssa_mod.LAYOUT_BYTES_PER_MODULE = saved
    # the shared table is bounded too: modules built and dropped leave at most SHARED_LAYOUTS
    for seed in range(ssa_mod.SHARED_LAYOUTS + 4):
        SparseSelfAttention(bigbird(100 + seed), max_seq_length=64).get_layout(64)
    assert len(ssa_mod._SHARED_LAYOUTS) == ssa_mod.SHARED_LAYOUTS


def test_master_layout_built_once_for_equal_builtin_configs(monkeypatch):
    """Modules with equal settings of a built-in (seeded) config share one master layout,
    built once; other settings, another length or a subclass (whose make_layout may draw
    anything) get their own. Copies and pickles of a module keep its layout."""
    import copy
    import pickle

    calls = []
    real = BigBirdSparsityConfig.make_layout
    monkeypatch.setattr(BigBirdSparsityConfig, "make_layout",
                        lambda self, n: calls.append(n) or real(self, n))

    def bigbird(seed=9137):  # a seed no other test uses: its layout is built here first
        return BigBirdSparsityConfig(HEADS, BLOCK, num_random_blocks=2, seed=seed)

    a = SparseSelfAttention(bigbird(), max_seq_length=320)
    b = SparseSelfAttention(bigbird(), max_seq_length=320)
    assert a.master_layout is b.master_layout and calls == [320]
    assert torch.equal(a.master_layout, real(bigbird(), 320))
    assert SparseSelfAttention(bigbird(6), max_seq_length=320).master_layout is not \
        a.master_layout
    assert SparseSelfAttention(bigbird(), max_seq_length=336).master_layout.shape[-1] == 21

    class Mine(BigBirdSparsityConfig):
        pass

    c = SparseSelfAttention(Mine(HEADS, BLOCK, num_random_blocks=2, seed=9137),
                            max_seq_length=320)
    assert c.master_layout is not a.master_layout and torch.equal(c.master_layout,
                                                                  a.master_layout)
    for twin in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert torch.equal(twin.master_layout, a.master_layout)
        assert torch.equal(twin.get_layout(160), a.get_layout(160))


def test_errors():
    ssa = SparseSelfAttention(FixedSparsityConfig(HEADS, BLOCK), max_seq_length=64)
    q = torch.randn(1, HEADS, 40, 8)
    with pytest.raises(ValueError, match="not a multiple of the sparse block size 16"):
        ssa(q, q, q)
    q = torch.randn(1, HEADS, 80, 8)
    with pytest.raises(ValueError, match="exceeds max_seq_length=64"):
        ssa(q, q, q)
    q = torch.randn(1, HEADS + 1, 32, 8)
    with pytest.raises(ValueError, match="5 heads .* num_heads=4"):
        ssa(q, q, q)
    q = torch.randn(2, HEADS, 32, 8)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        ssa(q, q, q, key_padding_mask=torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="attn_mask has shape"):
        ssa(q, q, q, attn_mask=torch.zeros(32, 16))
    with pytest.raises(ValueError, match="key_padding_mask_mode"):
        SparseSelfAttention(FixedSparsityConfig(HEADS), key_padding_mask_mode="sub")
    with pytest.raises(NotImplementedError):
        SparseSelfAttention()(q, q, q)  # the base SparsityConfig has no layout


class _Cfg:
    hidden_size, num_attention_heads, max_position_embeddings = 32, HEADS, 128


def test_bert_sparse_self_attention_matches_reference():
    torch.manual_seed(0)
    cfg = FixedSparsityConfig(HEADS, BLOCK, num_local_blocks=2)
    layer = BertSparseSelfAttention(_Cfg(), cfg)
    x = torch.randn(2, 64, 32, requires_grad=True)
    ext = torch.zeros(2, 1, 1, 64)
    ext[1, ..., 40:] = -10000.0
    out = layer(x, ext)
    assert out.shape == (2, 64, 32)

    def heads(lin):
        return lin(x).view(2, 64, HEADS, 8).transpose(1, 2)

    ref = reference_attention(heads(layer.query), heads(layer.key), heads(layer.value),
                              cfg.make_layout(64), BLOCK, key_padding_mask=ext[:, 0, 0])
    ref = ref.transpose(1, 2).reshape(2, 64, 32)
    assert_rel_close(out, ref, torch.float32)
    out.sum().backward()
    assert layer.query.weight.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="num_heads=2 .* num_attention_heads=4"):
        BertSparseSelfAttention(_Cfg(), FixedSparsityConfig(2))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                           ("fused", torch.bfloat16)])
def test_every_backend_takes_the_module_masks(backend, dtype):
    """The module's mask conversion feeds each backend of block_sparse_attention (the Triton
    ones run under TRITON_INTERPRET=1 on CPU; see tests/conftest.py)."""
    if backend != "torch" and not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = BigBirdSparsityConfig(2, BLOCK, different_layout_per_head=True, num_random_blocks=1)
    ssa = SparseSelfAttention(cfg, key_padding_mask_mode="add", max_seq_length=128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 32, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))
    ext = torch.zeros(2, 1, 1, 64, device=device)
    ext[1, ..., 45:] = -10000.0
    out = ssa.attend(q, k, v, key_padding_mask=ext, backend=backend)
    ref = reference_attention(q, k, v, ssa.get_layout(64), BLOCK, key_padding_mask=ext[:, 0, 0])
    assert_rel_close(out, ref, dtype)
    g_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out.float(), (q, k, v), g_out.float())
    refs = torch.autograd.grad(ref, (q, k, v), g_out)
    for a, b in zip(grads, refs):
        assert_rel_close(a, b, dtype, factor=2)


def test_keep_mask_in_add_mode_warns_once():
    """A 0/1 float mask in "add" mode is almost certainly a keep-mask where BERT's additive
    mask was meant (nothing would be masked): one warning naming the mode and the fix; an
    additive mask, a bool mask and "mul" mode give none."""
    import warnings

    sc = FixedSparsityConfig(num_heads=2, block=16)
    q = torch.randn(1, 2, 64, 16)
    keep = torch.ones(1, 64)
    keep[0, 40:] = 0
    attn = SparseSelfAttention(sc, key_padding_mask_mode="add", max_seq_length=64)
    with pytest.warns(UserWarning, match="key_padding_mask_mode='add'") as record:
        attn(q, q, q, key_padding_mask=keep)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(q, q, q, key_padding_mask=keep)  # once per module
        for mode, mask in (("add", (1.0 - keep) * -10000.0), ("add", keep.bool()),
                           ("add", torch.zeros(1, 64)), ("mul", keep)):
            SparseSelfAttention(sc, key_padding_mask_mode=mode, max_seq_length=64)(
                q, q, q, key_padding_mask=mask)
