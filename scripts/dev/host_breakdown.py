"""Where the host time of one fused block-sparse attention call goes, on the GPU machine.

At batch 1 a BERT step is bound by host time, so each row is the wall time per call of a
loop that the host, not the GPU, limits:

    python scripts/dev/host_breakdown.py                       # [1, 12, 4096, 64] bf16, BigBird 64
    python scripts/dev/host_breakdown.py --seq 16384 --layout fixed

The second column is the time between CUDA events around the loop, per call: the GPU time
only where the GPU, not the host, is the limit. Rows: dense SDPA forward+backward; the public
fused function (direct launches, launch.py), the same through ``kernel[grid]`` and with
pointer loads instead of TMA descriptors (which cost host time per launch); the same
with every Triton launch stubbed out (the package's own Python: a plan's prepared launches
are no-ops); the recorded Triton
launches of one call replayed alone through ``kernel[grid](...)`` and through the compiled
kernel's launcher directly (Triton's own cost per launch); a torch op launch for scale; and
the transformers attention functions (ours and SDPA) forward+backward. The host of the GPU
machine is shared and noisy, so rows are interleaved over rounds and the best is shown.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

KERNELS = ("fused_attn_fwd_kernel", "fused_attn_bwd_dq_kernel",
           "fused_attn_bwd_dkdv_kernel", "fused_attn_bwd_reduce_kernel")


def per_call_us(fn, iters):
    """(host-limited wall us per call, GPU us per call)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    wall = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return wall, a.elapsed_time(b) * 1e3 / iters


class _Recorder:
    """Stands in for a JITFunction: launches it and records (fn, grid, args, kwargs, kernel)."""

    def __init__(self, fn, log, stub):
        self.fn, self.log, self.stub = fn, log, stub

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if self.stub:
                return None
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kw)
            if self.log is not None:
                self.log.append((self.fn, grid, args, kw, kernel))
            return kernel
        return launch


def install(log=None, stub=False):
    from sparse_attn.ops.kernels import fused_backward, fused_forward

    def module(name):
        return fused_forward if name == "fused_attn_fwd_kernel" else fused_backward

    originals = {name: getattr(module(name), name) for name in KERNELS}
    for name, fn in originals.items():
        setattr(module(name), name, _Recorder(fn, log, stub))
    return lambda: [setattr(module(n), n, f) for n, f in originals.items()]


