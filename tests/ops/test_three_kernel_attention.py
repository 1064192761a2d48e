"""``block_sparse_attention`` through the three-kernel path (sdd, softmax, dsd: the backend
for rpe and attn_mask) and the torch backend, against the float64 oracle: every mask option
together with causal masking, forward and gradients.

The Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (tests/conftest.py).
"""
import os

import pytest
import torch

from reference import assert_rel_close, reference_attention
from sparse_attn import block_sparse_attention
from sparse_attn.ops.attention_torch import block_index, mask_future

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
BACKENDS = ["torch"] + (["triton"] if HAVE_TRITON and (CUDA or INTERPRET) else [])
DEVICE = "cuda" if CUDA else "cpu"
B, H, D = 2, 2, 32


def causal_layout(nb, gen, above=False):
    """Random lower-triangular layout with the diagonal kept (a different one per head);
    ``above`` adds one block above the diagonal, which causal masking must drop whole."""
    L = (torch.rand(H, nb, nb, generator=gen) < 0.5).long().tril()
    L[:, torch.arange(nb), torch.arange(nb)] = 1
    if above:
        L[:, 0, nb - 1] = 1
    return L


OPTIONS = {
    "causal": dict(causal=True),
    "causal_above_diagonal": dict(causal=True, above=True),
    "causal_kpm": dict(causal=True, kpm=True),
    "causal_rpe_attn_mask_kpm": dict(causal=True, rpe=True, attn_mask=True, kpm=True),
    "rpe_attn_mask": dict(rpe=True, attn_mask=True),
}


def _cases():
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for block in (16, 32):
                for name in OPTIONS:
                    # the interpreter is slow: fp16 only with the fullest option set
                    if backend == "triton" and not CUDA and dtype == torch.float16 and \
                            name != "causal_rpe_attn_mask_kpm":
                        continue
                    yield pytest.param(backend, dtype, block, name,
                                       id=f"{backend}-{str(dtype)[6:]}-b{block}-{name}")


@pytest.mark.parametrize("backend,dtype,block,name", list(_cases()))
def test_matches_reference(backend, dtype, block, name):
    opts = OPTIONS[name]
    seq = 64
    gen = torch.Generator().manual_seed(hash((block, name)) % 10000)
    layout = causal_layout(seq // block, gen, above=opts.get("above", False))
    if not opts.get("causal"):
        layout = (torch.rand(H, seq // block, seq // block, generator=gen) < 0.6).long()
        layout[:, 0, 0] = 1
    q, k, v = (torch.randn(B, H, seq, D, generator=gen).to(DEVICE, dtype).requires_grad_()
               for _ in range(3))
    kw = {}
    if opts.get("kpm"):
        kpm = torch.zeros(B, seq)
        kpm[1, :3] = float("-inf")  # batch 1: queries 0-2 see no key under causal masking
        kpm[1, -5:] = float("-inf")
        kpm[0, 7] = -1.5  # additive, not only 0/-inf
        kw["key_padding_mask"] = kpm.to(DEVICE)
    if opts.get("rpe"):
        kw["rpe"] = (0.5 * torch.randn(1, H, seq, seq, generator=gen)).to(DEVICE, dtype)
    if opts.get("attn_mask"):
        am = 0.3 * torch.randn(seq, seq, generator=gen)
        am[5, 10:20] = float("-inf")
        kw["attn_mask"] = am.to(DEVICE)
    causal = bool(opts.get("causal"))
    out = block_sparse_attention(q, k, v, layout.to(DEVICE), block, causal=causal,
                                 backend=backend, **kw)
    ref = reference_attention(q, k, v, layout, block, causal=causal, **kw)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype)
    if opts.get("kpm") and causal:
        assert (out[1, :, :3] == 0).all()  # fully masked rows: zeros, not NaN
    g_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), g_out.to(dtype))
    refs = torch.autograd.grad(ref, (q, k, v), g_out)
    for a, b in zip(grads, refs):
        assert torch.isfinite(a).all()
        assert_rel_close(a, b, dtype, factor=2)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_causal_builds_no_seq_by_seq_mask(monkeypatch):
    """Causal masking touches the diagonal blocks only, through the layout's cached block
    index and a [block, block] triangle; nothing of seq x seq."""
    seq, block = 256, 16
    gen = torch.Generator().manual_seed(0)
    layout = causal_layout(seq // block, gen).to(DEVICE)
    q, k, v = (torch.randn(1, H, seq, D, generator=gen).to(DEVICE) for _ in range(3))
    big = []
    real_full, real_ones = torch.full, torch.ones

    def spy(factory):
        def make(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            if len(shape) >= 2 and shape[-1] == seq and shape[-2] == seq:
                big.append(tuple(shape))
            return factory(*size, **kw)
        return make

    monkeypatch.setattr(torch, "full", spy(real_full))
    monkeypatch.setattr(torch, "ones", spy(real_ones))
    out = block_sparse_attention(q, k, v, layout, block, causal=True, backend="triton")
    assert not big, f"built a [seq, seq] tensor: {big}"
    index = block_index(layout, q.device)  # the shared nonzero-block index of the layout
    diagonal, above = index.diagonal, index.above
    assert diagonal.numel() == H * (seq // block) and above.numel() == 0
    scores = torch.zeros(1, int(layout.sum()), block, block, device=q.device)
    cut = torch.isinf(mask_future(scores, index, block))
    future = cut[0, diagonal[0]]
    triangle = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    assert future.shape == (block, block) and torch.equal(future, triangle)
    assert block_index(layout, q.device) is index  # cached
    ref = reference_attention(q, k, v, layout, block, causal=True)
    assert_rel_close(out, ref, torch.float32)
