"""The pure-PyTorch block-sparse backend against the float64 dense oracle."""
import pytest
import torch

from reference import assert_rel_close, reference_attention
from sparse_attn import block_sparse_attention
from sparse_attn.ops.attention_torch import torch_block_sparse_attention
from sparse_attn.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    VariableSparsityConfig,
)

HEADS = 2


def layouts(block):
    return {
        "dense": DenseSparsityConfig(HEADS, block),
        "fixed": FixedSparsityConfig(HEADS, block, True, num_local_blocks=2,
                                     num_different_global_patterns=2),
        "fixed_uni": FixedSparsityConfig(HEADS, block, num_local_blocks=2,
                                         attention="unidirectional"),
        "variable": VariableSparsityConfig(HEADS, block, True, num_random_blocks=1,
                                           local_window_blocks=[1, 2], global_block_indices=[1]),
        "bigbird": BigBirdSparsityConfig(HEADS, block, True, num_random_blocks=1),
        "bigbird_uni": BigBirdSparsityConfig(HEADS, block, num_random_blocks=1,
                                             attention="unidirectional"),
        "bslongformer": BSLongformerSparsityConfig(HEADS, block, global_block_indices=[2]),
        "sliding_uni": LocalSlidingWindowSparsityConfig(HEADS, block),
    }


def inputs(batch, seq, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, seq, dim, generator=g).to(dtype).requires_grad_()
            for _ in range(3)]


def padding_mask(batch, seq, kind):
    if kind == "none":
        return None
    mask = torch.zeros(batch, seq)
    mask[0, seq - seq // 3:] = float("-inf")  # a padded tail
    if kind == "full_row":
        mask[-1, :] = float("-inf")  # every key of the last sample masked: zeros, no NaN
    return mask


def check(q, k, v, layout, block, dtype, **kw):
    out = torch_block_sparse_attention(q, k, v, layout, block, **kw)
    ref = reference_attention(q, k, v, layout, block, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_rel_close(out, ref, dtype)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    exp = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, exp):
        assert_rel_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("name", list(layouts(16)))
@pytest.mark.parametrize("padding", ["none", "tail", "full_row"])
def test_matches_reference(dtype, block, name, padding):
    cfg = layouts(block)[name]
    seq = block * 6
    layout = cfg.make_layout(seq)
    q, k, v = inputs(2, seq, 32, dtype, seed=block + len(name))
    check(q, k, v, layout, block, dtype, causal=cfg.attention == "unidirectional",
          key_padding_mask=padding_mask(2, seq, padding))


def test_fully_masked_row_gives_zeros_and_zero_grads():
    layout = BigBirdSparsityConfig(HEADS, 16).make_layout(64)
    q, k, v = inputs(2, 64, 16, torch.float32, seed=1)
    mask = torch.zeros(2, 64)
    mask[1] = float("-inf")
    out = torch_block_sparse_attention(q, k, v, layout, 16, key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("rpe_shape", [(2, HEADS, 96, 96), (1, HEADS, 96, 96), (1, 1, 96, 96)])
def test_rpe_attn_mask_scale(rpe_shape):
    cfg = VariableSparsityConfig(HEADS, 16, True, num_random_blocks=2)
    layout = cfg.make_layout(96)
    q, k, v = inputs(2, 96, 32, torch.float32, seed=3)
    rpe = torch.randn(rpe_shape)
    attn_mask = torch.randn(96, 96)
    attn_mask[:, 40:50] = float("-inf")
    check(q, k, v, layout, 16, torch.float32, rpe=rpe, attn_mask=attn_mask, scale=0.3,
          key_padding_mask=padding_mask(2, 96, "tail"))


def test_fp16_and_fp64():
    layout = FixedSparsityConfig(HEADS, 32).make_layout(128)
    for dtype in (torch.float16, torch.float64):
        q, k, v = inputs(1, 128, 64, dtype, seed=5)
        check(q, k, v, layout, 32, dtype)


def test_memory_grows_with_nonzero_blocks_not_seq_squared():
    # The backend's largest intermediate is [batch, nnz, block, block]: for a BigBird layout
    # that is linear in seq. Check the score tensor size via the saved autograd tensors.
    seq, block = 2048, 16
    layout = BigBirdSparsityConfig(1, block, num_random_blocks=1).make_layout(seq)
    nnz = int(layout.sum())
    q, k, v = [torch.randn(1, 1, seq, 16, requires_grad=True) for _ in range(3)]
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch_block_sparse_attention(q, k, v, layout, block)
    assert largest <= nnz * block * block
    assert largest < seq * seq / 10


def test_dispatcher_validates_inputs():
    layout = FixedSparsityConfig(HEADS, 16).make_layout(64)
    q = torch.randn(1, HEADS, 64, 16)
    with pytest.raises(ValueError, match="not a multiple of the block size 16"):
        block_sparse_attention(q[:, :, :60], q[:, :, :60], q[:, :, :60], layout, 16)
    with pytest.raises(ValueError, match=r"layout has shape \(2, 4, 4\)"):
        block_sparse_attention(q[:, :1], q[:, :1], q[:, :1], layout, 16)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        block_sparse_attention(q, q, q, layout, 16, key_padding_mask=torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"query must be \[batch, heads, seq, head_dim\]"):
        block_sparse_attention(q[0], q[0], q[0], layout, 16)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q.int(), q.int(), q.int(), layout, 16)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, q, q, layout, 16, backend="cuda")
    for name, t in (("key_padding_mask", torch.zeros(1, 64)), ("rpe", torch.zeros(64, 64)),
                    ("attn_mask", torch.zeros(64, 64))):
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            block_sparse_attention(q, q, q, layout, 16, **{name: t.to("meta")})


