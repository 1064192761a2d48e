"""Where the time of one BERT-base MLM training step goes (GPU): torch.profiler tables for
the sparse and dense variants of scripts/bench_bert_training.py, plus the attention op alone.

    python scripts/dev/profile_bert_step.py --seq 4096 --variant sparse_bigbird
    python scripts/dev/profile_bert_step.py --seq 4096 --split     # host vs GPU time, no profiler

``--split`` separates host time from GPU time without a profiler (whose per-op overhead
inflates Python-heavy ops): a ``torch.cuda._sleep`` kernel keeps the GPU busy while the host
enqueues one whole step, so the host time of the step is measured alone (perf_counter), and
CUDA events recorded after the sleep measure the GPU time of the step with no host gaps. A
step whose host time exceeds the sleep waited for the GPU somewhere (a host sync); one
step under ``torch.cuda.set_sync_debug_mode("warn")`` then lists the syncing calls. The
same split is printed for the attention op alone (forward + backward).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def attention_alone(seq, heads=12, dim=64, block=64):
    import torch.nn.functional as F
    from triton.testing import do_bench

    from bench_bert_training import sparsity_config
    from sparse_attn import block_sparse_attention

    q, k, v = [torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3)]
    do = torch.randn_like(q)
    layout = sparsity_config("sparse_bigbird", heads, block).make_layout(seq).cuda()

    def sparse():
        block_sparse_attention(q, k, v, layout, block).backward(do)

    def dense():
        F.scaled_dot_product_attention(q, k, v).backward(do)

    for name, fn in (("fused sparse", sparse), ("dense sdpa", dense)):
        ms = do_bench(fn, return_mode="median", grad_to_none=[q, k, v])
        print(f"attention alone fwd+bwd [1,{heads},{seq},{dim}] {name}: {ms:.3f} ms")


class _Base:  # the benchmark's BERT-base arguments
    block, hidden, layers, heads = 64, 768, 12, 12


def make_step(variant, seq):
    """(step function, description): one BERT-base MLM training step of ``variant`` at
    ``seq`` (batch 1, bf16, AdamW), as in scripts/bench_bert_training.py; warmed up."""
    from bench_bert_training import build

    torch.manual_seed(0)
    model, encoder, head, desc = build(variant, _Base, seq)
    model.to("cuda", torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, 30522, (1, seq), device="cuda")
    pos = torch.randperm(seq, device="cuda")[: seq // 7]
    labels = torch.randint(5, 30522, (pos.numel(),), device="cuda")

    def step():
        h = encoder(input_ids=ids)[0]
        loss = torch.nn.functional.cross_entropy(head(h[0, pos]).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step, desc


def host_gpu_split(fn, reps=5, sleep_ms=300):
    """(median host ms, median GPU ms, max host ms) of ``fn`` with the GPU kept busy while
    the host enqueues it (see the module docstring)."""
    import statistics
    import time

    cycles = int(sleep_ms * 2e6)  # about sleep_ms at 2 GHz; measured below
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    torch.cuda.synchronize()
    sleep_ms = a.elapsed_time(b)
    host, gpu = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(gpu), max(host), sleep_ms


def split_report(seq, variants, split_mins=(None,)):
    """Host and GPU time per training step for each variant, and the syncs in one step.
    Sparse variants run once per ``split_mins`` value (None: the default)."""
    import warnings

    from sparse_attn.ops.fused import set_fused_config

    print(f"== host vs GPU time per step, seq {seq} (GPU busy while the host enqueues)")
    runs = [(v, m) for v in variants for m in (split_mins if v.startswith("sparse") else (None,))]
    for variant, split_min in runs:
        set_fused_config()
        if split_min is not None:
            set_fused_config(split_min=split_min)
        step, desc = make_step(variant, seq)
        host, gpu, worst, sleep = host_gpu_split(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sorted({str(w.message).splitlines()[0][:120] for w in caught
                        if "synchroniz" in str(w.message)})
        flag = "  (host waited for the GPU: a sync)" if worst >= sleep else ""
        if split_min is not None:
            desc = f"{desc}, split_min {split_min}"
        print(f"{desc:<64} host {host:7.1f} ms  GPU {gpu:7.1f} ms  -> bound by "
              f"{'host' if host > gpu else 'GPU'}{flag}; {len(syncs)} kinds of syncing call")
        for line in syncs:
            print(f"    sync: {line}")
        del step
        torch.cuda.empty_cache()


def cprofile_step(seq, variant, top=30):
    """cProfile of the host side of three training steps of ``variant`` while a sleep kernel
    holds the GPU (so no call waits for it): where the host time goes, by function."""
    import cProfile
    import pstats

    step, desc = make_step(variant, seq)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"== cProfile, host side of 3 steps: {desc}, seq {seq}")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    del step
    torch.cuda.empty_cache()


def attention_split(seq, heads=12, dim=64, block=64):
    import torch.nn.functional as F

    from bench_bert_training import sparsity_config
    from sparse_attn import block_sparse_attention

    q, k, v = [torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3)]
    do = torch.randn_like(q)
    for kind in ("sparse_bigbird", "sparse_fixed"):
        layout = sparsity_config(kind, heads, block).make_layout(seq).cuda()

        def sparse(n=20):
            for _ in range(n):
                q.grad = k.grad = v.grad = None
                block_sparse_attention(q, k, v, layout, block).backward(do)

        sparse(3)
        host, gpu, _, _ = host_gpu_split(sparse)
        print(f"attention alone fwd+bwd [1,{heads},{seq},{dim}] {kind}: host "
              f"{host / 20 * 1e3:.0f} us, GPU {gpu / 20 * 1e3:.0f} us per call")

    def dense(n=20):
        for _ in range(n):
            q.grad = k.grad = v.grad = None
            F.scaled_dot_product_attention(q, k, v).backward(do)

    dense(3)
    host, gpu, _, _ = host_gpu_split(dense)
    print(f"attention alone fwd+bwd [1,{heads},{seq},{dim}] dense sdpa: host "
          f"{host / 20 * 1e3:.0f} us, GPU {gpu / 20 * 1e3:.0f} us per call")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--variant", default="sparse_bigbird")
    ap.add_argument("--split", action="store_true",
                    help="host vs GPU time and syncs per step for dense and sparse variants")
    ap.add_argument("--split-mins", type=int, nargs="+", default=[16, 1024],
                    help="with --split: run the sparse variants with each split_min")
    ap.add_argument("--cprofile", action="store_true",
                    help="cProfile the host side of --variant's step (GPU held busy)")
    args = ap.parse_args()
    if args.cprofile:
        cprofile_step(args.seq, args.variant)
        return
    if args.split:
        split_report(args.seq, ["dense_sdpa", "sparse_bigbird", "sparse_fixed"],
                     args.split_mins)
        attention_split(args.seq)
        return
    step, desc = make_step(args.variant, args.seq)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"== {desc}, seq {args.seq}: 2 steps")
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    syncs = [e for e in ka if any(s in e.key for s in ("Synchronize", "item", "local_scalar",
                                                          "MemcpyDtoH", "nonzero"))]
    for e in syncs:
        print(f"sync-ish: {e.key} count {e.count} cpu {e.cpu_time_total / 1e3:.2f} ms")
    attention_alone(args.seq)


if __name__ == "__main__":
    main()
