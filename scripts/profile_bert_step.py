"""Where the time of one BERT-base MLM training step goes (GPU): torch.profiler tables for
the sparse and dense variants of scripts/bench_bert_training.py, plus the attention op alone.

    python scripts/profile_bert_step.py --seq 4096 --variant sparse_bigbird
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--variant", default="sparse_bigbird")
    args = ap.parse_args()
    from bench_bert_training import build

    class A:  # the benchmark's BERT-base arguments
        block, hidden, layers, heads = 64, 768, 12, 12

    torch.manual_seed(0)
    model, encoder, head, desc = build(args.variant, A, args.seq)
    model.to("cuda", torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, 30522, (1, args.seq), device="cuda")
    pos = torch.randperm(args.seq, device="cuda")[: args.seq // 7]
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
