"""Render the README's speed tables from the result files in benchmarks/.

    python3 scripts/render_results.py             # print the tables (Markdown)
    python3 scripts/render_results.py --write     # replace them in README.md
    python3 scripts/render_results.py --check     # exit 1 if README.md is not up to date

Each table sits in README.md between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``--write`` replaces what is between the markers and nothing else. Tables:

- ``attention``: ``benchmarks/attention_<device>.json`` (``scripts/bench_attention.py``):
  dense SDPA, FlexAttention and the fused kernel, eager, and the fused kernel's GPU time
  (CUDA-graph replays), ms forward / forward+backward.
- ``bert``: ``benchmarks/bert_training_<device>.json`` and, when present,
  ``benchmarks/bert_training_compiled_<device>.json`` (``scripts/bench_bert_training.py``):
  the BERT-base training step, eager and with the sparse encoder compiled.
- ``bing_bert`` (only when ``benchmarks/bing_bert_<device>.json`` exists, and then with
  ``benchmarks/bing_bert_compiled_<device>.json`` when present; ``scripts/bench_bing_bert.py``):
  the bing_bert example end to end, tokens/s of each variant at its best micro-batch and the
  ratio to dense. ``--bing-bert FILE...`` prints that table from any such files (e.g. a new
  GPU run, before it is copied to ``benchmarks/``).

Standard library only: runs on any machine, no GPU, no torch.
"""
import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
NAMES = {"bigbird": "BigBird", "fixed": "Fixed", "tutorial": "tutorial Fixed",
         "variable": "Variable", "bslongformer": "BSLongformer"}
VARIANTS = {"dense_sdpa": "dense SDPA", "sparse_bigbird": "sparse BigBird {block}",
            "sparse_fixed": "sparse Fixed {block}", "hf_bigbird": "HF BigBirdForMaskedLM"}


def load(name):
    with open(os.path.join(BENCH, name)) as f:
        return json.load(f)


def ms(x):
    """A time in ms with four significant digits at most (0.596, 10.81, 134.3)."""
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def days(date):
    """'2026-11-30T01:07:44+00:00, 2026-11-30T01:10:47+00:00' -> '2026-11-30'."""
    return ", ".join(dict.fromkeys(re.findall(r"\d{4}-\d{2}-\d{2}", date)))


def link(name):
    return f"[`benchmarks/{name}`](benchmarks/{name})"


def attention_table(device, blocks):
    data = load(f"attention_{device}.json")
    meta = data["meta"]
    quoted = data.get("flex_quoted", {})
    flex_q = {(r["seq"], r["layout"], r["block"]): r for r in quoted.get("rows", [])}
    rows = []
    starred = False
    for r in data["rows"]:
        if r["block"] not in blocks:
            continue
        t = r["ms"]
        pair = lambda a, b: f"{ms(a)} / {ms(b)}"  # noqa: E731
        if "flex_fwd" in t:
            flex = pair(t["flex_fwd"], t["flex_fb"])
        elif (r["seq"], r["layout"], r["block"]) in flex_q:
            q = flex_q[(r["seq"], r["layout"], r["block"])]
            flex, starred = pair(q["flex_fwd"], q["flex_fb"]) + " \\*", True
        else:
            flex = "-"
        gpu = pair(t["graph_fused_fwd"], t["graph_fused_fb"]) if "graph_fused_fwd" in t else "-"
        rows.append(f"| {r['seq']} x{r['batch']} | {NAMES.get(r['layout'], r['layout'])} "
                    f"{r['block']} | {pair(t['dense_fwd'], t['dense_fb'])} | {flex} | "
                    f"{pair(t['fused_fwd'], t['fused_fb'])} | {gpu} |")
    star = (f" \\* FlexAttention from runs of the same card on {days(quoted['date'])} (these "
            "runs skipped its block masks, minutes each to build).") if starred else ""
    return [f"{meta['device']}, {days(meta['date'])}, torch {meta['torch']}, Triton "
            f"{meta['triton']}, bf16, {meta['heads']} heads, head_dim {meta['head_dim']}. ms, "
            "forward / forward+backward: eager calls, and the fused kernels' GPU time alone "
            f"(CUDA-graph replays).{star} Every row, rate and memory: "
            f"{link(f'attention_{device}.md')}.", "",
            "| seq x batch | layout, block | dense SDPA | FlexAttention | sparse_attn fused "
            "| fused, GPU time |",
            "| --- | --- | --- | --- | --- | --- |"] + rows


