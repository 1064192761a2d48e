"""Which kernel dense scaled_dot_product_attention runs, and how fast each of its backends
is, at the benchmark's shapes (bf16, 16 heads, head_dim 64; forward, CUDA-graph replays).
The T3 rates of bench_attention.py are against the default (the fastest available).

    PYTHONPATH=. python3 benchmarks/experiments/dense_backends.py
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

for B, N in ((4, 4096), (1, 16384)):
    q, k, v = (torch.randn(B, 16, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * 16 * N * N * 64
    for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fwd():
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        try:
            ms = do_bench_cudagraph(fwd, rep=100, return_mode="median")
            print(f"{B}x{N} {name:9s} fwd {ms * 1000:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            print(f"{B}x{N} {name:9s} FAILED {type(e).__name__}: {str(e)[:120]}")
