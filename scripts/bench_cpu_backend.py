"""CPU time and peak memory of the PyTorch block-sparse backend vs dense attention (SDPA, and a masked softmax that materialises the scores).

    python scripts/bench_cpu_backend.py [--seqs 1024 2048 4096 8192] [--out FILE.json]

BigBird layout (block 64, 1 random, 3 sliding, 1 global), batch 1, 4 heads, head_dim 64,
fp32, forward + backward. Peak memory is measured in a fresh subprocess per point (peak RSS
growth over the inputs), so the numbers do not leak into each other.
With --out, writes the results as JSON and as a Markdown table beside it (FILE.md);
benchmarks/cpu_backend.{json,md} is the latest run.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

POINT = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from sparse_attn.sparsity_config import BigBirdSparsityConfig
from sparse_attn.ops.attention_torch import torch_block_sparse_attention
seq, kind = {seq}, {kind!r}
torch.manual_seed(0)
torch.set_num_threads({threads})
q, k, v = [torch.randn(1, 4, seq, 64, requires_grad=True) for _ in range(3)]
layout = BigBirdSparsityConfig(4, 64, num_random_blocks=1).make_layout(seq)
if kind == "masked":
    mask = layout.bool().repeat_interleave(64, 1).repeat_interleave(64, 2)
def run():
    if kind == "sparse":
        o = torch_block_sparse_attention(q, k, v, layout, 64)
    elif kind == "sdpa":
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    else:  # dense masked attention, the score matrix materialised
        s = (q @ k.transpose(-1, -2)) * 64 ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        o = torch.softmax(s, -1) @ v
    o.sum().backward()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run()
times = []
for _ in range(3):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"ms": sorted(times)[1] * 1e3, "peak_rss_mb": (peak - base) / 1024,
                  "density": layout.float().mean().item(),
                  "scores_mb": int(layout.sum()) * 64 * 64 * 4 / 2**20}}))
"""


def point(seq, kind, threads):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = POINT.format(root=root, seq=seq, kind=kind, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    kinds = ("sparse", "sdpa", "masked")
    print("fwd+bwd ms and peak RSS growth (MB) over the inputs (coarse: the allocator keeps "
          "freed memory); sparse = this backend, sdpa = dense scaled_dot_product_attention, "
          "masked = dense masked softmax; scores MB = size of one fp32 score tensor, "
          "nonzero blocks only (sparse) or seq x seq (dense)")
    print("| seq | density | " + " | ".join(f"{k} ms" for k in kinds) + " | "
          + " | ".join(f"{k} MB" for k in kinds) + " | sparse scores MB | dense scores MB |")
    print("|" + " --- |" * (4 + 2 * len(kinds)))
    fmt = lambda r, key: f"{r[key]:.0f}" if key in r else r.get("error", "?")[:40]
    for seq in args.seqs:
        res = {k: point(seq, k, args.threads) for k in kinds}
        rows.append({"seq": seq, **res})
        print(f"| {seq} | {res['sparse'].get('density', 0):.3f} | "
              + " | ".join(fmt(res[k], "ms") for k in kinds) + " | "
              + " | ".join(fmt(res[k], "peak_rss_mb") for k in kinds)
              + f" | {res['sparse'].get('scores_mb', 0):.0f} | {4 * seq * seq * 4 / 2**20:.0f} |",
              flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
            "torch": importlib.metadata.version("torch"),
            "command": "python " + " ".join(sys.argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        write_markdown(os.path.splitext(args.out)[0] + ".md", {"meta": meta, "rows": rows})
        print(f"wrote {args.out} and its .md")


def write_markdown(path, data):
    """The run as a Markdown record: machine, date, torch, command and the table."""
    meta, rows = data["meta"], data["rows"]
    kinds = ("sparse", "sdpa", "masked")
    fmt = lambda r, key: f"{r[key]:.0f}" if key in r else r.get("error", "?")[:40]  # noqa: E731
    md = [f"# PyTorch block-sparse backend vs dense attention on CPU ({meta['date']}, "
          f"{meta['cpus']}-core {meta['machine']}, {meta['threads']} threads)", "",
          f"torch {meta.get('torch', '?')}. Command: `{meta['command']}`. BigBird block 64 "
          "(1 random, 3 sliding, 1 global), batch 1, 4 heads, head_dim 64, fp32, "
          "forward+backward, median of 3.", "",
          "fwd+bwd ms and peak RSS growth (MB) over the inputs (coarse: the allocator keeps "
          "freed memory); sparse = this backend, sdpa = dense scaled_dot_product_attention, "
          "masked = dense masked softmax; scores MB = size of one fp32 score tensor, nonzero "
          "blocks only (sparse) or seq x seq (dense).", "",
          "| seq | density | " + " | ".join(f"{k} ms" for k in kinds) + " | "
          + " | ".join(f"{k} MB" for k in kinds) + " | sparse scores MB | dense scores MB |",
          "|" + " --- |" * (4 + 2 * len(kinds))]
    for r in rows:
        md.append(f"| {r['seq']} | {r['sparse'].get('density', 0):.3f} | "
                  + " | ".join(fmt(r[k], "ms") for k in kinds) + " | "
                  + " | ".join(fmt(r[k], "peak_rss_mb") for k in kinds)
                  + f" | {r['sparse'].get('scores_mb', 0):.0f} | "
                  f"{4 * r['seq'] * r['seq'] * 4 / 2**20:.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