def bert_table(device):
    eager = load(f"bert_training_{device}.json")
    runs = [("eager", eager)]
    compiled_file = f"bert_training_compiled_{device}.json"
    if os.path.exists(os.path.join(BENCH, compiled_file)):
        runs.append(("sparse compiled", load(compiled_file)))
    variants = list(dict.fromkeys(r["variant"] for _, run in runs for r in run["results"]))
    block = eager["args"]["block"]
    env = eager["env"]
    files = [link(f"bert_training_{device}.md")] + (
        [link(f"bert_training_compiled_{device}.md")] if len(runs) > 1 else [])
    lines = [
        f"BERT-base masked-LM training step, batch 1, AdamW, bf16, ms (median step); "
        f"{env['device']}, "
        f"{', '.join(dict.fromkeys(days(run.get('date', '')) for _, run in runs))}, torch "
        f"{env['torch']}, Triton {env.get('triton', '?')}, transformers "
        f"{env.get('transformers', '?')}. Sparse compiled: the sparse encoders under "
        "`torch.compile(mode=\"reduce-overhead\")` (CUDA graphs), dense eager in the same run. "
        f"(x): dense's step time over sparse's. Records: {', '.join(files)}.", "",
        "| seq | mode | " + " | ".join(VARIANTS.get(v, v).format(block=block)
                                      for v in variants) + " |",
        "| --- | --- |" + " --- |" * len(variants)]
    seqs = sorted({r["seq"] for _, run in runs for r in run["results"]})
    for seq in seqs:
        for mode, run in runs:
            got = {r["variant"]: r for r in run["results"] if r["seq"] == seq}
            if not got:
                continue
            dense = got.get("dense_sdpa", {}).get("step_ms")
            cells = []
            for v in variants:
                r = got.get(v)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("out of memory" if r["error"] == "OOM" else "error")
                else:
                    cell = f"{r['step_ms']:.1f}"
                    if v.startswith("sparse_") and dense:
                        x = dense / r["step_ms"]
                        cell += f" ({x:.2f}x)" if x < 1 else f" ({x:.1f}x)"
                    cells.append(cell)
            lines.append(f"| {seq} | {mode} | " + " | ".join(cells) + " |")
    return lines


BING_BERT_VARIANTS = {"dense": "dense SDPA", "fixed16": "tutorial Fixed 16",
                      "bigbird64": "BigBird 64"}
BING_BERT_MODELS = {"base": "BERT-base", "large": "BERT-large", "tiny": "tiny"}


def rate(x):
    """Tokens/s as 812, 12.3k, 1.23M."""
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def bing_bert_cell(s):
    """One variant's summary (``scripts/bench_bing_bert.py``) as a table cell."""
    if s is None:
        return "-"
    if "best_tokens_per_s" not in s:
        stop = s.get("stopped_at") or {}
        return "out of memory" if stop.get("status") == "oom" else "error"
    cell = f"{rate(s['best_tokens_per_s'])} (x{s['best_batch']})"
    if s["variant"] != "dense":
        x = s.get("x_dense")
        cell += ", dense out of memory" if x is None else f", {x:.2f}x"
    return cell


def bing_bert_mode(data):
    """"eager", or "compiled" with the torch.compile mode when not the default."""
    mode = data.get("args", {}).get("compile")
    return "eager" if mode is None else "compiled" if mode == "default" else f"compiled ({mode})"


