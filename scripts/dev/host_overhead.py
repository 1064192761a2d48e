"""Host (Python) time per call of the fused attention path, without the GPU and without
Triton's own launcher: every Triton kernel is replaced by a no-op, so what is left is the
work this package does around the launches (checks, look-up-table cache, allocations,
autograd, the Hugging Face attention function).

At batch 1 a BERT training step is bound by host time, so this is the number to keep small.
Triton's launcher (``JITFunction.run``) adds its own cost per launch on top; count the
launches in the last column.

    python scripts/dev/host_overhead.py                 # CPU, no GPU needed
    python scripts/dev/host_overhead.py --iters 2000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the checks accept CPU tensors

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` counts and returns."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.counter[0] += 1
        return launch


def stub_kernels():
    from sparse_attn.ops.kernels import fused_backward, fused_forward

    counter = [0]
    setattr(fused_forward, "fused_attn_fwd_kernel", _NoLaunch(counter))
    for name in ("fused_attn_bwd_dq_kernel", "fused_attn_bwd_dkdv_kernel",
                 "fused_attn_bwd_reduce_kernel"):
        setattr(fused_backward, name, _NoLaunch(counter))
    return counter


def timeit(fn, iters):
    for _ in range(max(10, iters // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--block", type=int, default=64)
    args = p.parse_args(argv)

    counter = stub_kernels()
    from sparse_attn.ops import attention as dispatch

    # on CPU "auto" picks the torch backend; here the fused path is what is measured
    dispatch.select_backend = lambda *a, **kw: "fused"
    from sparse_attn import BigBirdSparsityConfig, SparseSelfAttention
    from sparse_attn.ops.fused import fused_block_sparse_attention

    torch.manual_seed(0)
    B, H, N, D = 1, args.heads, args.seq, 64
    sc = BigBirdSparsityConfig(num_heads=H, block=args.block, different_layout_per_head=True,
                               num_random_blocks=3, num_sliding_window_blocks=3,
                               num_global_blocks=1)
    layout = sc.make_layout(N)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    kpm = torch.zeros(B, N)
    attn = SparseSelfAttention(sc, max_seq_length=N)
    go = torch.randn(B, H, N, D, dtype=torch.bfloat16)

    def fused_fwd():
        with torch.no_grad():
            fused_block_sparse_attention(q, k, v, layout, args.block, key_padding_mask=kpm)

    def fused_fwd_bwd():
        out = fused_block_sparse_attention(q, k, v, layout, args.block, key_padding_mask=kpm)
        torch.autograd.grad(out, (q, k, v), go)

    def module_fwd_bwd():
        out = attn(q, k, v, key_padding_mask=kpm)
        torch.autograd.grad(out, (q, k, v), go)

    rows = []
    for name, fn in (("fused fwd (no grad)", fused_fwd), ("fused fwd+bwd", fused_fwd_bwd),
                     ("SparseSelfAttention fwd+bwd", module_fwd_bwd)):
        fn()
        counter[0] = 0
        fn()
        launches = counter[0]
        rows.append((name, timeit(fn, args.iters), launches))
    try:
        import transformers  # noqa: F401
        from sparse_attn import hf

        class _M(torch.nn.Module):
            pass

        mod = _M()
        cfg = transformers.BertConfig(num_attention_heads=H, hidden_size=H * D)
        mod.config = cfg
        hf._store(cfg, sc, N, None)
        mod.training = True
        mask4 = hf._sparse_mask(B, N, N, attention_mask=torch.ones(B, N, dtype=torch.long))

        def hf_fwd_bwd():
            out, _ = hf.sparse_attention_forward(mod, q, k, v, mask4, scaling=D ** -0.5)
            torch.autograd.grad(out, (q, k, v), go.transpose(1, 2))

        hf_fwd_bwd()
        counter[0] = 0
        hf_fwd_bwd()
        launches = counter[0]
        rows.append(("HF attention function fwd+bwd", timeit(hf_fwd_bwd, args.iters), launches))
    except ImportError:
        pass

    print(f"host time per call, Triton launches stubbed out; [{B}, {H}, {N}, {D}] bf16, "
          f"BigBird block {args.block}, torch {torch.__version__}")
    print(f"{'path':<34}{'us/call':>10}{'launches':>10}")
    for name, us, n in rows:
        print(f"{name:<34}{us:>10.1f}{n:>10}")


if __name__ == "__main__":
    main()
