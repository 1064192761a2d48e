"""Builds attention_h200.md / .json from the H200 runs of 2026-11-30, 01:07-01:12 UTC, with
the shipped kernels: TMA where the library's default takes it (large launches and CUDA-graph
captures, so every "GPU time" row), forward tiles 64 x 64 with 2 stages for blocks 64 and
128, work records that carry their first key tile, work items of at most 1.2 S tiles, and
split rows merged inside the forward kernel (no merge launch).

- 4096 x4 rows: run h200_merge_4096, with FlexAttention, all eight rows in one run.
- 16384 rows: run h200_merge_16384, without FlexAttention: its BlockMask builds for the fine
  16384 layouts take minutes each. Their Flex times, from the runs of the same card on
  2026-11-29 (attention_h200_16384b/c/d: Flex does not depend on our kernels), are quoted in
  the table's note; T1 on those rows is read against them, not in the table.
- The memory rows (target 4) come from h200_16384b (2026-11-29): descriptors live on the
  host; the forward's only new allocation since is an int32 counter per split row and batch.

The earlier tables stay as records: attention_h200_4096, _rule4, _16384b/c/d (before TMA);
attention_h200_tma_* (TMA at every launch, the previous forward tiles); attention_h200_auto_*
(before the first-tile records, 2026-11-29 22:13-22:21 UTC); attention_h200_first_* (before
the in-kernel merge, 23:51-23:55 UTC).

    python benchmarks/compose_h200_table.py
"""
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
import bench_attention as BA  # noqa: E402

ORDER = [(name, blk) for name in ("bigbird", "fixed") for blk in (16, 32, 64, 128)]


def load(tag):
    with open(os.path.join(HERE, f"attention_{tag}.json")) as f:
        return json.load(f)


def main():
    runs = [load(t) for t in ("h200_merge_4096", "h200_merge_16384")]
    key = lambda r: (r["seq"], r["layout"], r["block"])  # noqa: E731
    rows = {key(r): r for run in runs for r in run["rows"]}
    ordered = [rows[(n, name, blk)] for n in (4096, 16384) for name, blk in ORDER]
    flex = {key(r): r["ms"] for t in ("h200_16384b", "h200_16384c", "h200_16384d")
            for r in load(t)["rows"] if "flex_fwd" in r["ms"]}
    quoted = "; ".join(
        f"{name} {blk}: Flex {flex[(16384, name, blk)]['flex_fwd']:.3f} / "
        f"{flex[(16384, name, blk)]['flex_fb']:.3f}, fused (this table, eager) "
        f"{rows[(16384, name, blk)]['ms']['fused_fwd']:.3f} / "
        f"{rows[(16384, name, blk)]['ms']['fused_fb']:.3f}"
        for name, blk in ORDER)
    meta = dict(runs[0]["meta"])
    meta["command"] = [run["meta"]["command"] for run in runs]
    meta["date"] = ", ".join(run["meta"]["date"] for run in runs)
    meta["note"] = (
        "4096 x4 rows: the first command (with FlexAttention). 16384 rows: the second "
        "command, without FlexAttention (Flex columns '-', T1 n/a in the table). Flex at "
        "16384 from the runs of this card on 2026-11-29 (attention_h200_16384b/c/d), "
        "fwd / fwd+bwd ms, beside this table's fused eager times: " + quoted + ". "
        "Memory rows from attention_h200_16384b. benchmarks/compose_h200_table.py builds "
        "this table.")
    memory = load("h200_16384b")["memory"]
    BA.write_outputs(dict(meta=meta, rows=ordered, memory=memory),
                     types.SimpleNamespace(outdir=HERE, tag="h200"), echo=False)


if __name__ == "__main__":
    main()