def bing_bert_table(runs):
    """``runs``: ``[(mode, data, file name)]`` of ``scripts/bench_bing_bert.py`` records (mode
    e.g. "eager", "compiled"). One row per (model, seq, mode): each variant's best tokens/s,
    its micro-batch and the ratio to dense's best."""
    first = runs[0][1]
    env = first["env"]
    variants = [v for v in BING_BERT_VARIANTS
                if any(s["variant"] == v for _, data, _ in runs for s in data["summary"])]
    files = ", ".join(link(name) if not os.path.isabs(name) else f"`{name}`"
                      for _, _, name in runs)
    versions = ", ".join(f"{label} {env[k]}" for k, label in (
        ("torch", "torch"), ("triton", "Triton"), ("deepspeed", "DeepSpeed")) if env.get(k))
    precision = "fp32" if first.get("args", {}).get("fp32") else "bf16"
    lamb = {"torch": "the example's PyTorch LAMB in DeepSpeed's bf16 wrapper",
            "fused": "DeepSpeed's fused LAMB",
            "master": "the example's LAMB with its own float32 master weights",
            "auto": "the example's default `--lamb auto` (under bf16 at ZeRO stage 0: its LAMB "
                    "with its own float32 master weights)"}.get(
        first.get("args", {}).get("lamb"), "LAMB")
    lines = [
        f"bing_bert example (`examples/bing_bert`, DeepSpeed engine, the shipped LAMB config "
        f"with {lamb}, {precision}), tokens/s at each variant's best micro-batch (xN: the "
        "micro-batch) and, for the sparse variants, the ratio to dense's best; synthetic "
        "full-length batches without padding; "
        f"{env['device']}, {', '.join(dict.fromkeys(days(d['date']) for _, d, _ in runs))}, "
        f"{versions}. Records: {files}.", "",
        "| model | seq | mode | " + " | ".join(BING_BERT_VARIANTS[v] for v in variants) + " |",
        "| --- | --- | --- |" + " --- |" * len(variants)]
    keys = []
    for _, data, _ in runs:
        for s in data["summary"]:
            if (s["model"], s["seq"]) not in keys:
                keys.append((s["model"], s["seq"]))
    models = list(BING_BERT_MODELS)
    keys.sort(key=lambda k: (models.index(k[0]) if k[0] in models else 99, k[1]))
    for model, seq in keys:
        for mode, data, _ in runs:
            got = {s["variant"]: s for s in data["summary"]
                   if (s["model"], s["seq"]) == (model, seq)}
            if got:
                lines.append(f"| {BING_BERT_MODELS.get(model, model)} | {seq} | {mode} | "
                             + " | ".join(bing_bert_cell(got.get(v)) for v in variants) + " |")
    return lines


def bing_bert_runs(device):
    """The bing_bert records of ``device`` in benchmarks/, [] when there is none."""
    runs = []
    for name in (f"bing_bert_{device}.json", f"bing_bert_compiled_{device}.json"):
        if os.path.exists(os.path.join(BENCH, name)):
            data = load(name)
            runs.append((bing_bert_mode(data), data, name))
    return runs if os.path.exists(os.path.join(BENCH, f"bing_bert_{device}.json")) else []


def render(args):
    tables = {"attention": attention_table(args.attention_device or args.device, args.blocks),
              "bert": bert_table(args.device)}
    runs = bing_bert_runs(args.bing_bert_device or args.device)
    if runs:  # rendered once a record exists (the README then needs its markers)
        tables["bing_bert"] = bing_bert_table(runs)
    return tables


def replace_blocks(text, tables):
    for name, lines in tables.items():
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if len(pattern.findall(text)) != 1:
            raise SystemExit(f"README.md: expected one '{start}' ... '{end}' block (add the "
                             f"two marker lines where the table goes)")
        body = "\n".join([start] + lines + [end])
        text = pattern.sub(lambda _: body, text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="h200",
                   help="which records: benchmarks/*_<device>.json (default: h200)")
    p.add_argument("--attention-device", default=None,
                   help="the attention table's record, when it differs from --device "
                        "(default: the same)")
    p.add_argument("--bing-bert-device", default=None,
                   help="the bing_bert table's records, when they differ from --device")
    p.add_argument("--blocks", type=int, nargs="+", default=[16, 64],
                   help="attention table: the block sizes shown (default: 16 64)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--bing-bert", nargs="+", default=None, metavar="FILE",
                   help="print only the bing_bert table of these scripts/bench_bing_bert.py "
                   "records (e.g. an eager and a compiled run)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="replace the tables in README.md")
    g.add_argument("--check", action="store_true",
                   help="exit 1 when README.md differs from what --write would make")
    args = p.parse_args(argv)
    if args.bing_bert:
        runs = []
        for path in args.bing_bert:
            with open(path) as f:
                data = json.load(f)
            runs.append((bing_bert_mode(data), data, os.path.abspath(path)))
        print("\n".join(bing_bert_table(runs)))
        return 0
    tables = render(args)
    if not (args.write or args.check):
        for name, lines in tables.items():
            print(f"<!-- results:{name} -->\n" + "\n".join(lines) + f"\n<!-- /results:{name} -->\n")
        return 0
    with open(args.readme) as f:
        text = f.read()
    new = replace_blocks(text, tables)
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date: run python3 scripts/render_results.py --write")
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
