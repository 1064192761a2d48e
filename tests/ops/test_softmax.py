"""Block-sparse Softmax against a float64 dense masked softmax: scale, rpe, both mask modes,
bool/int/float masks, fully masked rows; forward and gradient; both backends (Triton kernels
on CUDA or through TRITON_INTERPRET=1 on CPU, and the pure-PyTorch backend)."""

import pytest
import torch

from reference import assert_rel_close, layout_to_token_mask
from sparse_attn.ops.softmax import Softmax

from test_matmul import BACKENDS, BLOCKS, CUDA, DEVICE, DTYPES, INTERPRET, blocks_of, densify, \
    random_layout

FEATURES = ["plain", "add_kpm_mul_am", "bool_kpm_add_am", "sparse_rpe_bert_mask"]


def _shape(block):
    if CUDA:
        return 2, 3, (1024 if block == 128 else 512)
    return 2, 2, max(128, 2 * block)


def make_features(feature, z, h, seq, layout, block, nnz, g):
    """(kwargs for Softmax, the same in dense float64 form for the reference)."""
    dev = DEVICE
    kw = {"scale": 1.0}
    ref = {"scale": 1.0, "rpe": None, "kpm": None, "kpm_keep": None, "am": None, "am_keep": None}
    if feature == "plain":
        kw["scale"] = ref["scale"] = 0.7
        return kw, ref
    if feature == "add_kpm_mul_am":
        kw["scale"] = ref["scale"] = 0.125
        rpe = torch.randn(z, h, seq, seq, generator=g).to(dev)
        kpm = torch.randn(z, seq, generator=g)
        kpm[0, seq // 3:] = float("-inf")              # padding
        kpm[1, :] = float("-inf")                      # batch 1: every key dropped
        am = (torch.rand(seq, seq, generator=g) < 0.8).float()
        am[5, :] = 0                                   # one row fully masked
        kw.update(rpe=rpe, key_padding_mask=kpm.to(dev), attn_mask=am.to(dev),
                  key_padding_mask_mode="add", attn_mask_mode="mul")
        ref.update(rpe=rpe.double(), kpm=kpm.double().to(dev), am=(am != 0).to(dev), am_keep=True)
        return kw, ref
    if feature == "bool_kpm_add_am":
        rpe = torch.randn(seq, seq, generator=g).to(dev)   # broadcast over batch and heads
        kpm = torch.rand(z, seq, generator=g) < 0.7        # bool: True keeps (add mode too)
        kpm[:, 0] = True
        am = torch.full((seq, seq), float("-inf")).triu(1) + torch.randn(seq, seq, generator=g)
        kw.update(rpe=rpe, key_padding_mask=kpm.to(dev), attn_mask=am.to(dev),
                  key_padding_mask_mode="add", attn_mask_mode="add")
        ref.update(rpe=rpe.double()[None, None], kpm=kpm.to(dev), kpm_keep=True, am=am.double().to(dev))
        return kw, ref
    return _sparse_rpe_features(kw, ref, z, seq, layout, block, nnz, g, dev)


def _sparse_rpe_features(kw, ref, z, seq, layout, block, nnz, g, dev):
    # DeepSpeed's block-sparse rpe, BERT's extended additive mask [Z, 1, 1, S], int attn mask
    rpe_sp = torch.randn(1, nnz, block, block, generator=g).to(dev)
    kpm = torch.zeros(z, 1, 1, seq)
    kpm[0, ..., seq // 2:] = -10000.0
    am = (torch.rand(seq, seq, generator=g) < 0.9).to(torch.int64)
    kw.update(rpe=rpe_sp, key_padding_mask=kpm.to(dev), attn_mask=am.to(dev),
              key_padding_mask_mode="add", attn_mask_mode="mul")
    ref.update(rpe=densify(rpe_sp.double(), layout, block), kpm=kpm.double()[:, 0, 0].to(dev),
               am=(am != 0).to(dev), am_keep=True)
    return kw, ref


def reference_softmax(x64, layout, block, scale, rpe, kpm, kpm_keep, am, am_keep):
    d = densify(x64, layout, block) * scale
    if rpe is not None:
        d = d + rpe
    if kpm is not None:
        if kpm_keep:
            d = d.masked_fill(~kpm.bool()[:, None, None, :], float("-inf"))
        else:
            d = d + kpm[:, None, None, :]
    if am is not None:
        if am_keep:
            d = d.masked_fill(~am.bool()[None, None], float("-inf"))
        else:
            d = d + am[None, None]
    keep = layout_to_token_mask(layout, block).to(d.device)[None]
    d = d.masked_fill(~keep, float("-inf"))
    m = d.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(d - m)
    s = e.sum(-1, keepdim=True)
    p = e / torch.where(s > 0, s, torch.ones_like(s))
    return blocks_of(p, layout, block)


def _wanted(backend, feature, dtype, block):
    if backend == "torch" or not INTERPRET:
        return True
    if dtype == torch.float32 and block in (16, 64):
        return True
    return feature == FEATURES[(DTYPES.index(dtype) + BLOCKS.index(block)) % len(FEATURES)]


CASES = [pytest.param(backend, feature, dtype, block,
                      id=f"{backend}-{feature}-{str(dtype)[6:]}-b{block}")
         for backend in BACKENDS for feature in FEATURES for dtype in DTYPES for block in BLOCKS
         if _wanted(backend, feature, dtype, block)]


@pytest.mark.parametrize("backend,feature,dtype,block", CASES)
def test_softmax_forward_backward(backend, feature, dtype, block):
    z, h, seq = _shape(block)
    layout = random_layout(h, seq // block, seed=block + FEATURES.index(feature))
    nnz = int(layout.sum())
    g = torch.Generator().manual_seed(block * 31 + FEATURES.index(feature))
    x = (3 * torch.randn(z, nnz, block, block, generator=g)).to(DEVICE, dtype).requires_grad_(True)
    kw, ref_kw = make_features(feature, z, h, seq, layout, block, nnz, g)
    if CUDA:
        torch.empty(64 << 20, device="cuda").fill_(float("nan"))
    x64 = x.detach().double().requires_grad_(True)  # before the call: it works in place
    y = Softmax(layout, block, backend=backend)(x, **kw)
    assert y.dtype == dtype and y.shape == x.shape
    ref = reference_softmax(x64, layout, block, **ref_kw)
    assert_rel_close(y, ref, dtype)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, dtype)
    y.backward(dy)
    ref.backward(dy.double())
    assert_rel_close(x.grad, x64.grad, dtype, factor=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros(backend):
    block, z, h, seq = 16, 2, 2, 64
    layout = random_layout(h, seq // block, seed=4)
    nnz = int(layout.sum())
    x = torch.randn(z, nnz, block, block, device=DEVICE, requires_grad=True)
    kpm = torch.zeros(z, seq, device=DEVICE)
    kpm[1] = float("-inf")                               # batch 1: nothing visible
    am = torch.ones(seq, seq, device=DEVICE)
    am[3] = 0                                            # token row 3: nothing visible
    y = Softmax(layout, block, backend=backend)(x, key_padding_mask=kpm, attn_mask=am)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert bool((y[1] == 0).all()) and bool((x.grad[1] == 0).all())
    row0 = layout[:, 0].nonzero()                        # blocks of block-row 0, any head
    nzl = layout.nonzero().tolist()
    idx = [n for n, (hh, i, j) in enumerate(nzl) if i == 0]
    assert len(idx) == len(row0)
    assert bool((y[0, idx, 3] == 0).all()) and bool((x.grad[0, idx, 3] == 0).all())
    # other rows of batch 0 sum to one over their blocks
    dense = densify(y.detach().double(), layout, block)
    sums = dense[0].sum(-1)
    expect = layout_to_token_mask(layout, block).any(-1).double().to(sums.device)
    expect[:, 3] = 0
    assert torch.allclose(sums, expect, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_long_rows(backend):
    """Non-contiguous x; a dense layout row (two-pass path of the kernel)."""
    block, z, h, seq = 16, 1, 2, 256
    layout = random_layout(h, seq // block, density=0.1, seed=9)
    layout[0, 3, :] = 1
    nnz = int(layout.sum())
    x = torch.randn(z, nnz, block, block, device=DEVICE).transpose(-1, -2)
    ref = reference_softmax(x.double(), layout, block, 2.0, None, None, None, None, None)
    y = Softmax(layout, block, backend=backend)(x, scale=2.0)
    assert torch.equal(x, y)  # written in place, through the transposed strides
    assert_rel_close(y, ref, torch.float32)


def test_errors():
    block = 16
    layout = random_layout(2, 4, seed=0)
    nnz = int(layout.sum())
    sm = Softmax(layout, block)
    x = torch.randn(1, nnz, block, block)
    with pytest.raises(ValueError, match=r"'x'.*\(1, 2, 16, 16\)"):
        sm(torch.randn(1, 2, block, block))
    with pytest.raises(ValueError, match=r"'x'"):
        sm(x[0])
    with pytest.raises(ValueError, match="dtype"):
        sm(x.double())
    with pytest.raises(ValueError, match="key_padding_mask_mode"):
        sm(x, key_padding_mask_mode="mult")
    with pytest.raises(ValueError, match="attn_mask_mode"):
        sm(x, attn_mask_mode="sub")
    with pytest.raises(ValueError, match=r"'key_padding_mask'.*\(1, 60\)"):
        sm(x, key_padding_mask=torch.zeros(1, 60))
    with pytest.raises(ValueError, match=r"'attn_mask'.*\(64, 32\)"):
        sm(x, attn_mask=torch.zeros(64, 32))
    with pytest.raises(ValueError, match=r"'rpe'.*\(1, 2, 64, 60\)"):
        sm(x, rpe=torch.zeros(1, 2, 64, 60))
    with pytest.raises(ValueError, match="block"):
        Softmax(layout, 24)
    with pytest.raises(ValueError, match="scale"):
        sm(x, scale="big")


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_row_two_pass(backend):
    """A global row much longer than the typical row: the Triton kernel's long launch runs it
    in several chunks (online max / sum, then a second pass), forward and backward."""
    block, z, h, seq = 16, 1, 1, 2048
    nb = seq // block
    layout = torch.zeros(h, nb, nb, dtype=torch.int64)
    r = torch.arange(nb)
    layout[:, r, r] = 1
    layout[:, r[1:], r[:-1]] = 1
    layout[:, 0, :] = 1                                  # global row: nb blocks
    nnz = int(layout.sum())
    g = torch.Generator().manual_seed(5)
    x = (4 * torch.randn(z, nnz, block, block, generator=g)).to(DEVICE).requires_grad_(True)
    kpm = torch.zeros(z, seq)
    kpm[:, seq - 100:] = float("-inf")
    x64 = x.detach().double().requires_grad_(True)
    y = Softmax(layout, block, backend=backend)(x, scale=0.5, key_padding_mask=kpm.to(DEVICE))
    ref = reference_softmax(x64, layout, block, 0.5, None, kpm.double().to(DEVICE), False,
                            None, None)
    assert_rel_close(y, ref, torch.float32)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(dy)
    ref.backward(dy.double())
    assert_rel_close(x.grad, x64.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectangular_layout(backend):
    """Layout [2, 5, 3] at block 16 (80 query rows, 48 keys) with rpe and both masks."""
    block, z = 16, 2
    layout = (torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(3)) < 0.5).long()
    layout[:, :, 0] = 1
    nnz = int(layout.sum())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(z, nnz, block, block, generator=g).to(DEVICE).requires_grad_(True)
    rpe = torch.randn(1, 2, 80, 48, generator=g).to(DEVICE)
    kpm = torch.zeros(z, 48)
    kpm[1, 40:] = float("-inf")
    am = (torch.rand(80, 48, generator=g) < 0.8).float()
    x64 = x.detach().double().requires_grad_(True)
    y = Softmax(layout, block, backend=backend)(x, scale=0.3, rpe=rpe,
                                                key_padding_mask=kpm.to(DEVICE),
                                                attn_mask=am.to(DEVICE))
    ref = reference_softmax(x64, layout, block, 0.3, rpe.double(), kpm.double().to(DEVICE),
                            False, am.to(DEVICE), True)
    assert_rel_close(y, ref, torch.float32)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(dy)
    ref.backward(dy.double())
    assert_rel_close(x.grad, x64.grad, torch.float32)
