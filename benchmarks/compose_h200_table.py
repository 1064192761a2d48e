"""Builds attention_h200.md / .json from the four H200 runs of 2026-11-29 (19:32-19:50 UTC).

Two work-item rules were measured that evening: a third (runs h200_4096, h200_16384b,
h200_16384c, h200_16384d, with FlexAttention) and then a quarter (run h200_rule4, the rule
in the package, without FlexAttention: no device time was left for its BlockMask builds) of
the tiles per SM. The two rules cut the same work items, so launch the same kernels with
the same arguments, on every row but six: BigBird 16 and 32 at 4096 x4 and BigBird 16, 32,
64 and 128 at 16384 (checked by building both rules' tables for 132 SMs). Five of them come
from h200_rule4; BigBird 32 at 4096 x4 was not in that run: its forward and dq items are the
same under both rules, its dk/dv items are not (the quarter rule cuts the 16 global columns
of 128 tiles in two), so its fwd+bwd column is the third-rule run's. Every other row comes
from the runs with Flex. Flex does not depend on the rule, so the Flex times of the five
rows are in the other runs' files (attention_h200_4096, attention_h200_16384b/c/d).

    python benchmarks/compose_h200_table.py
"""
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
import bench_attention as BA  # noqa: E402

CHANGED = {(4096, "bigbird", 16), (16384, "bigbird", 16), (16384, "bigbird", 32),
           (16384, "bigbird", 64), (16384, "bigbird", 128)}
ORDER = [(name, blk) for name in ("bigbird", "fixed") for blk in (16, 32, 64, 128)]


def load(tag):
    with open(os.path.join(HERE, f"attention_{tag}.json")) as f:
        return json.load(f)


def main():
    runs = [load(t) for t in ("h200_4096", "h200_rule4", "h200_16384d", "h200_16384c",
                              "h200_16384b")]
    rule4 = runs[1]
    key = lambda r: (r["seq"], r["layout"], r["block"])  # noqa: E731
    rows = {}
    for run in runs:
        for r in run["rows"]:
            if (run is rule4) == (key(r) in CHANGED):
                rows[key(r)] = r
    ordered = [rows[(n, name, blk)] for n in (4096, 16384) for name, blk in ORDER]
    meta = dict(runs[0]["meta"])
    meta["command"] = [run["meta"]["command"] for run in runs]
    meta["date"] = ", ".join(run["meta"]["date"] for run in runs)
    meta["note"] = (
        "Rows BigBird 16 at 4096 x4 and BigBird 16/32/64/128 at 16384 come from the second "
        "command (the package's work-item rule, no FlexAttention: Flex columns '-', T1 n/a); "
        "the others from the runs with Flex, whose rule cut the same work items for them, "
        "except the dk/dv items of 4096 BigBird 32 (its fwd+bwd is the earlier rule's). "
        "Flex on the five rows, from those runs (fwd / fwd+bwd ms): 4096 BigBird 16 "
        "2.509 / 4.281; 16384 BigBird 16 3.753 / 6.188, 32 3.049 / 4.958, 64 2.570 / 4.156, "
        "128 0.405 / 1.226. benchmarks/compose_h200_table.py builds this table.")
    memory = next(run["memory"] for run in runs if "memory" in run)
    BA.write_outputs(dict(meta=meta, rows=ordered, memory=memory),
                     types.SimpleNamespace(outdir=HERE, tag="h200"), echo=False)


if __name__ == "__main__":
    main()
