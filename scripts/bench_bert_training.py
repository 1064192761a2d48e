"""Training step time and peak memory of BERT-base masked LM (batch 1) at long sequences:
block-sparse attention (BigBird and Fixed layouts, block 64) vs dense SDPA vs Hugging Face
``BigBirdForMaskedLM`` (``attention_type="block_sparse"``, block 64, 3 random blocks).

    python scripts/bench_bert_training.py                      # GPU: seq 4096 16384 65536
    python scripts/bench_bert_training.py --seqs 4096 --out out/bench_bert.json
    python scripts/bench_bert_training.py --device cpu --tiny   # smoke test of the script
    python scripts/bench_bert_training.py --seqs 4096 16384 --compile reduce-overhead

One training step = forward of the encoder, MLM head and loss at the masked positions (15%,
as bing_bert's sparse prediction: the decoder never runs on unmasked tokens), backward, and
an AdamW step; all variants in bf16 weights (fp32 on CPU), no attention-probability dropout
(the block-sparse kernels never form the probabilities), hidden dropout 0.1. At each length
every variant is built and warmed up (``--warmup`` steps), then the variants are timed in
``--rounds`` interleaved rounds of ``--steps`` steps (CUDA events), so a noisy host slows all
of them alike; the step time is the median over every timed step. Peak memory is the
variant's own ``torch.cuda.max_memory_allocated`` over one step, less what was allocated
before it was built. A variant that runs out of
memory is reported as OOM. The table ends with the targets of the issue: at 16384 sparse
>= 3x faster than dense SDPA, at 65536 >= 8x, at 4096 no slower than dense.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = ("dense_sdpa", "sparse_bigbird", "sparse_fixed", "hf_bigbird")
_VARIANT = re.compile(r"^(%s)(\d+)?$" % "|".join(VARIANTS))


def variant(text):
    """A ``--variants`` entry: a name of ``VARIANTS``, optionally with its own block size
    (``sparse_fixed16``, ``sparse_fixed64``: both in one run, side by side)."""
    m = _VARIANT.match(text)
    if m is None or (m.group(2) and m.group(1) == "dense_sdpa"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: one of {', '.join(VARIANTS)}, the sparse ones optionally followed by a "
            "block size (sparse_fixed16)")
    return text


def split_variant(kind, default_block):
    """``(base name, block)`` of a variant string."""
    m = _VARIANT.match(kind)
    return m.group(1), int(m.group(2)) if m.group(2) else default_block
TARGETS = {4096: 1.0, 16384: 3.0, 65536: 8.0}


def bert_kwargs(args, seq):
    return dict(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                max_position_embeddings=seq, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.0)


def sparsity_config(kind, heads, block):
    from sparse_attn import BigBirdSparsityConfig, FixedSparsityConfig

    if kind == "sparse_bigbird":
        return BigBirdSparsityConfig(num_heads=heads, block=block, different_layout_per_head=True,
                                     num_random_blocks=3, num_sliding_window_blocks=3,
                                     num_global_blocks=1)
    # the DeepSpeed tutorial's Fixed block
    return FixedSparsityConfig(num_heads=heads, block=block, different_layout_per_head=True,
                               num_local_blocks=4, num_global_blocks=1,
                               attention="bidirectional", horizontal_global_attention=False,
                               num_different_global_patterns=4)


def build(kind, args, seq):
    """(model, encoder, mlm_head, description)."""
    import transformers

    kind, block = split_variant(kind, args.block)

    if kind == "hf_bigbird":
        cfg = transformers.BigBirdConfig(attention_type="block_sparse", block_size=block,
                                         num_random_blocks=3, **bert_kwargs(args, seq))
        model = transformers.BigBirdForMaskedLM(cfg)
        return model, model.bert, model.cls, "HF BigBirdForMaskedLM block_sparse"
    cfg = transformers.BertConfig(**bert_kwargs(args, seq))
    model = transformers.BertForMaskedLM(cfg)
    if kind == "dense_sdpa":
        model.set_attn_implementation("sdpa")
        return model, model.bert, model.cls, "dense SDPA"
    from sparse_attn import hf

    sc = sparsity_config(kind, args.heads, block)
    hf.enable_sparse_attention(model, sc, max_seq_length=seq)
    density = float(sc.make_layout(seq).float().mean())
    return model, model.bert, model.cls, f"{kind} block {block} (density {density:.1%})"


def make_runner(kind, args, seq, device, dtype):
    """A warmed-up training step of ``kind`` at ``seq``: {"step", "desc", "peak_gib"}. The
    peak is this variant's own (allocated at its peak minus what was allocated before it
    was built, so variants built earlier and still alive do not count)."""
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    model, encoder, head, desc = build(kind, args, seq)
    model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = split_variant(kind, args.block)[0] in args.compile_variants
    if args.compile != "none" and not kind.startswith("hf_bigbird") and compiled:
        # the encoder only: the MLM head sees a data-dependent gather of masked positions
        name = "reduce-overhead" if args.compile == "graphs" else args.compile
        encoder = torch.compile(encoder, mode=None if name == "default" else name)
        desc += f", torch.compile({name})"
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 30522, (1, seq), generator=g).to(device)
    # no padding mask: a [batch, seq] mask of ones may make transformers build a 4-D mask for
    # SDPA (seq^2 memory, no flash kernel); without one every variant runs its fast path
    attention_mask = None
    n_masked = max(1, int(0.15 * seq))
    positions = torch.randperm(seq, generator=g)[:n_masked].to(device)
    labels = torch.randint(5, 30522, (n_masked,), generator=g).to(device)

    graphs = args.compile in ("reduce-overhead", "graphs") and not kind.startswith("hf_bigbird")

    def step():
        if graphs:  # a new iteration for CUDA-graph trees (variants are interleaved)
            torch.compiler.cudagraph_mark_step_begin()
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        scores = head(hidden[0, positions])
        loss = torch.nn.functional.cross_entropy(scores.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    peak = float("nan")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return {"step": step, "desc": desc, "peak_gib": peak}


def time_steps(step, n, cuda):
    """Wall time of each of ``n`` steps, ms (CUDA events around each step on a GPU)."""
    times, loss = [], None
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, loss


def run_seq(args, seq, device, dtype):
    """Every variant at ``seq``. The variants are built first, then timed in interleaved
    rounds (``--rounds``, ``--steps`` steps each), so that a noisy host slows all of them
    alike; the median over every timed step is reported."""
    runners, results = {}, {}
    if args.compile == "reduce-overhead":
        # CUDA-graph trees do not take several models' graphs interleaved: one at a time
        out = []
        for kind in args.variants:
            mode = "graphs" if split_variant(kind, args.block)[0] in args.compile_variants \
                else "none"
            sub = argparse.Namespace(**{**vars(args), "variants": [kind], "compile": mode})
            out += run_seq(sub, seq, device, dtype)
        return out
    for kind in args.variants:
        try:
            runners[kind] = make_runner(kind, args, seq, device, dtype)
        except torch.cuda.OutOfMemoryError:
            results[kind] = {"error": "OOM"}
        except Exception as err:  # report and go on with the other variants
            results[kind] = {"error": f"{type(err).__name__}: {err}"[:300]}
        free(device)
    times = {kind: [] for kind in runners}
    losses = {}
    for _ in range(args.rounds):
        for kind, r in list(runners.items()):
            try:
                t, loss = time_steps(r["step"], args.steps, device.type == "cuda")
            except Exception as err:  # report and go on with the other variants
                results[kind] = {"error": f"{type(err).__name__}: {err}"[:300]}
                del runners[kind]
                continue
            times[kind] += t
            losses[kind] = float(loss.detach())
    out = []
    for kind in args.variants:
        if kind in runners:
            r = runners[kind]
            res = {"variant": kind, "seq": seq, "desc": r["desc"],
                   "step_ms": statistics.median(times[kind]), "step_ms_all": times[kind],
                   "peak_gib": r["peak_gib"], "loss": losses[kind]}
        else:
            res = {"variant": kind, "seq": seq, "desc": kind, "step_ms": math.nan,
                   "peak_gib": math.nan, **results[kind]}
        out.append(res)
    runners.clear()
    free(device)
    return out


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), type=variant,
                   help="of %(default)s; a sparse one may name its block (sparse_fixed16 "
                        "sparse_fixed64: both blocks side by side); default block: --block")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=4,
                   help="interleaved timing rounds over the variants")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer, hidden-64 model at short lengths: checks the script runs")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--compile", default="none",
                   choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile the encoder of the dense and sparse variants (the sparse "
                        "op is a custom op: no graph break); HF BigBird stays eager")
    p.add_argument("--compile-variants", nargs="+", default=None, choices=VARIANTS,
                   help="with --compile: compile only these (the rest run eager in the same "
                        "run, e.g. an eager dense baseline); default: all but hf_bigbird")
    p.add_argument("--split-min", type=int, default=None,
                   help="fused kernel: rows of up to this many tiles are not split "
                        "(sparse_attn.ops.fused.set_fused_config(split_min=...))")
    p.add_argument("--tma", choices=("auto", "on", "off"), default="auto",
                   help="fused kernel on GPUs that have TMA: the library's default (TMA "
                        "descriptors for large launches and CUDA-graph captures), or forced "
                        "on or off (set_fused_config(tma=True / False)); the same results")
    args = p.parse_args(argv)
    if args.compile_variants is None:
        args.compile_variants = [v for v in VARIANTS if v != "hf_bigbird"]
    if args.compile != "none":
        args.warmup = max(args.warmup, 3)  # compile, then CUDA-graph warm-up and recording
    if args.split_min is not None or args.tma != "auto":
        from sparse_attn.ops.fused import set_fused_config

        set_fused_config(split_min=args.split_min,
                         tma={"auto": None, "on": True, "off": False}[args.tma])
    if args.tiny:
        args.hidden, args.layers, args.heads = 64, 2, 2
        if args.seqs == [4096, 16384, 65536]:
            args.seqs = [1024]
        args.warmup, args.steps, args.rounds = 1, 2, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "dtype": str(dtype)}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "PYTHONPATH=. python3 " + " ".join(
        ["scripts/bench_bert_training.py"] + list(sys.argv[1:] if argv is None else argv))
    try:
        import transformers
        import triton

        env.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    print(f"# BERT MLM training step, batch 1, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads; {env}", flush=True)
    results = []
    for seq in args.seqs:
        for r in run_seq(args, seq, device, dtype):
            results.append(r)
            shown = r.get("error") or f"{r['step_ms']:.1f} ms, peak {r['peak_gib']:.2f} GiB"
            print(f"seq {seq:6d} {r['desc']:<48} {shown}", flush=True)

    print("\n| seq | " + " | ".join(args.variants) + " |")
    print("| --- |" + " --- |" * len(args.variants))
    for seq in args.seqs:
        cells = []
        for kind in args.variants:
            r = next(x for x in results if x["seq"] == seq and x["variant"] == kind)
            cells.append(r.get("error", f"{r['step_ms']:.1f} ms / {r['peak_gib']:.2f} GiB"))
        print(f"| {seq} | " + " | ".join(cells) + " |")
    verdicts = []
    for seq in args.seqs:
        dense = next((x for x in results if x["seq"] == seq and x["variant"] == "dense_sdpa"),
                     None)
        for kind in (v for v in args.variants if v.startswith("sparse_")):
            sp = next((x for x in results if x["seq"] == seq and x["variant"] == kind), None)
            if dense is None or sp is None or seq not in TARGETS:
                continue
            if "error" in sp:
                verdicts.append(f"{kind} at {seq}: {sp['error']}")
                continue
            if "error" in dense:
                verdicts.append(f"{kind} at {seq}: dense {dense['error']} (sparse runs)")
                continue
            speedup = dense["step_ms"] / sp["step_ms"]
            ok = speedup >= TARGETS[seq]
            verdicts.append(f"{kind} at {seq}: {speedup:.2f}x dense SDPA (target >= "
                            f"{TARGETS[seq]:g}x) {'PASS' if ok else 'FAIL'}")
    if verdicts:
        print("\n" + "\n".join(verdicts))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        data = {"env": env, "date": started, "command": command, "args": vars(args),
                "results": results, "verdicts": verdicts}
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)
        write_markdown(os.path.splitext(args.out)[0] + ".md", data)
    return 0


def write_markdown(path, data):
    """The run as a Markdown record: device, date, versions, command, the table, verdicts."""
    env, a, results = data["env"], data["args"], data["results"]
    seqs = list(dict.fromkeys(r["seq"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    cell = {(r["seq"], r["variant"]): r for r in results}
    timer = " (CUDA events)" if env["device"] != "cpu" else ""
    versions = "; ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers") if k in env)
    md = [f"# BERT masked-LM training step ({env['device']})", "",
          f"Date {data.get('date', '?')}; {versions}; {env['dtype']}.", "",
          "Command, run from the repository root:", "",
          f"    {data.get('command', '?')}", ""]
    if data.get("command_note"):
        md += [data["command_note"], ""]
    named = any(split_variant(v, 0)[1] for v in variants)
    block = "blocks as the variants name them" if named else f"block {a['block']}"
    md += [f"Batch 1, {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads, {block}, "
           f"AdamW; step time in ms: the median over {a['rounds']} interleaved "
           f"rounds of {a['steps']} steps{timer} after {a['warmup']} warm-up steps; peak "
           "GiB: the variant's own `max_memory_allocated` over one step; the variants as in "
           "the docstring of `scripts/bench_bert_training.py`."]
    dens = {}
    for v in variants:
        found = [re.search(r"density ([\d.]+%)", cell[(s_, v)]["desc"]) for s_ in seqs
                 if (s_, v) in cell]
        if len(found) == len(seqs) and all(found):
            dens[v] = [m.group(1) for m in found]
    if dens:
        md[-1] += " Layout density at seq " + " / ".join(map(str, seqs)) + ": " + "; ".join(
            f"{v} {' / '.join(d)}" for v, d in dens.items()) + "."
    if a.get("compile", "none") != "none":
        md[-1] += (f" Compiled: the encoder of {', '.join(a['compile_variants'])} under "
                   f"`torch.compile(mode=\"{a['compile']}\")`; the other variants eager in the "
                   "same run.")
        if a["compile"] == "reduce-overhead":
            md[-1] += (" Peak memory under reduce-overhead is measured after the CUDA graphs "
                       "were recorded (and after the other variants ran in the same process); "
                       "it is not comparable with eager peaks and is not claimed.")
    md += ["", "| seq | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
    for s_ in seqs:
        md.append(f"| {s_} | " + " | ".join(
            cell[(s_, v)].get("error", f"{cell[(s_, v)]['step_ms']:.1f} ms / "
                                       f"{cell[(s_, v)]['peak_gib']:.2f} GiB")
            for v in variants) + " |")
    if data.get("verdicts"):
        md += ["", "Sparse against dense SDPA (step time), with the targets of the issue:", ""]
        md += [f"- {v}" for v in data["verdicts"]]
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