def direct_launchers(log):
    """The recorded launches as calls straight into each compiled kernel's launcher."""
    from triton.runtime.driver import driver

    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    calls = []
    for fn, grid, args, kw, kernel in log:
        binder = fn.device_caches[device][4]
        bound, _, _ = binder(*args, **kw)
        g = tuple(grid) + (1,) * (3 - len(grid))
        calls.append((kernel.run, (g[0], g[1], g[2], stream, kernel.function,
                                   kernel.packed_metadata, None, None, None,
                                   *bound.values())))
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layout", default="bigbird", choices=("bigbird", "fixed"))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch.nn.functional as F

    from bench_bert_training import sparsity_config
    from sparse_attn import block_sparse_attention

    H, N, D, blk = args.heads, args.seq, 64, args.block
    q, k, v = [torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3)]
    do = torch.randn_like(q)
    sc = sparsity_config(f"sparse_{args.layout}", H, blk)
    layout = sc.make_layout(N).cuda()

    def sparse():
        q.grad = k.grad = v.grad = None
        block_sparse_attention(q, k, v, layout, blk).backward(do)

    def dense():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v).backward(do)

    from sparse_attn.ops import launch

    def with_direct(flag, fn):
        def run():
            launch.set_direct_launch(flag)
            try:
                fn()
            finally:
                launch.set_direct_launch(True)
        return run

    log = []
    restore = install(log)
    launch.set_direct_launch(False)
    sparse()
    launch.set_direct_launch(True)
    restore()
    n = len(log)

    def stubbed():  # every prepared launch of the call's plan is a no-op
        saved = launch.Prepared.__call__, launch.Prepared.launch
        launch.Prepared.__call__ = launch.Prepared.launch = lambda self, *a: None
        try:
            sparse()
        finally:
            launch.Prepared.__call__, launch.Prepared.launch = saved

    def replay_jit():
        for fn, grid, a, kw, _ in log:
            fn[grid](*a, **kw)

    calls = direct_launchers(log)

    def replay_direct():
        for run, a in calls:
            run(*a)

    # the same call with TMA forced off and on (the default takes it for large launches and
    # graph captures only): a copy of the layout is another layout identity, so its plan,
    # made while the setting is forced, keeps its kernels after the default is back
    # (set_fused_config would drop every plan)
    from sparse_attn.ops.fused import config as fused_config

    def forced(kernels):
        lay = layout.clone()

        def run():
            q.grad = k.grad = v.grad = None
            block_sparse_attention(q, k, v, lay, blk).backward(do)

        saved, fused_config._tma = fused_config._tma, kernels
        run()
        fused_config._tma = saved
        return run

    sparse_ptr = forced(frozenset())
    sparse_tma = forced(frozenset(fused_config.KERNELS))
    sparse_rule = forced(fused_config._tma)  # the default again, on a plan made outside the log

    x = torch.zeros(16, device="cuda")

    def fwd_only():
        with torch.no_grad():
            block_sparse_attention(q, k, v, layout, blk)

    cases = [("dense SDPA fwd+bwd", dense, "-"),
             ("fused fwd+bwd (public function)", sparse, n),
             ("  same, kernel[grid] launches", with_direct(False, sparse), n),
             ("  same, pointer loads (TMA forced off)", sparse_ptr, n),
             ("  same, TMA descriptors (forced on)", sparse_tma, n),
             ("  same, default rule, another plan", sparse_rule, n),
             ("fused fwd only, no grad", fwd_only, "-"),
             ("fused fwd+bwd, launches stubbed", stubbed, 0),
             ("its launches via kernel[grid](...)", replay_jit, n),
             ("its launches via CompiledKernel.run", replay_direct, n),
             (f"{n} x torch add_ (scale)", lambda: [x.add_(1) for _ in range(n)], n)]

    try:
        import transformers
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from sparse_attn import hf

        class _M(torch.nn.Module):
            is_causal = False

        mod = _M().train()
        cfg = transformers.BertConfig(num_attention_heads=H, hidden_size=H * D)
        mod.config = cfg
        hf._store(cfg, sc, N, None)
        go = do.transpose(1, 2)

        def hf_sparse():
            q.grad = k.grad = v.grad = None
            out, _ = hf.sparse_attention_forward(mod, q, k, v, None, scaling=D ** -0.5)
            out.backward(go)

        def hf_sdpa():
            q.grad = k.grad = v.grad = None
            out, _ = sdpa_attention_forward(mod, q, k, v, None, scaling=D ** -0.5)
            out.backward(go)

        cases += [("HF sparse_attention_forward fwd+bwd", hf_sparse, n),
                  ("HF sdpa_attention_forward fwd+bwd", hf_sdpa, "-")]
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"(HF rows skipped: {type(e).__name__}: {e})")

    # the host of the GPU machine is shared and noisy: rows are interleaved over rounds and
    # the best round is reported
    results = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):
        for name, fn, _ in cases:
            results[name].append(per_call_us(fn, args.iters))
    rows = [(name, *min(results[name]), launches) for name, _, launches in cases]

    import triton
    print(f"host breakdown, [1, {H}, {N}, {D}] bf16, {args.layout} block {blk}; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; best of {args.rounds} rounds of {args.iters} calls")
    print(f"{'path':<40}{'wall us/call':>14}{'events us':>13}{'launches':>10}")
    for name, wall, gpu, launches in rows:
        print(f"{name:<40}{wall:>14.1f}{gpu:>13.1f}{launches!s:>10}")


if __name__ == "__main__":
    main()
