"""Block-sparse MatMul (sdd, dsd, dds) against a float64 dense reference.

Both backends: the Triton kernels (on CUDA, or on CPU through TRITON_INTERPRET=1, which
conftest sets when there is no GPU) and the pure-PyTorch block-sparse backend. Forward and
gradients, every mode x trans_a x trans_b x dtype x block. Under the interpreter the
combinations are pruned (each mode x transpose at float32, each mode x dtype x block once);
the torch backend and the GPU run them all.
"""
import os

import pytest
import torch

from reference import REL_TOL, assert_rel_close, layout_to_token_mask, rel_error
from sparse_attn.ops.caching import table_cache_size
from sparse_attn.ops.matmul import MatMul

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if CUDA else torch.device("cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

BACKENDS = ["torch"] + (["triton"] if HAVE_TRITON and (CUDA or INTERPRET) else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = [16, 32, 64, 128]
MODES = ["sdd", "dsd", "dds"]
TRANS = [(False, False), (False, True), (True, False), (True, True)]


def _shape(block):
    """(batch, heads, seq, head_dim) for the test device."""
    if CUDA:
        return 2, 3, (1024 if block == 128 else 512), 64
    return 2, 2, max(128, 2 * block), 32


def random_layout(heads, nb, density=0.35, seed=0):
    """A different random layout per head, with a global row and column (a long row for the
    softmax's two-pass path), one empty block-row (rows that must come out zero in dsd)."""
    g = torch.Generator().manual_seed(seed)
    lay = (torch.rand(heads, nb, nb, generator=g) < density).long()
    for h in range(heads):
        lay[h, h % nb, :] = 1
        lay[h, :, (h + 1) % nb] = 1
        lay[h, h, h] = 1
    if nb > 2:
        lay[0, nb - 1, :] = 0
    return lay


def densify(sp, layout, block):
    """[Z, nnz, B, B] -> dense [Z, H, R*B, C*B] (differentiable)."""
    z = sp.shape[0]
    h, nr, nc = layout.shape
    nz = layout.nonzero().to(sp.device)
    d = sp.new_zeros(z, h, nr, nc, block, block)
    d = d.index_put((torch.arange(z, device=sp.device)[:, None], nz[:, 0][None], nz[:, 1][None],
                     nz[:, 2][None]), sp)
    return d.permute(0, 1, 2, 4, 3, 5).reshape(z, h, nr * block, nc * block)


def blocks_of(d, layout, block):
    """dense [Z, H, R*B, C*B] -> [Z, nnz, B, B] at the layout's nonzeros (differentiable)."""
    z, h = d.shape[0], d.shape[1]
    nr, nc = layout.shape[1], layout.shape[2]
    nz = layout.nonzero().to(d.device)
    d6 = d.reshape(z, h, nr, block, nc, block).permute(0, 1, 2, 4, 3, 5)
    return d6[:, nz[:, 0], nz[:, 1], nz[:, 2]]


def op(t, trans):
    return t.transpose(-1, -2) if trans else t


def make_inputs(mode, layout, block, ta, tb, dtype, z, d, device=DEVICE):
    h, nr, nc = layout.shape
    nnz = int(layout.sum())
    if mode == "sdd":
        m, n = nr * block, nc * block
        a = torch.randn(z, h, *((d, m) if ta else (m, d)))
        b = torch.randn(z, h, *((n, d) if tb else (d, n)))
    elif mode == "dsd":
        k = (nr if ta else nc) * block
        a = torch.randn(z, nnz, block, block)
        b = torch.randn(z, h, *((d, k) if tb else (k, d)))
    else:
        k = (nc if tb else nr) * block
        a = torch.randn(z, h, *((k, d) if ta else (d, k)))
        b = torch.randn(z, nnz, block, block)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def reference(mode, a, b, layout, block, ta, tb):
    """float64 dense computation of the same product (differentiable in a and b)."""
    if mode == "sdd":
        return blocks_of(op(a, ta) @ op(b, tb), layout, block)
    if mode == "dsd":
        return op(densify(a, layout, block), ta) @ op(b, tb)
    return op(a, ta) @ op(densify(b, layout, block), tb)


def _poison():
    """Fill the caching allocator's free memory with NaN so unwritten outputs show."""
    if CUDA:
        torch.empty(64 << 20, device="cuda").fill_(float("nan"))


def _wanted(backend, mode, ta, tb, dtype, block):
    if backend == "torch" or not INTERPRET:
        return True
    # interpreter: every mode x transpose at float32 (blocks 16 and 64), and every
    # mode x dtype x block with one transpose pair that rotates through the four
    if dtype == torch.float32 and block in (16, 64):
        return True
    i = (MODES.index(mode) + DTYPES.index(dtype) + BLOCKS.index(block)) % 4
    return (ta, tb) == TRANS[i]


CASES = [pytest.param(backend, mode, ta, tb, dtype, block,
                      id=f"{backend}-{mode}-ta{int(ta)}-tb{int(tb)}-{str(dtype)[6:]}-b{block}")
         for backend in BACKENDS for mode in MODES for ta, tb in TRANS
         for dtype in DTYPES for block in BLOCKS
         if _wanted(backend, mode, ta, tb, dtype, block)]


@pytest.mark.parametrize("backend,mode,ta,tb,dtype,block", CASES)
def test_matmul_forward_backward(backend, mode, ta, tb, dtype, block):
    z, h, seq, d = _shape(block)
    layout = random_layout(h, seq // block, seed=block + 7 * MODES.index(mode))
    torch.manual_seed(1000 * block + 10 * MODES.index(mode) + 2 * ta + tb)
    a, b = make_inputs(mode, layout, block, ta, tb, dtype, z, d)
    a.requires_grad_(True)
    b.requires_grad_(True)
    _poison()
    c = MatMul(layout, block, mode, ta, tb, backend=backend)(a, b)
    assert c.dtype == dtype
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    ref = reference(mode, a64, b64, layout, block, ta, tb)
    assert c.shape == ref.shape
    assert_rel_close(c, ref, dtype)

    g = torch.randn(c.shape, device=c.device).to(dtype)
    _poison()
    c.backward(g)
    ref.backward(g.double())
    # gradients add the rounding of dc and of a second product
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert_rel_close(a.grad, a64.grad, dtype, factor=2)
    assert_rel_close(b.grad, b64.grad, dtype, factor=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_pattern_and_noncontiguous(backend):
    """q @ k^T (sdd, trans_b) then probs @ v (dsd) on non-contiguous views, batch 3,
    head_dim 48 (not a power of two)."""
    block = 16
    z, h, seq, d = 3, 2, 128, 48
    layout = random_layout(h, seq // block, seed=3)
    torch.manual_seed(0)
    # [Z, S, H, D] storage viewed as [Z, H, S, D]: non-contiguous, as after a projection
    q = torch.randn(z, seq, h, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(z, seq, h, d, device=DEVICE).transpose(1, 2)
    v = torch.randn(z, seq, h, d, device=DEVICE).transpose(1, 2)
    s = MatMul(layout, block, "sdd", trans_a=False, trans_b=True, backend=backend)(q, k)
    assert_rel_close(s, blocks_of(q.double() @ k.double().transpose(-1, -2), layout, block),
                     torch.float32)
    p = torch.randn_like(s)[:, :, :, :].transpose(-1, -2)   # non-contiguous sparse operand
    out = MatMul(layout, block, "dsd", backend=backend)(p, v)
    ref = densify(p.double(), layout, block) @ v.double()
    assert_rel_close(out, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_never_share_tables(backend):
    """Two layouts of one shape must give different results; equal layouts may share."""
    block, z, h, seq, d = 16, 1, 2, 64, 32
    l1 = random_layout(h, seq // block, seed=1)
    l2 = l1.clone()
    l2[0, 1, 1] = 1 - l2[0, 1, 1]
    assert int(l1.sum()) != int(l2.sum()) or not torch.equal(l1, l2)
    q = torch.randn(z, h, seq, d, device=DEVICE)
    k = torch.randn(z, h, seq, d, device=DEVICE)
    for lay in (l1, l2, l1.clone()):
        s = MatMul(lay, block, "sdd", trans_b=True, backend=backend)(q, k)
        assert_rel_close(s, blocks_of(q.double() @ k.double().transpose(-1, -2), lay, block),
                         torch.float32)


def test_lut_cache_keyed_by_content():
    lay = random_layout(2, 4, seed=5)
    m1 = MatMul(lay, 16, "dsd")
    m2 = MatMul(lay.clone(), 16, "dsd")
    other = lay.clone()
    other[1, 0, 0] = 1 - other[1, 0, 0]
    m3 = MatMul(other, 16, "dsd")
    assert m1._key == m2._key != m3._key
    b = torch.randn(1, 2, 64, 32)
    m1(torch.randn(1, m1.nnz, 16, 16), b)
    n = table_cache_size()
    m2(torch.randn(1, m2.nnz, 16, 16), b)
    assert table_cache_size() == n          # same content: reused
    m3(torch.randn(1, m3.nnz, 16, 16), b)
    assert table_cache_size() > n           # different content: its own tables


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z", [1, 3])
def test_batch_sizes_and_empty_layout(backend, z):
    block, h, seq, d = 32, 2, 128, 32
    layout = random_layout(h, seq // block, seed=z)
    layout[1] = 0                                # a head with no block at all
    a = torch.randn(z, int(layout.sum()), block, block, device=DEVICE)
    b = torch.randn(z, h, seq, d, device=DEVICE)
    c = MatMul(layout, block, "dsd", backend=backend)(a, b)
    assert_rel_close(c, densify(a.double(), layout, block) @ b.double(), torch.float32)
    assert bool((c[:, 1] == 0).all())


def test_errors():
    lay = random_layout(2, 4, seed=0)
    nnz = int(lay.sum())
    B = 16
    with pytest.raises(ValueError, match="mode"):
        MatMul(lay, B, "ddd")
    with pytest.raises(ValueError, match="block"):
        MatMul(lay, 8, "sdd")
    with pytest.raises(ValueError, match="layout"):
        MatMul(lay[0], B, "sdd")
    with pytest.raises(ValueError, match="layout"):
        MatMul(lay * 2, B, "sdd")
    sdd = MatMul(lay, B, "sdd", trans_b=True)
    q = torch.randn(1, 2, 64, 32)
    with pytest.raises(ValueError, match=r"'a'.*\(2, 64, 32\)"):
        sdd(q[0], q)                                       # wrong rank
    with pytest.raises(ValueError, match=r"'a'.*heads"):
        sdd(torch.randn(1, 3, 64, 32), q)                  # heads mismatch
    with pytest.raises(ValueError, match=r"'a'.*rows"):
        sdd(torch.randn(1, 2, 60, 32), q)                  # not block multiple
    with pytest.raises(ValueError, match="inner"):
        sdd(q, torch.randn(1, 2, 64, 16))
    with pytest.raises(ValueError, match="dtype"):
        sdd(q.double(), q.double())
    with pytest.raises(ValueError, match="same dtype"):
        sdd(q, q.half())
    dsd = MatMul(lay, B, "dsd")
    with pytest.raises(ValueError, match=rf"'a'.*\[batch, {nnz}, 16, 16\]"):
        dsd(torch.randn(1, nnz + 1, B, B), q)              # nnz mismatch
    with pytest.raises(ValueError, match="'b'"):
        dsd(torch.randn(1, nnz, B, B), torch.randn(1, 2, 48, 32))
    dds = MatMul(lay, B, "dds")
    with pytest.raises(ValueError, match="'b'"):
        dds(torch.randn(1, 2, 32, 64), torch.randn(1, nnz, 32, 32))
    with pytest.raises(ValueError, match="'a'"):
        dds(torch.randn(1, 2, 32, 48), torch.randn(1, nnz, B, B))
    with pytest.raises(ValueError, match="batch"):
        dds(torch.randn(2, 2, 32, 64), torch.randn(1, nnz, B, B))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """After one warm-up call the forward does no host-device sync: it can be captured."""
    block, z, h, seq, d = 64, 2, 4, 1024, 64
    layout = random_layout(h, seq // block, seed=11)
    from sparse_attn.ops.softmax import Softmax
    layout[0, 3, :] = 1                          # a global row: split dsd, long softmax launch
    sdd = MatMul(layout, block, "sdd", trans_b=True)
    dsd = MatMul(layout, block, "dsd")
    sm = Softmax(layout, block)
    q, k, v = (torch.randn(z, h, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kpm = torch.zeros(z, seq, device="cuda")

    def fwd():
        return dsd(sm(sdd(q, k), scale=0.125, key_padding_mask=kpm), v)

    out = fwd()                                  # warm-up: tables, compilation
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fwd()
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    sc = (q.double() @ k.double().transpose(-1, -2)) * 0.125
    sc = sc.masked_fill(~layout_to_token_mask(layout, block).cuda()[None], float("-inf"))
    ref = torch.softmax(sc, -1).nan_to_num(0.0) @ v.double()
    assert_rel_close(out, ref, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="head_dim sweep runs on the GPU")
@pytest.mark.parametrize("d", [32, 80, 128])
@pytest.mark.parametrize("block", BLOCKS)
def test_head_dims_gpu(d, block):
    z, h, seq = 2, 4, 2048
    layout = random_layout(h, seq // block, density=0.2, seed=d)
    q, k, v = (torch.randn(z, h, seq, d, device="cuda", dtype=torch.float16) for _ in range(3))
    s = MatMul(layout, block, "sdd", trans_b=True)(q, k)
    assert_rel_close(s, blocks_of(q.double() @ k.double().transpose(-1, -2), layout, block),
                     torch.float16)
    p = torch.randn_like(s)
    out = MatMul(layout, block, "dsd")(p, v)
    assert_rel_close(out, densify(p.double(), layout, block) @ v.double(), torch.float16)
    assert rel_error(out, densify(p.double(), layout, block) @ v.double()) < REL_TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,ta,tb", [("dsd", False, False), ("dsd", True, False),
                                        ("dds", False, False), ("dds", False, True)])
def test_global_rows_split(backend, mode, ta, tb):
    """A banded layout with a global row and column: the global row tile has far more
    nonzero tiles than the others, so the Triton dsd kernel splits it into pieces."""
    block, z, h, seq, d = 64, 1, 2, 2048, 32
    nb = seq // block
    layout = torch.zeros(h, nb, nb, dtype=torch.int64)
    r = torch.arange(nb)
    layout[:, r, r] = 1
    layout[:, r[1:], r[:-1]] = 1
    layout[0, 0, :] = 1
    layout[1, :, 0] = 1
    layout[1, 5, :] = 1
    torch.manual_seed(7)
    a, b = make_inputs(mode, layout, block, ta, tb, torch.float32, z, d)
    a.requires_grad_(True)
    b.requires_grad_(True)
    c = MatMul(layout, block, mode, ta, tb, backend=backend)(a, b)
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    ref = reference(mode, a64, b64, layout, block, ta, tb)
    assert_rel_close(c, ref, torch.float32)
    g = torch.randn(c.shape, device=c.device)
    c.backward(g)
    ref.backward(g.double())
    assert_rel_close(a.grad, a64.grad, torch.float32, factor=2)
    assert_rel_close(b.grad, b64.grad, torch.float32, factor=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("mode", MODES)
def test_rectangular_layout_not_tile_multiple(backend, block, mode):
    """Layout [2, 5, 3]: rows and columns that are not multiples of the kernel's 64-wide
    tile (block 16, 32) and differ from each other; all four transpose pairs."""
    z, d = 2, 32
    layout = (torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(block)) < 0.5).long()
    layout[:, 0, 0] = 1
    for ta, tb in TRANS:
        torch.manual_seed(block + 2 * ta + tb)
        a, b = make_inputs(mode, layout, block, ta, tb, torch.float32, z, d)
        a.requires_grad_(True)
        b.requires_grad_(True)
        c = MatMul(layout, block, mode, ta, tb, backend=backend)(a, b)
        a64 = a.detach().double().requires_grad_(True)
        b64 = b.detach().double().requires_grad_(True)
        ref = reference(mode, a64, b64, layout, block, ta, tb)
        assert_rel_close(c, ref, torch.float32)
        g = torch.randn(c.shape, device=c.device)
        c.backward(g)
        ref.backward(g.double())
        assert_rel_close(a.grad, a64.grad, torch.float32, factor=2)
        assert_rel_close(b.grad, b64.grad, torch.float32, factor=2)
