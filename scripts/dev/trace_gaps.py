"""Where the GPU waited in a profiled step: the gaps between kernels of a PyTorch profiler
Chrome trace (``scripts/bench_bing_bert.py --profile --trace DIR`` writes one per row), each
with what the host was doing when the GPU ran out of work and which host op launched the next
kernel.

    python3 scripts/dev/trace_gaps.py out/trace/base_4096_x32_bigbird64.json.gz --top 20

A gap that begins while the host sits in a synchronizing CUDA call (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, a blocking ``cudaMemcpy``, ``cudaFree``) is a drain: the GPU
finished what it had and waited for the host's next launch. A gap with no such call is the
host launching more slowly than the GPU runs.
"""
import argparse
import bisect
import collections
import gzip
import json
import sys
from typing import Dict, List, NamedTuple, Optional

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
PHASE_PREFIX = "bench_bing_bert::"
WAITS = ("Synchronize", "cudaMemcpy", "cudaFree", "cudaMalloc", "cudaEventQuery",
         "cudaHostAlloc")


class Span(NamedTuple):
    start: float
    end: float
    name: str
    tid: object = None
    correlation: Optional[int] = None


class Gap(NamedTuple):
    start: float       # us, the trace's clock
    length: float      # us
    phase: str         # the bench phase running on the host when it began ("other": none)
    host_call: str     # the CUDA runtime call the host was in when it began ("" if none)
    host_ops: List[str]  # innermost CPU op of each host thread at its start
    next_kernel: str
    launched_by: str   # the innermost CPU op around the next kernel's launch ("?" unknown)


def load(path: str) -> list:
    """The trace's events (``traceEvents``) from a Chrome trace, gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def spans(events: list, cats) -> List[Span]:
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in cats:
            start = float(e["ts"])
            out.append(Span(start, start + float(e.get("dur", 0)), e.get("name", "?"),
                            e.get("tid"), (e.get("args") or {}).get("correlation")))
    return sorted(out)


class Index:
    """Spans (sorted by start) to ask which contain a time: the few long ones are scanned
    whole, the short ones only back to their longest length before it."""

    def __init__(self, items: List[Span], long_us: float = 1000.0):
        self.long = [s for s in items if s.end - s.start > long_us]
        self.short = [s for s in items if s.end - s.start <= long_us]
        self.starts = [s.start for s in self.short]
        self.reach = long_us

    def covering(self, t: float) -> List[Span]:
        """The spans that contain ``t``, outermost first."""
        lo = bisect.bisect_left(self.starts, t - self.reach)
        hi = bisect.bisect_right(self.starts, t)
        hits = [s for s in self.long if s.start <= t < s.end]
        hits += [s for s in self.short[lo:hi] if s.end > t]
        return sorted(hits, key=lambda s: (s.start, -s.end))


def innermost_by_thread(ops: Index, t: float) -> Dict[object, Span]:
    out: Dict[object, Span] = {}
    for s in ops.covering(t):
        out[s.tid] = s  # later (inner) spans replace outer ones
    return out


def busy_time(gpu: List[Span]) -> float:
    """How long at least one of the (sorted) GPU spans ran, us."""
    busy, start, end = 0.0, None, None
    for s in gpu:
        if end is None or s.start > end:
            busy += 0.0 if end is None else end - start
            start, end = s.start, s.end
        else:
            end = max(end, s.end)
    return busy + (0.0 if end is None else end - start)


def find_gaps(events: list, min_us: float = 0.0) -> List[Gap]:
    """Every gap of at least ``min_us`` between the first and the last GPU activity (kernels,
    copies, memsets on any stream), in time order."""
    gpu = spans(events, GPU_CATS)
    ops = Index(spans(events, ("cpu_op",)))
    phases = Index([s for s in spans(events, ("user_annotation", "cpu_op"))
                    if s.name.startswith(PHASE_PREFIX)])
    runtime_spans = spans(events, ("cuda_runtime", "cuda_driver", "runtime", "driver"))
    runtime = Index(runtime_spans)
    launch_at = {s.correlation: s for s in runtime_spans if s.correlation is not None}
    gaps: List[Gap] = []
    if not gpu:
        return gaps
    busy_until = gpu[0].end
    for k in gpu[1:]:
        if k.start - busy_until >= max(min_us, 1e-9):
            t = busy_until
            phase = next((p.name[len(PHASE_PREFIX):] for p in phases.covering(t)), "other")
            calls = [c.name for c in runtime.covering(t) if any(w in c.name for w in WAITS)]
            inner = innermost_by_thread(ops, t)
            launch = launch_at.get(k.correlation)
            launched_by = "?"
            if launch is not None:
                around = [s for s in ops.covering(launch.start) if s.tid == launch.tid]
                launched_by = around[-1].name if around else launch.name
            gaps.append(Gap(t, k.start - t, phase, calls[-1] if calls else "",
                            [s.name for s in inner.values()], k.name, launched_by))
        busy_until = max(busy_until, k.end)
    return gaps


def summarize(gaps: List[Gap], key) -> List[tuple]:
    """``[(key, total us, count)]`` of the gaps, the largest total first."""
    total: Dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for g in gaps:
        entry = total[key(g)]
        entry[0] += g.length
        entry[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in total.items()), key=lambda x: -x[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a Chrome trace (.json or .json.gz)")
    p.add_argument("--top", type=int, default=15, help="the longest gaps to list (default 15)")
    p.add_argument("--min-us", type=float, default=5.0,
                   help="ignore gaps shorter than this (default 5 us)")
    args = p.parse_args(argv)
    events = load(args.trace)
    gpu = spans(events, GPU_CATS)
    if not gpu:
        print(f"error: {args.trace} holds no kernel (a CPU-only profile?)", file=sys.stderr)
        return 2
    gaps = find_gaps(events, args.min_us)
    window = gpu[-1].end - gpu[0].start
    busy = busy_time(gpu)
    print(f"{args.trace}: {window / 1e3:.2f} ms from the first to the last GPU activity, "
          f"{busy / 1e3:.2f} busy; {len(gaps)} gaps >= {args.min_us:g} us, "
          f"{sum(g.length for g in gaps) / 1e3:.2f} ms")
    for title, key in (("by host phase", lambda g: g.phase),
                       ("by the host's CUDA call when the GPU ran dry", lambda g: g.host_call
                        or "(none: launching)"),
                       ("by the op that launched the next kernel", lambda g: g.launched_by)):
        print(f"\n{title}:")
        for name, us, n in summarize(gaps, key)[:12]:
            print(f"  {us / 1e3:8.2f} ms {n:6d}  {name}")
    print(f"\nthe {args.top} longest (ms after the first kernel, us):")
    for g in sorted(gaps, key=lambda g: -g.length)[:args.top]:
        print(f"  {(g.start - gpu[0].start) / 1e3:9.3f} {g.length:9.1f}  {g.phase:8s} "
              f"{g.host_call or '-':24s} next {g.next_kernel[:48]} <- {g.launched_by[:40]}; "
              f"host in {', '.join(o[:40] for o in g.host_ops) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
