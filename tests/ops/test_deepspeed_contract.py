"""What DeepSpeed's own sparse-attention tests and users' code rely on: the import paths, the
``bench`` argument, Softmax working in place (with the gradient a retained ``x.grad`` shows),
and float32 computed at float32 precision unless TF32 is allowed. Against float64 references,
on both backends."""
import importlib

import pytest
import torch

from sparse_attn.ops.matmul import MatMul
from sparse_attn.ops.softmax import Softmax

from test_matmul import BACKENDS, CUDA, DEVICE, blocks_of, densify, random_layout

DEEPSPEED_MODULES = {  # deepspeed.ops.sparse_attention.<module> -> the names it held
    "matmul": ["MatMul"],
    "softmax": ["Softmax"],
    "sparsity_config": ["SparsityConfig", "DenseSparsityConfig", "FixedSparsityConfig",
                        "VariableSparsityConfig", "BigBirdSparsityConfig",
                        "BSLongformerSparsityConfig", "LocalSlidingWindowSparsityConfig"],
    "sparse_self_attention": ["SparseSelfAttention"],
    "bert_sparse_self_attention": ["BertSparseSelfAttention"],
    "sparse_attention_utils": ["SparseAttentionUtils"],
}


@pytest.mark.parametrize("module", sorted(DEEPSPEED_MODULES))
def test_module_paths_map_one_to_one(module):
    mod = importlib.import_module(f"sparse_attn.{module}")
    top = importlib.import_module("sparse_attn")
    for name in DEEPSPEED_MODULES[module]:
        assert getattr(mod, name) is getattr(top, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_argument(backend):
    """DeepSpeed's signatures: MatMul(layout, block, mode, trans_a, trans_b, bench) and
    Softmax(layout, block, bench), positionally or by keyword; bench changes nothing."""
    layout = random_layout(2, 4, seed=1)
    a = torch.randn(1, 2, 64, 32, device=DEVICE)
    want = MatMul(layout, 16, "sdd", False, True, backend=backend)(a, a)
    for mm in (MatMul(layout, 16, "sdd", False, True, False, backend=backend),
               MatMul(layout, 16, "sdd", trans_b=True, bench=True, backend=backend)):
        assert torch.equal(mm(a, a), want)
    for sm in (Softmax(layout, 16, False, backend=backend),
               Softmax(layout, 16, bench=True, backend=backend)):
        assert torch.equal(sm(want.clone()), Softmax(layout, 16, backend=backend)(want.clone()))


def _softmax_reference(x64, layout, block, scale):
    dense = densify(x64, layout, block) * scale
    keep = densify(torch.ones_like(x64), layout, block).bool()
    probs = torch.softmax(dense.masked_fill(~keep, float("-inf")), -1)
    return blocks_of(probs, layout, block)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_softmax_in_place(backend, contiguous):
    """The probabilities land in x; the result shares x's memory; x.grad (retained) and the
    gradient of what produced x are the softmax's gradient, as in DeepSpeed's test."""
    block = 16
    layout = random_layout(2, 4, seed=3)
    nnz = int(layout.sum())
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, nnz, block, block, generator=g).to(DEVICE).requires_grad_(True)
    x = w * 2 if contiguous else (w * 2).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert x.is_contiguous() == contiguous
    x.retain_grad()
    x64 = x.detach().double().requires_grad_(True)
    y = Softmax(layout, block, backend=backend)(x, scale=0.5)
    ref = _softmax_reference(x64, layout, block, 0.5)
    assert y.data_ptr() == x.data_ptr() and torch.equal(x, y)
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(dy)
    ref.backward(dy.double())
    if contiguous:  # DeepSpeed's test reads x.grad; a view's retained grad is its own
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 2 * x64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_in_place_is_seen_by_autograd(backend):
    """A graph that saved x before the call (exp saves its output) raises instead of
    differentiating through overwritten values."""
    layout = random_layout(2, 4, seed=3)
    w = torch.randn(1, int(layout.sum()), 16, 16, device=DEVICE, requires_grad=True)
    y = Softmax(layout, 16, backend=backend)(w.exp())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.fixture
def tf32():
    """Set torch.backends.cuda.matmul.allow_tf32 for one test."""
    old = torch.backends.cuda.matmul.allow_tf32

    def set_to(value):
        torch.backends.cuda.matmul.allow_tf32 = value
    yield set_to
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sdd", "dsd", "dds"])
def test_float32_is_computed_at_float32_precision(backend, mode, tf32):
    """float32 products are not rounded to TF32 unless the user allows TF32 (on a GPU TF32
    is ~1e-3 off; float32 ~1e-6)."""
    tf32(False)
    block = 16
    layout = random_layout(2, 8, seed=7)
    g = torch.Generator().manual_seed(9)
    dense = [torch.randn(2, 2, 128, 128, generator=g).to(DEVICE) for _ in range(2)]
    a, b = dense
    if mode == "dsd":
        a = blocks_of(a, layout, block)
    elif mode == "dds":
        b = blocks_of(b, layout, block)
    c = MatMul(layout, block, mode, backend=backend)(a, b)
    a64, b64 = a.double(), b.double()
    if mode == "sdd":
        ref = blocks_of(a64 @ b64, layout, block)
    elif mode == "dsd":
        ref = densify(a64, layout, block) @ b64
    else:
        ref = a64 @ densify(b64, layout, block)
    err = ((c.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"max relative error {err:.2e}: not float32 precision"


@pytest.mark.skipif(not CUDA, reason="TF32 exists on the GPU only")
def test_tf32_when_allowed(tf32):
    """With TF32 allowed, float32 products take the tensor cores' TF32 path (the user's
    choice, as for torch.matmul): still close, no longer float32-exact."""
    tf32(True)
    layout = random_layout(2, 8, seed=7)
    a, b = (torch.randn(2, 2, 128, 128, device="cuda") for _ in range(2))
    c = MatMul(layout, 16, "sdd", backend="triton")(a, b)
    ref = blocks_of(a.double() @ b.double(), layout, 16)
    err = ((c.double() - ref).abs().max() / ref.abs().max()).item()
    assert 1e-5 < err < 1e-2