def test_dispatcher_uses_torch_backend_on_cpu():
    layout = BigBirdSparsityConfig(HEADS, 16).make_layout(64)
    q, k, v = inputs(1, 64, 16, torch.float32, seed=9)
    a = block_sparse_attention(q, k, v, layout, 16)
    b = torch_block_sparse_attention(q, k, v, layout, 16)
    assert torch.equal(a, b)


def test_autocast_does_not_change_the_result():
    layout = BigBirdSparsityConfig(HEADS, 16).make_layout(64)
    q, k, v = inputs(1, 64, 16, torch.bfloat16, seed=11)
    plain = torch_block_sparse_attention(q, k, v, layout, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = torch_block_sparse_attention(q, k, v, layout, 16)
    assert torch.equal(plain, under)


def test_block_index_is_cached_per_view_and_version():
    """The block index is shared by views that read the layout the same way, and rebuilt
    for a view that reads it differently (a transpose) or after an in-place change."""
    from sparse_attn.ops.attention_torch import block_index

    layout = (torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(3)) < 0.5).long()
    layout[:, 0, 1] = 1
    layout[:, 1, 0] = 0

    def expected(lay):
        h, r, c = lay.nonzero(as_tuple=True)
        return h, r, c

    index = block_index(layout, torch.device("cpu"))
    assert block_index(layout[:], torch.device("cpu")) is index
    for got, want in zip(index[:3], expected(layout)):
        assert torch.equal(got, want)
    flipped = layout.transpose(1, 2)
    index_t = block_index(flipped, torch.device("cpu"))
    assert index_t is not index
    for got, want in zip(index_t[:3], expected(flipped)):
        assert torch.equal(got, want)
    layout[0, 4, 4] = 1 - layout[0, 4, 4]
    index_new = block_index(layout, torch.device("cpu"))
    assert index_new is not index
    for got, want in zip(index_new[:3], expected(layout)):
        assert torch.equal(got, want)


def test_block_index_of_an_inference_mode_layout():
    """A layout made under inference_mode has no version counter; the cache key copes."""
    from sparse_attn.ops.attention_torch import block_index

    with torch.inference_mode():
        layout = torch.ones(2, 3, 3, dtype=torch.long).tril()
    index = block_index(layout, torch.device("cpu"))
    assert index.row.numel() == int(layout.sum()) and index.num_blocks == 3


def _backends_here():
    import os
    names = ["torch"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        names += ["fused", "triton"]
    return names


@pytest.mark.parametrize("backend", _backends_here())
def test_one_rule_for_key_padding_masks(backend):
    """Every backend reads a key padding mask the same way: bool keeps where True, float is
    added, [batch, 1, 1, seq] is squeezed; an integer mask (ambiguous: 0/1 keep-mask or
    additive?) is refused with the fix."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if backend != "fused" else torch.bfloat16
    layout = BigBirdSparsityConfig(HEADS, 16, num_random_blocks=1).make_layout(128)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, HEADS, 128, 64, generator=g).to(dev, dtype) for _ in range(3))
    keep = torch.ones(2, 128, dtype=torch.bool)
    keep[0, 100:] = False
    keep[1, :7] = False
    additive = torch.zeros(2, 128).masked_fill(~keep, float("-inf"))
    want = reference_attention(q.double(), k.double(), v.double(), layout, 16,
                               key_padding_mask=additive.double().to(dev))
    for mask in (keep.to(dev), additive.to(dev), additive.view(2, 1, 1, 128).to(dev)):
        out = block_sparse_attention(q, k, v, layout, 16, key_padding_mask=mask,
                                     backend=backend)
        assert_rel_close(out, want, dtype)
    with pytest.raises(ValueError, match="key_padding_mask has dtype torch.int64"):
        block_sparse_attention(q, k, v, layout, 16, key_padding_mask=keep.long().to(dev),
                               backend=backend)


@pytest.mark.parametrize("value", [2, -1])
def test_layout_values_other_than_0_and_1_are_refused(value):
    layout = FixedSparsityConfig(HEADS, 16).make_layout(64)
    layout[0, 1, 1] = value
    q = torch.randn(1, HEADS, 64, 16)
    with pytest.raises(ValueError, match=f"layout holds {value}; it must hold only 0 and 1"):
        block_sparse_attention(q, q, q, layout, 16)
    with pytest.raises(ValueError, match="layout has dtype torch.float32"):
        block_sparse_attention(q, q, q, layout.float() / 2, 16)
