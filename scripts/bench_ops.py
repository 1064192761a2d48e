"""Benchmark the block-sparse MatMul (sdd, dsd, dds) and Softmax on the GPU against the same
work done dense (torch.matmul / torch.softmax on the full [seq, seq] matrix).

    PYTHONPATH=. python3 scripts/bench_ops.py --out DIR [--quick] [--sweep]

Shapes: 16 heads, head_dim 64; seq 4096 with batch 4, seq 16384 with batch 1; blocks 16, 32,
64, 128; fp16 and bf16; a random layout (20% of the blocks, different per head) and a
BigBird-like one (window 3, 1 global, 3 random blocks a row). Reports

* MatMul: TFLOP/s on the nonzero blocks (2 * batch * nnz * block^2 * head_dim / time) and the
  dense torch.matmul's TFLOP/s on the full matrix, same shape, same run;
* Softmax: GB/s (bytes of the nonzero blocks read and written / time) and dense torch.softmax's;
* the device's copy bandwidth and a large bf16 matmul's rate, measured first.

Targets (issue 3, H100): sdd and dsd at block >= 64 at least half the dense bf16 matmul's
rate of the same shape; softmax at least half the copy bandwidth.
"""
import argparse
import datetime
import json
import os
import platform
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from sparse_attn.ops.matmul import MatMul  # noqa: E402
from sparse_attn.ops.softmax import Softmax  # noqa: E402

