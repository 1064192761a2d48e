"""Probe (GPU host): where the host time of the TMA descriptors goes. host_breakdown.py showed
a BigBird 64 forward+backward at [1, 12, 4096, 64] taking 592 us of host time with TMA and
487 us with pointer loads (8 descriptors: about 13 us each). This splits one descriptor's cost
into our constructor (sparse_attn.ops.fused._descriptor) and Triton's conversion at launch
(the CUtensorMap encode and the argument expansion), and times a direct launch of the
compiled forward kernel with descriptors against its pointer variant. (The logged runs also
printed the source of Triton's conversion functions; that part is left out of the logs.)

    PYTHONPATH=. python3 benchmarks/experiments/probe_tma_host.py

Logs: probe_tma_host_h200.log (the first part), probe_tma_host2_h200.log (all of it; run
when TMA was the default at every launch and a kernel's launches were a {False: pointer,
True: TMA} dict; the script now forces TMA for its TMA rows and reads the _Launches object).
"""
import inspect
import time

import torch


def best_us(fn, iters=2000, rounds=5):
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def main():
    import triton
    from triton.backends.nvidia import driver as nvd

    from sparse_attn import block_sparse_attention
    from sparse_attn.ops import fused
    from sparse_attn.ops.kernels import fused_attention as K

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    # where Triton's conversion lives in this version (its source is not copied into logs)
    for name in ("make_tensordesc_arg", "wrap_handle_tensordesc"):
        fn = getattr(nvd, name, None)
        if fn is not None:
            params = list(inspect.signature(fn).parameters)
            print(f"triton.backends.nvidia.driver.{name}{tuple(params)}")

    H, N, D, blk = 12, 4096, 64, 64
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from scripts.bench_bert_training import sparsity_config
    layout = sparsity_config("sparse_bigbird", H, blk).make_layout(N).cuda()
    fused._TMA = fused._TMA_DEFAULT  # forced: TMA at every launch of this layout's plan
    with torch.no_grad():
        block_sparse_attention(q, k, v, layout, blk)
    torch.cuda.synchronize()

    us = best_us(lambda: fused._descriptor(k, 64))
    print(f"one _descriptor(k, 64):                 {us:7.2f} us")
    desc = fused._descriptor(k, 64)
    # the compiled TMA forward kernel and its descriptor metadata
    kernel = None
    for cache in K.fused_attn_fwd_kernel.device_caches.values():
        for ck in cache[0].values():
            meta = getattr(ck.metadata, "tensordesc_meta", None)
            if meta:
                kernel = ck
    if kernel is None:
        print("no compiled TMA forward kernel found")
    else:
        meta = kernel.metadata.tensordesc_meta
        print(f"tensordesc_meta entries: {len(meta)}; first: {meta[0]}")
        mk = nvd.make_tensordesc_arg
        nparams = len(inspect.signature(mk).parameters)
        args = (desc, meta[0]) + ((None,) if nparams == 3 else ())
        print(f"one make_tensordesc_arg (encode):       {best_us(lambda: mk(*args)):7.2f} us")
        fill = getattr(triton.runtime.driver.active.utils, "fill_tma_descriptor", None) or \
            getattr(triton.runtime.driver.active.utils, "fill_tma_descriptor_tiled", None)
        print(f"fill function: {fill}")

    def fwd():
        with torch.no_grad():
            block_sparse_attention(q, k, v, layout, blk)

    layout_ptr = layout.clone()

    def fwd_ptr():
        with torch.no_grad():
            block_sparse_attention(q, k, v, layout_ptr, blk)

    saved, fused._TMA = fused._TMA, frozenset()
    fwd_ptr()
    fused._TMA = saved
    torch.cuda.synchronize()
    # the forward's main launch, recorded through fused._launch, then replayed in parts
    rec = []
    real = fused._launch

    def recording(launches, ctx, head, tiles, tail):
        rec.append((launches, ctx, head, tiles, tail))
        return real(launches, ctx, head, tiles, tail)

    fused._launch = recording
    fwd()
    fused._launch = real
    launches, ctx, head, tiles, tail = rec[0]
    for name, p in (("TMA", launches.tma), ("pointer", launches.pointer)):
        print(f"prepared {name} launch: entry cached: {p.entry is not None}; "
              f"launcher cache size {len(p.launcher.cache)}")
    descs = [fused._descriptor(t, rows) for t, rows in tiles]
    nones = [None] * len(tiles)
    print(f"TMA launch, descriptors prebuilt:       "
          f"{best_us(lambda: launches.tma.launch(ctx, *head, *descs, *tail), 1000):7.2f} us")
    print(f"pointer launch:                         "
          f"{best_us(lambda: launches.pointer.launch(ctx, *head, *nones, *tail), 1000):7.2f} us")
    print(f"_launch (4 descriptors built):          "
          f"{best_us(lambda: real(launches, ctx, head, tiles, tail), 1000):7.2f} us")
    torch.cuda.synchronize()
    for _ in range(3):
        a = best_us(fwd, 300)
        b = best_us(fwd_ptr, 300)
        print(f"fwd no grad: TMA {a:7.1f} us   pointer {b:7.1f} us   difference {a - b:6.1f} us")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
