"""Check a multi-GPU run of the bing_bert example (gpu_check.sh stage ``multigpu``).

    python scripts/dev/check_two_gpu_run.py --log train.log --metrics metrics.jsonl \
        [--resumed-log resumed.log --resumed-metrics resumed.jsonl] --world 2 --out summary.json

Reads the launcher's log (all ranks share its stdout) and the metrics the example wrote, and
checks: every rank printed its layout checksum and they are all the same, the launcher's
cross-rank comparison ran, the loss is finite and falls, and (given a resumed run) the resumed
steps reproduce the uninterrupted run's losses. Prints a summary, writes it as JSON and exits
1 when a check fails.
"""
import argparse
import json
import math
import re
import sys


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--resumed-log")
    p.add_argument("--resumed-metrics")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--resume-tol", type=float, default=2e-2,
                   help="largest |loss difference| allowed between resumed and original steps")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    log = open(args.log, errors="replace").read()
    found = re.findall(r"rank (\d+)/(\d+): sparse attention: (.*?); transformer kernel (\w+)", log)
    checks, summary = {}, {"world": args.world}
    summary["ranks"] = {int(r): {"describe": d, "transformer_kernel": tk} for r, _, d, tk in found}
    sums = {int(r): re.search(r"layout (\S+)", d).group(1) for r, _, d, _ in found
            if "layout " in d}
    summary["layout_checksums"] = sums
    checks["every rank reported a layout"] = sorted(sums) == list(range(args.world))
    checks["same layout on every rank"] = len(set(sums.values())) == 1
    checks["cross-rank comparison ran"] = f"same on all {args.world} ranks" in log
    checks["transformer kernel off"] = all(v["transformer_kernel"] == "off"
                                           for v in summary["ranks"].values())

    records = read_metrics(args.metrics)
    rows = [r for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    losses = [r["loss"] for r in rows]
    summary["steps"] = rows[-1]["step"] if rows else 0
    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    summary.update(first_loss_avg=first, last_loss_avg=last, evals=evals,
                   tokens_per_s=[r.get("tokens_per_s") for r in rows[-3:]])
    checks["loss finite"] = all(math.isfinite(x) for x in losses) and bool(losses)
    checks["loss falls"] = last < first - 0.5

    if args.resumed_metrics:
        original = {r["step"]: r["loss"] for r in rows}
        resumed = [r for r in read_metrics(args.resumed_metrics) if "loss" in r]
        diffs = {r["step"]: r["loss"] - original[r["step"]] for r in resumed
                 if r["step"] in original}
        summary["resume_loss_differences"] = diffs
        checks["resumed run logged its steps"] = bool(diffs)
        checks["resumed losses match"] = bool(diffs) and all(
            abs(d) <= args.resume_tol for d in diffs.values())
        if args.resumed_log:
            checks["resumed from a checkpoint"] = "resumed from" in open(
                args.resumed_log, errors="replace").read()

    summary["checks"] = checks
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