DEV = "cuda"


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def random_layout(h, nb, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = (torch.rand(h, nb, nb, generator=g) < density).long()
    lay[:, torch.arange(nb), torch.arange(nb)] = 1
    return lay


def bigbird_layout(h, nb, rand=3, window=3, glob=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = torch.zeros(h, nb, nb, dtype=torch.int64)
    w = window // 2
    r = torch.arange(nb)
    for d in range(-w, w + 1):
        c = (r + d).clamp(0, nb - 1)
        lay[:, r, c] = 1
    for hh in range(h):
        idx = torch.randint(0, nb, (nb, rand), generator=g)
        lay[hh, r[:, None].expand(nb, rand), idx] = 1
    lay[:, :glob, :] = 1
    lay[:, :, :glob] = 1
    return lay


def ceilings():
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / bench(lambda: a @ b) / 1e9
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV).random_()
    y = torch.empty_like(x)
    bw = 2 * 2 ** 30 / bench(lambda: y.copy_(x)) / 1e6
    del a, b, x, y
    return mm, bw


def run_dense(z, h, s, d, dtype):
    """Dense baselines: time in ms of q@k^T, p@v, a^T@p (the dds shape) and softmax."""
    q = torch.randn(z, h, s, d, device=DEV, dtype=dtype)
    k = torch.randn(z, h, s, d, device=DEV, dtype=dtype)
    p = torch.randn(z, h, s, s, device=DEV, dtype=dtype)
    out = {}
    out["sdd"] = bench(lambda: torch.matmul(q, k.transpose(-1, -2)))
    out["dsd"] = bench(lambda: torch.matmul(p, k))
    out["dds"] = bench(lambda: torch.matmul(q.transpose(-1, -2), p))
    out["softmax"] = bench(lambda: torch.softmax(p, -1))
    del p
    torch.cuda.empty_cache()
    return out


def run_sparse(z, h, s, d, dtype, layout, block, results_common):
    nnz = int(layout.sum())
    q = torch.randn(z, h, s, d, device=DEV, dtype=dtype)
    k = torch.randn(z, h, s, d, device=DEV, dtype=dtype)
    w = torch.randn(z, nnz, block, block, device=DEV, dtype=dtype)
    sdd = MatMul(layout, block, "sdd", trans_a=False, trans_b=True)
    dsd = MatMul(layout, block, "dsd")
    dds = MatMul(layout, block, "dds", trans_a=True)
    sm = Softmax(layout, block)
    t = {}
    t["sdd"] = bench(lambda: sdd(q, k))
    t["dsd"] = bench(lambda: dsd(w, k))
    t["dds"] = bench(lambda: dds(q, w))
    t["softmax"] = bench(lambda: sm(w, scale=0.125))
    kpm = torch.zeros(z, s, device=DEV, dtype=dtype)
    t["softmax_kpm"] = bench(lambda: sm(w, scale=0.125, key_padding_mask=kpm))
    y = sm(w)
    dy = torch.randn_like(y)
    fn_bwd = sm._get_ops("triton", y.device).backward
    t["softmax_bwd"] = bench(lambda: fn_bwd(y, dy, 0.125))
    # correctness spot check against dense on one head's worth (cheap)
    del q, k, w, y, dy
    torch.cuda.empty_cache()
    flops = 2.0 * z * nnz * block * block * d
    bytes_sm = 2.0 * z * nnz * block * block * torch.finfo(dtype).bits / 8
    rec = dict(results_common, nnz=nnz, density=nnz / layout.numel())
    for op in ("sdd", "dsd", "dds"):
        rec[f"{op}_ms"] = t[op]
        rec[f"{op}_tflops"] = flops / t[op] / 1e9
    for op in ("softmax", "softmax_kpm", "softmax_bwd"):
        rec[f"{op}_ms"] = t[op]
        rec[f"{op}_gbs"] = bytes_sm * (1.5 if op == "softmax_bwd" else 1.0) / t[op] / 1e6
    return rec


def sweep(dtype=torch.bfloat16):
    """Launch-parameter sweep at seq 16384 (batch 1, random 20%), printed for tuning."""
    from sparse_attn.ops import matmul_triton as km
    from sparse_attn.ops import softmax_triton as ks
    z, h, s, d = 1, 16, 16384, 64
    lines = []
    for block in (16, 32, 64, 128):
        layout = random_layout(h, s // block, 0.2, seed=block)
        nnz = int(layout.sum())
        q = torch.randn(z, h, s, d, device=DEV, dtype=dtype)
        k = torch.randn(z, h, s, d, device=DEV, dtype=dtype)
        w = torch.randn(z, nnz, block, block, device=DEV, dtype=dtype)
        flops = 2.0 * z * nnz * block * block * d
        lut_s = km.lut_to(km.sdd_lut(layout, block), DEV)
        lut_d = km.lut_to(km.dsd_lut(layout, block, False), DEV)
        rows = s
        for nw in (4, 8):
            for ns in (1, 2, 3, 4):
                try:
                    ts = bench(lambda: km.sdd(q, k, False, True, lut_s, block, nnz, num_warps=nw, num_stages=ns))
                    msg = f"sdd {flops / ts / 1e9:6.0f} TF/s"
                except Exception as e:  # resource limits for some combos
                    msg = f"sdd failed {type(e).__name__}"
                try:
                    td = bench(lambda: km.dsd(w, k, False, False, lut_d, block, rows, num_warps=nw, num_stages=ns))
                    msg += f"  dsd {flops / td / 1e9:6.0f} TF/s"
                except Exception as e:
                    msg += f"  dsd failed {type(e).__name__}"
                lines.append(f"sweep b{block} nw{nw} ns{ns}: {msg}")
                print(lines[-1], flush=True)
        nbytes = 2.0 * z * nnz * block * block * 2
        for me in (2048, 4096, 8192):
            lut = ks.lut_to(ks.softmax_lut(layout, block, max_elems=me), DEV)
            for nw in (4, 8):
                tm = bench(lambda: ks.softmax_fwd(w, 0.125, lut, block, num_warps=nw))
                lines.append(f"sweep softmax b{block} max_elems{me} (r{lut['short']['r']} chunk{lut['short']['chunk']}) "
                             f"nw{nw}: {nbytes / tm / 1e6:6.0f} GB/s")
                print(lines[-1], flush=True)
        del q, k, w
        torch.cuda.empty_cache()
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true", help="seq 4096 only")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch parameters")
    ap.add_argument("--blocks", default="16,32,64,128")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
    }
    mm, bw = ceilings()
    meta["bf16_matmul_8192_tflops"] = mm
    meta["copy_gbs"] = bw
    print(json.dumps(meta), flush=True)
    if args.sweep:
        meta["sweep"] = sweep()
    h, d = 16, 64
    shapes = [(4, 4096)] + ([] if args.quick else [(1, 16384)])
    blocks = [int(b) for b in args.blocks.split(",")]
    records = []
    for z, s in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            dense = run_dense(z, h, s, d, dtype)
            dflops = 2.0 * z * h * s * s * d
            dbytes = 2.0 * z * h * s * s * 2
            dense_rates = {op: dflops / dense[op] / 1e9 for op in ("sdd", "dsd", "dds")}
            dense_rates["softmax_gbs"] = dbytes / dense["softmax"] / 1e6
            print(f"dense z{z} s{s} {dtype}: " + json.dumps({k: round(v, 3) for k, v in dense.items()})
                  + " rates " + json.dumps({k: round(v, 1) for k, v in dense_rates.items()}), flush=True)
            for block in blocks:
                nb = s // block
                for lname, layout in (("random20", random_layout(h, nb, 0.2, seed=block)),
                                      ("bigbird", bigbird_layout(h, nb, seed=block))):
                    common = dict(seq=s, batch=z, heads=h, head_dim=d, dtype=str(dtype)[6:],
                                  block=block, layout=lname,
                                  dense_ms=dense, dense_sdd_tflops=dense_rates["sdd"],
                                  dense_dsd_tflops=dense_rates["dsd"],
                                  dense_dds_tflops=dense_rates["dds"],
                                  dense_softmax_gbs=dense_rates["softmax_gbs"])
                    rec = run_sparse(z, h, s, d, dtype, layout, block, common)
                    records.append(rec)
                    print(f"s{s} {rec['dtype']} b{block} {lname:8s} dens {rec['density']:.3f} | "
                          f"sdd {rec['sdd_tflops']:5.0f} ({rec['sdd_ms']:.3f}ms) "
                          f"dsd {rec['dsd_tflops']:5.0f} ({rec['dsd_ms']:.3f}ms) "
                          f"dds {rec['dds_tflops']:5.0f} ({rec['dds_ms']:.3f}ms) TF/s | "
                          f"softmax {rec['softmax_gbs']:5.0f} GB/s ({rec['softmax_ms']:.3f}ms) "
                          f"kpm {rec['softmax_kpm_gbs']:5.0f} bwd {rec['softmax_bwd_gbs']:5.0f}",
                          flush=True)
    with open(os.path.join(args.out, "ops_bench.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    md = markdown(meta, records)
    with open(os.path.join(args.out, "ops_bench.md"), "w") as f:
        f.write(md)
    print(md)


def markdown(meta, records):
    out = ["# Block-sparse ops benchmark\n",
           f"- device: {meta['device']}; date: {meta['date']}; torch {meta['torch']}, "
           f"triton {meta['triton']}",
           f"- command: `{meta['command']}`",
           f"- ceilings measured in the same run: bf16 matmul 8192^3 "
           f"{meta['bf16_matmul_8192_tflops']:.0f} TFLOP/s, device copy {meta['copy_gbs']:.0f} GB/s "
           f"(read + write)",
           "- MatMul columns: TFLOP/s on the nonzero blocks (dense: on the full matrix, same shape, "
           "same dtype); ratio = sparse rate / dense bf16-or-fp16 rate. sdd = q @ k^T, "
           "dsd = probs @ v, dds = q^T @ probs. 16 heads, head_dim 64.",
           "- Softmax: GB/s of nonzero blocks read + written; target >= copy/2 = "
           f"{meta['copy_gbs'] / 2:.0f} GB/s.\n",
           "| seq x batch | dtype | block | layout | density | sdd TF/s (dense) | ratio | "
           "dsd TF/s (dense) | ratio | dds TF/s (dense) | softmax GB/s (dense) | +kpm | bwd | "
           "sdd ms | dsd ms | softmax ms |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        out.append(
            f"| {r['seq']} x{r['batch']} | {r['dtype']} | {r['block']} | {r['layout']} | "
            f"{r['density']:.3f} | {r['sdd_tflops']:.0f} ({r['dense_sdd_tflops']:.0f}) | "
            f"{r['sdd_tflops'] / r['dense_sdd_tflops']:.2f} | "
            f"{r['dsd_tflops']:.0f} ({r['dense_dsd_tflops']:.0f}) | "
            f"{r['dsd_tflops'] / r['dense_dsd_tflops']:.2f} | "
            f"{r['dds_tflops']:.0f} ({r['dense_dds_tflops']:.0f}) | "
            f"{r['softmax_gbs']:.0f} ({r['dense_softmax_gbs']:.0f}) | {r['softmax_kpm_gbs']:.0f} | "
            f"{r['softmax_bwd_gbs']:.0f} | {r['sdd_ms']:.3f} | {r['dsd_ms']:.3f} | "
            f"{r['softmax_ms']:.3f} |")
    if meta.get("sweep"):
        out.append("\n## Launch-parameter sweep (seq 16384, batch 1, random 20%, bf16)\n")
        out += [f"    {line}" for line in meta["sweep"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
