"""Host work of one bing_bert training step, counted in PyTorch ops: how many top-level ATen
ops each phase (forward, backward, optimizer step) of the example's DeepSpeed step issues,
and how many of them make the host wait for the device (``aten::is_nonzero``, ``item``,
``_local_scalar_dense``: a tensor's truth value or number read on the host).

On a GPU each op is at least one launch (5-10 us of host time) and each wait drains the
GPU's queue, so these counts are the step's host cost with no GPU needed:

    DS_ACCELERATOR=cpu python scripts/dev/step_ops.py            # BERT-base, seq 256, batch 1

It runs the example's model and engine through ``scripts/bench_bing_bert.py``'s ``Runner``, on
the config's bf16 (DeepSpeed wraps the optimizer at ZeRO stage 0), with ``--lamb master`` (the
example's LAMB keeps the float32 master weights, no wrapper) and with ``--autocast``
(DeepSpeed's ``torch_autocast``, the optimizer unwrapped). On CPU the sparse variants run the
PyTorch backend, so their forward and backward counts are not the GPU's; the step's are.
"""
import argparse
import collections
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_bing_bert as bbb  # noqa: E402

WAITS = ("aten::is_nonzero", "aten::item", "aten::_local_scalar_dense")


def top_level_ops(events):
    """``(phase, name)`` of every ATen op not called from inside another ATen op."""
    phases = [(e.name[len(bbb.PHASE_PREFIX):], e.time_range.start, e.time_range.end)
              for e in events if e.name.startswith(bbb.PHASE_PREFIX)]
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            yield next((n for n, a, b in phases if a <= e.time_range.start < b), "other"), e.name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--model", default="base", choices=("base", "large", "tiny"))
    p.add_argument("--variants", nargs="+", default=["dense", "bigbird64"],
                   choices=list(bbb.VARIANTS))
    args = p.parse_args(argv)
    device = torch.device("cpu")
    dt, modeling = bbb.load_example()
    print(f"{args.model}, seq {args.seq}, batch {args.batch}: top-level ATen ops per step "
          f"(host waits in brackets)")
    for precision, flags in (("config bf16", ["--lamb", "torch"]),
                             ("--lamb master", ["--lamb", "master"]),
                             ("torch_autocast", ["--lamb", "torch", "--autocast"])):
        opts = bbb.parse_args(["--models", args.model, "--seqs", str(args.seq), "--device", "cpu"]
                              + flags)
        opts.fp32 = False  # the config's bf16, as on a GPU
        for variant in args.variants:
            runner = bbb.Runner(opts, dt, modeling, args.model, variant, args.seq, device,
                                tempfile.mkdtemp(prefix="step_ops_"))
            batch = bbb.make_batch(args.batch, args.seq, runner.vocab, device, 0)
            runner.warm_up(batch, 2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.step(batch)
            ops, waits = collections.Counter(), collections.Counter()
            for phase, name in top_level_ops(prof.events()):
                ops[phase] += 1
                waits[phase] += name in WAITS
            counts = ", ".join(f"{ph} {ops[ph]} ({waits[ph]})"
                               for ph in (*bbb.PHASES, "other") if ops[ph])
            print(f"{precision:<15} {variant:<10} {runner.optimizer:<28} {counts}", flush=True)
            runner.close()


if __name__ == "__main__":
    main()
