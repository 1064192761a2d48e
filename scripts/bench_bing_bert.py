"""Tokens per second of the bing_bert example itself, dense attention against block-sparse,
at every micro-batch that fits on one device.

    python3 scripts/bench_bing_bert.py                             # GPU: base + large, 512..65536
    python3 scripts/bench_bing_bert.py --models base --seqs 4096 16384 --out out/bbb.json
    python3 scripts/bench_bing_bert.py --models base --seqs 4096 --compile --profile
    python3 scripts/bench_bing_bert.py --tiny --max_batch 2 --out /tmp/bbb.json  # CPU smoke run

What runs is the example's code, built as ``examples/bing_bert/deepspeed_train.py`` builds it:
its command line (``parse_args``), ``launcher.prepare_sparse_attention``, its ``build_model``
(``modeling.BertForPreTraining``, the long-sequence flags, ``--compile``) and
``initialize_engine`` (bing_bert's parameter groups, the config's optimizer: LAMB, fused when
DeepSpeed's builds, else the example's PyTorch LAMB; ``deepspeed.initialize`` on one process).
The DeepSpeed config is the shipped bf16 one of the model
(``configs/bing_bert/ds_sa_bert_{base,large}_seq4096.json``: LAMB, its schedule, gradient
clipping, bf16), with these changes only: the micro-batch is set per row (no gradient
accumulation unless ``--gradient_accumulation``), the monitors are off, and the
``sparse_attention`` block is the variant's:

- ``dense``: the example without ``--deepspeed_sparse_attention`` (SDPA);
- ``fixed16``: the DeepSpeed tutorial's Fixed block (block 16, a layout per head, 4 local
  blocks, 1 global, 4 global patterns; ``scripts/bench_bert_training.py``'s ``sparse_fixed``);
- ``bigbird64``: BigBird, block 64, 3 random, 3 sliding-window and 1 global block (the shipped
  configs' block).

Like for like: every variant gets the same synthetic batches, full length without padding
(random token ids, 15% of the positions masked with random labels, a random next-sentence
label) and no attention mask, so dense SDPA keeps its flash kernel (which takes no mask);
attention-probability dropout is 0 in every variant (the block-sparse kernels have none;
``--attention_dropout`` keeps the config's for dense); ``--compile`` compiles every variant's
encoder; the example's own kernels (fused residual add + dropout + LayerNorm, the masked-LM
loss) run in every variant unless ``--no_fused_norm`` / ``--no_fused_loss``. Positions:
``max_position_embeddings`` is raised to the sequence length where the model config has fewer
(the same model in every variant).

Per (model, sequence) every variant is built, then micro-batches 1, 2, 4, ... run until a
variant runs out of memory (its row says so and it stops doubling) or ``--max_batch``. At
each batch every variant is warmed up (``--warmup`` steps), its peak memory measured over one
more step (GPU), and then the variants are timed in ``--rounds`` rounds that alternate them
(``--steps`` steps each; CUDA events on a GPU, ``perf_counter`` on CPU; each step ends with a
synchronisation, as the example's loop copies the losses to the host every step). A step is
one optimizer step: forward, backward and ``engine.step()`` of ``--gradient_accumulation``
micro-batches. tokens/s is the step's tokens over the median step time. Peak memory is the
variant's own: ``torch.cuda.max_memory_allocated`` over its measured step (reset per
variant) less what the other variants hold (what stays allocated after the step less this
variant's resident memory, i.e. its weights, optimizer state and gradients, counted when it
was built and first stepped); ``process_peak_gib`` is the peak as measured. Variants share the device during
the timing, so the batch where one runs out of memory is found with the other variants'
weights and optimizer states resident (``resident_others_gib`` in each row); with
``--isolate``, and under ``--compile reduce-overhead`` / ``max-autotune`` (CUDA graphs), the
variants run one after the other instead of alternating, each alone on the device.

``--profile`` splits one profiled step per row (``torch.profiler``) into the attention
kernels (dense: SDPA's flash / memory-efficient / cuDNN kernels; sparse: this package's
Triton kernels, every ``@triton.jit`` ``*_kernel`` of ``sparse_attn/ops/kernels``) and the
other kernels; ``non_attention_ms`` is the median step time less the attention kernels' time
(other kernels and host time), and the sparse rows give its ratio to dense's at the same batch
(the overhead budget of issue 22: within 5%). On a GPU, ``gpu_idle_ms`` splits the time no
kernel ran by the host phase (forward, backward, optimizer step) running when the gap began:
where the host, not the GPU, set the pace; ``syncs`` counts the synchronizing CUDA calls of one
more step by call site (``torch.cuda.set_sync_debug_mode``), each a point where the GPU's
queue drains while the host waits. Every row also counts the caching allocator's retries,
cudaMalloc and cudaFree calls over its timed steps (``allocator``): a retry, and every cudaFree,
waits for the device without being a sync PyTorch reports. Under CUDA graphs the split relies
on the profiler seeing the kernels inside the graphs; a sparse row with no attention time says it
did not.

The result: ``--out FILE.json`` (device, date, versions, the exact command, every row and a
summary: per variant its best tokens/s, at which batch, and the ratio to dense's best) and
``FILE.md`` beside it. ``scripts/render_results.py`` renders the README table from it.
DeepSpeed is required (``pip install deepspeed``).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")
CONFIGS = os.path.join(ROOT, "configs", "bing_bert")
KERNELS = os.path.join(ROOT, "sparse_attn", "ops", "kernels")

#: model name -> (BERT config, shipped bf16 DeepSpeed config)
MODELS = {
    "base": (os.path.join(EXAMPLE, "bert_config_base.json"),
             os.path.join(CONFIGS, "ds_sa_bert_base_seq4096.json")),
    "large": (os.path.join(EXAMPLE, "bert_config_large.json"),
              os.path.join(CONFIGS, "ds_sa_bert_large_seq4096.json")),
    "tiny": (os.path.join(EXAMPLE, "bert_config_tiny.json"),
             os.path.join(CONFIGS, "ds_sa_bert_base_seq4096.json")),
}
#: variant -> the config's "sparse_attention" block (None: dense, the flag not given)
VARIANTS = {
    "dense": None,
    "fixed16": {"mode": "fixed", "block": 16, "different_layout_per_head": True,
                "num_local_blocks": 4, "num_global_blocks": 1, "attention": "bidirectional",
                "horizontal_global_attention": False, "num_different_global_patterns": 4},
    "bigbird64": {"mode": "bigbird", "block": 64, "different_layout_per_head": True,
                  "num_random_blocks": 3, "num_sliding_window_blocks": 3,
                  "num_global_blocks": 1, "attention": "bidirectional"},
}
LABELS = {"dense": "dense SDPA", "fixed16": "tutorial Fixed 16", "bigbird64": "BigBird 64"}
DEFAULT_SEQS = [512, 4096, 16384, 65536]
TINY_SEQS = [256, 512]  # BigBird 64 with 3 random blocks needs 4 blocks
MASKED_FRACTION = 0.15
#: dense attention kernels by name: PyTorch's flash and memory-efficient (cutlass fmha)
#: SDPA kernels, cuDNN's SDPA
DENSE_ATTENTION = re.compile(r"flash|fmha|sdpa|efficient_attention|attention_kernel", re.I)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
#: the example's on/off flags, passed as given to every variant (``deepspeed_train.py --help``)
EXAMPLE_SWITCHES = {
    "--activation_checkpointing": "checkpoint every encoder layer",
    "--no_fused_norm": "residual adds, dropouts and LayerNorms as the plain PyTorch modules "
                       "(default: one kernel each way)",
    "--no_fused_loss": "the masked-LM loss as F.cross_entropy of float32 logits (default: one "
                       "kernel each way)",
}
#: Test-only fault injection (tests/example/test_bench_bing_bert.py; never set it in a real
#: run): "VARIANT:BATCH" makes that variant's steps at micro-batches >= BATCH raise
#: torch.cuda.OutOfMemoryError, so that the out-of-memory path runs on CPU.
FAULT_OOM = "BENCH_BING_BERT_TEST_FAULT_OOM"


class OutOfMemory(Exception):
    """A step or a build ran out of device memory."""


def sparse_kernel_names(folder: str = KERNELS) -> List[str]:
    """The names of this package's Triton kernels (every ``@triton.jit`` function named
    ``*_kernel`` in ``sparse_attn/ops/kernels``): what the profiler calls the sparse attention
    kernels."""
    names = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                names += re.findall(r"@triton\.jit\s*\ndef\s+(\w+_kernel)\s*\(", f.read())
    return names


def attention_kind(name: str, sparse_names) -> Optional[str]:
    """"dense" / "sparse" for an attention kernel's name, else None."""
    if any(n in name for n in sparse_names):
        return "sparse"
    if DENSE_ATTENTION.search(name):
        return "dense"
    return None


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, OutOfMemory)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower()
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def gib(n_bytes: Optional[float]) -> Optional[float]:
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


# -- the example's run -------------------------------------------------------------------------
def load_example():
    """``deepspeed_train`` (the example's script) and ``modeling``, importable as modules."""
    for path in (ROOT, EXAMPLE):
        if path not in sys.path:
            sys.path.insert(0, path)
    import deepspeed_train
    import modeling

    return deepspeed_train, modeling


def variant_ds_config(opts, model: str, variant: str, workdir: str) -> str:
    """The shipped DeepSpeed config of ``model`` as this benchmark runs it (see the module
    docstring), written under ``workdir``; returns its path."""
    # the tiny model runs with BERT-base's config
    path = getattr(opts, f"ds_config_{'base' if model == 'tiny' else model}") or MODELS[model][1]
    with open(path) as f:
        cfg = json.load(f)
    ga = opts.gradient_accumulation
    # the micro-batch of a row is the batch fed to the engine; the engine's own bookkeeping
    # only needs the accumulation steps (one optimizer step every `ga` micro-batches)
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=ga,
               train_batch_size=ga, steps_per_print=10**9, wall_clock_breakdown=False)
    for key in ("tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler"):
        if isinstance(cfg.get(key), dict):
            cfg[key]["enabled"] = False
    if opts.fp32 or opts.autocast:
        for key in ("fp16", "bf16", "bfloat16"):
            if isinstance(cfg.get(key), dict):
                cfg[key]["enabled"] = False
    if opts.autocast:  # DeepSpeed's torch.autocast mode in place of its bf16 weights
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if VARIANTS[variant] is not None:
        cfg["sparse_attention"] = dict(VARIANTS[variant])
    out = os.path.join(workdir, f"ds_{model}_{variant}.json")
    with open(out, "w") as f:
        json.dump(cfg, f, indent=2)
    return out


def example_argv(opts, model: str, variant: str, seq: int, ds_config: str,
                 workdir: str) -> List[str]:
    """The example's command line for this variant (what a user would type)."""
    argv = ["--bert_config", MODELS[model][0], "--deepspeed_config", ds_config,
            "--output_dir", os.path.join(workdir, "out"), "--max_seq_length", str(seq),
            "--lamb", opts.lamb, "--seed", str(opts.seed)]
    if VARIANTS[variant] is not None:
        argv.append("--deepspeed_sparse_attention")
    if opts.compile is not None:
        argv += ["--compile", opts.compile]
        if opts.compile_backend != "inductor":
            argv += ["--compile_backend", opts.compile_backend]
    argv += [flag for flag in EXAMPLE_SWITCHES if getattr(opts, flag[2:])]
    if opts.tiled_mlp != 1:
        argv += ["--tiled_mlp", str(opts.tiled_mlp)]
    if opts.tiled_loss != 1:
        argv += ["--tiled_loss", str(opts.tiled_loss)]
    return argv


def model_config(opts, modeling, model: str, seq: int, variant: str):
    """The BERT config of ``model`` for ``seq`` tokens (positions raised to ``seq`` if
    fewer; attention dropout 0 unless ``--attention_dropout`` keeps it for dense)."""
    cfg = modeling.BertConfig.from_json_file(MODELS[model][0])
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq)
    if not (opts.attention_dropout and variant == "dense"):
        cfg.attention_probs_dropout_prob = 0.0
    return cfg


def make_batch(batch: int, seq: int, vocab: int, device: torch.device, seed: int,
               find_positions=None) -> dict:
    """Synthetic pre-training inputs of the full length, no padding: ``input_ids`` int64
    ``[batch, seq]`` (random ids >= 5), ``token_type_ids`` (0 for the first half, 1 after),
    ``masked_lm_labels`` (``IGNORE_INDEX`` except at 15% of the positions of each row, random
    ids there), ``next_sentence_label`` int64 ``[batch]``, and ``attention_mask`` None; with
    ``find_positions`` (the example's ``modeling.masked_positions``), also ``masked_positions``,
    found on the host as the example's own batches have them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 2:] = 1
    n_masked = max(1, round(MASKED_FRACTION * seq))
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for row in range(batch):
        positions = torch.randperm(seq, generator=g)[:n_masked]
        labels[row, positions] = torch.randint(5, vocab, (n_masked,), generator=g)
    nsp = torch.randint(0, 2, (batch,), generator=g)
    out = {"input_ids": ids, "token_type_ids": types, "masked_lm_labels": labels,
           "next_sentence_label": nsp}
    if find_positions is not None:
        out["masked_positions"] = find_positions(labels)
    out = {k: v.to(device) for k, v in out.items()}
    out["attention_mask"] = None
    return out


class Runner:
    """One variant's DeepSpeed engine of the example's model, and its training step."""

    def __init__(self, opts, dt, modeling, model: str, variant: str, seq: int,
                 device: torch.device, workdir: str):
        from launcher import prepare_sparse_attention

        self.variant, self.device, self.ga = variant, device, opts.gradient_accumulation
        before = allocated(device)
        ds_config = variant_ds_config(opts, model, variant, workdir)
        argv = example_argv(opts, model, variant, seq, ds_config, workdir)
        self.command = "deepspeed examples/bing_bert/deepspeed_train.py " + shlex.join(
            [os.path.relpath(a, ROOT) if os.path.isabs(a) and a.startswith(ROOT) else a
             for a in argv])
        args = dt.parse_args(argv)
        bert_config = model_config(opts, modeling, model, seq, variant)
        self.vocab = bert_config.vocab_size
        run = prepare_sparse_attention(
            args, num_heads=bert_config.num_attention_heads, max_seq_length=seq,
            max_position_embeddings=bert_config.max_position_embeddings)
        self.describe = run.describe()
        dt.single_process_env()
        torch.manual_seed(opts.seed)
        self.model = dt.build_model(args, bert_config, run)
        self.engine = dt.initialize_engine(args, run, self.model)
        self.dt = dt
        basic = getattr(self.engine, "basic_optimizer", None) or self.engine.optimizer
        self.optimizer = type(basic).__name__
        if self.engine.optimizer is not basic:  # e.g. DeepSpeed's bf16 wrapper at ZeRO 0
            self.optimizer += f" in {type(self.engine.optimizer).__name__}"
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.resident = allocated(device) - before  # weights, master weights, buffers
        self.stepped = False
        fault = os.environ.get(FAULT_OOM, "")
        self.fail_at = int(fault.split(":")[1]) if fault.split(":")[0] == variant else None

    def step(self, batch: dict) -> torch.Tensor:
        """One optimizer step (``ga`` micro-batches); returns the last loss (a device
        tensor)."""
        if self.fail_at is not None and batch["input_ids"].shape[0] >= self.fail_at:
            raise torch.cuda.OutOfMemoryError(f"{FAULT_OOM}: test fault injection")
        first = not self.stepped
        if first:
            sync(self.device)
            before = allocated(self.device)
        loss = None
        for _ in range(self.ga):
            self.dt.begin_step(self.model)
            with phase("forward"):
                loss, _, _ = self.engine(**batch)
            with phase("backward"):
                self.engine.backward(loss)
            with phase("step"):
                self.engine.step()
        if first:  # what the first step leaves allocated: e.g. the optimizer's moments
            sync(self.device)
            self.resident += allocated(self.device) - before
            self.stepped = True
        return loss

    def warm_up(self, batch: dict, steps: int) -> None:
        """``steps`` steps (0: none)."""
        for _ in range(steps):
            self.step(batch)

    def measure_peak(self, batch: dict) -> dict:
        """One step; on a GPU, this variant's own peak over it and the process's, bytes (None
        on CPU, where no step is run). Own: the peak less what the other variants hold (what
        stays allocated after the step less this variant's resident memory: its weights,
        optimizer state and gradients, counted at its build and first step)."""
        if self.device.type != "cuda":
            return {"peak": None, "process_peak": None}
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step(batch)
        sync(self.device)
        top, after = torch.cuda.max_memory_allocated(self.device), allocated(self.device)
        return {"peak": top - (after - self.resident), "process_peak": top}

    def close(self) -> None:
        engine, self.engine, self.model = self.engine, None, None
        if engine is not None:
            try:
                engine.destroy()
            except Exception:  # best effort: the references go below anyway
                pass
            engine.optimizer = None
            engine.module = None
        del engine


PHASES = ("forward", "backward", "step")
PHASE_PREFIX = "bench_bing_bert::"


def phase(name: str):
    """A profiler range around one phase of the step (``gpu_idle_by_phase`` reads them)."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


def gpu_idle_by_phase(kernels, phases) -> dict:
    """GPU idle time between the first and last kernel, split by the host phase that was
    running when each gap began (the host was issuing that phase's work, or waiting in it).

    kernels: ``(start, end)`` intervals of every kernel; phases: ``(name, start, end)`` host
    ranges, on the same clock. Returns ``{phase or "other": idle}`` in the clock's unit: the
    time when no kernel ran, however many streams."""
    spans = sorted(kernels)
    if not spans:
        return {}
    idle: dict = {}
    busy_until = spans[0][1]
    for start, end in spans[1:]:
        if start > busy_until:
            name = next((n for n, a, b in phases if a <= busy_until < b), "other")
            idle[name] = idle.get(name, 0) + start - busy_until
        busy_until = max(busy_until, end)
    return idle


#: frames of these files are skipped when a sync is charged to a call site
_SYNC_SKIP = (os.sep + "torch" + os.sep, os.sep + "warnings.py", os.path.abspath(__file__))


def sync_site(stack) -> str:
    """The call site a synchronizing CUDA call is charged to: the innermost frame of
    ``stack`` (``traceback.extract_stack()`` order, outermost first) outside PyTorch and
    this script, as ``path:line function`` with the path from the package on."""
    for frame in reversed(stack):
        if not any(part in frame.filename for part in _SYNC_SKIP):
            path = frame.filename
            for root in (ROOT + os.sep, os.sep + "site-packages" + os.sep,
                         os.sep + "site" + os.sep):
                if root in path:
                    path = path.split(root, 1)[1]
                    break
            return f"{path}:{frame.lineno} {frame.name}"
    return "torch"


def sync_census(runner: "Runner", batch: dict) -> Dict[str, int]:
    """Synchronizing CUDA calls of one step, counted by call site (``sync_site``), the most
    frequent first; each one drains the GPU's queue while the host waits."""
    import traceback
    import warnings

    sites: Dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            site = sync_site(traceback.extract_stack()[:-1])
            sites[site] = sites.get(site, 0) + 1

    sync(runner.device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(runner.device)
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: counters of the CUDA caching allocator that ``allocator_counts`` reports: a retry frees
#: every cached block (a device-wide sync) and allocates again; device allocations and frees
#: are cudaMalloc / cudaFree calls (cudaFree waits for the device)
ALLOCATOR_COUNTERS = {"num_alloc_retries": "retries", "num_device_alloc": "device_allocs",
                      "num_device_free": "device_frees"}


def allocator_counts(device: torch.device) -> Optional[Dict[str, int]]:
    """The caching allocator's counters (``ALLOCATOR_COUNTERS``) now; None off CUDA."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(key, 0)) for key, name in ALLOCATOR_COUNTERS.items()}


def counts_between(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in after}


def time_steps(runner: Runner, batch: dict, n: int) -> tuple:
    """Wall time of each of ``n`` steps, ms (CUDA events around each step on a GPU), and the
    last loss as a float."""
    times, loss = [], None
    cuda = runner.device.type == "cuda"
    for _ in range(n):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            loss = runner.step(batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = runner.step(batch)
            times.append((time.perf_counter() - t0) * 1e3)
    return times, float(loss.detach().float())


def profile_split(runner: Runner, batch: dict, steps: int, sparse_names,
                  trace: Optional[str] = None) -> dict:
    """Attention kernels against everything else over ``steps`` profiled steps, ms per step
    (``trace``: also write the profile there as a Chrome trace, gzipped when it ends in .gz;
    ``scripts/dev/trace_gaps.py`` reads it).

    GPU: the device time of every kernel, split by name (``attention_kind``). CPU: the time of
    the top-level attention ops (``scaled_dot_product`` / ``sparse_attn::``) against all ops'
    self time; the PyTorch sparse backend has no op of its own, so on CPU its attention
    counts as the rest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(runner.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step(batch)
        sync(runner.device)
    attention, total, names, others = 0.0, 0.0, {}, {}
    events = prof.events()
    idle = {}
    if cuda:
        kernels, phases = [], []
        for e in events:
            if e.device_type == DeviceType.CPU and e.name.startswith(PHASE_PREFIX):
                phases.append((e.name[len(PHASE_PREFIX):], e.time_range.start,
                               e.time_range.end))
            # GPU user annotations (e.g. the optimizer's step range) span kernels: skip them
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False) \
                    or "#" in e.name:
                continue
            kernels.append((e.time_range.start, e.time_range.end))
            us = e.time_range.elapsed_us()
            total += us
            if attention_kind(e.name, sparse_names) is not None:
                attention += us
                names[e.name] = names.get(e.name, 0.0) + us
            else:
                others[e.name[:90]] = others.get(e.name[:90], 0.0) + us
        idle = gpu_idle_by_phase(kernels, phases)
    else:
        def is_attention(e):
            return "scaled_dot_product" in e.name or e.name.startswith("sparse_attn::")

        for e in events:
            if e.device_type != DeviceType.CPU:
                continue
            total += e.self_cpu_time_total
            parent, nested = e.cpu_parent, False
            while parent is not None:
                nested = nested or is_attention(parent)
                parent = parent.cpu_parent
            if is_attention(e) and not nested:
                attention += e.cpu_time_total
                names[e.name] = names.get(e.name, 0.0) + e.cpu_time_total
    if trace is not None:
        prof.export_chrome_trace(trace)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    top_others = sorted(others.items(), key=lambda kv: -kv[1])[:12]
    extra = {"gpu_idle_ms": {k: round(v / 1e3 / steps, 3) for k, v in idle.items()},
             "syncs": sync_census(runner, batch)} if cuda else {}
    return {"source": "cuda kernels" if cuda else "cpu ops",
            "attention_ms": attention / 1e3 / steps,
            "other_ms": (total - attention) / 1e3 / steps, **extra,
            "attention_kernels": {k: round(v / 1e3 / steps, 4) for k, v in top},
            "other_kernels": {k: round(v / 1e3 / steps, 4) for k, v in top_others}}


# -- one (model, sequence) ---------------------------------------------------------------------
def run_setting(opts, dt, modeling, model: str, seq: int, variants: List[str],
                device: torch.device, log) -> List[dict]:
    """Every batch of ``variants`` at (``model``, ``seq``): rows (see the module docstring)."""
    rows: List[dict] = []
    runners: Dict[str, Runner] = {}
    workdir = tempfile.mkdtemp(prefix="bench_bing_bert_")
    base = {"model": model, "seq": seq}
    sparse_names = sparse_kernel_names() if opts.profile else []

    def drop(variant, status, err, batch):
        """The variant stops at this setting: a row, its engine freed."""
        rows.append({**base, "variant": variant, "batch": batch, "status": status,
                     "error": err, "tokens_per_step": batch * seq * opts.gradient_accumulation})
        runner = runners.pop(variant, None)
        if runner is not None:
            runner.close()
        log(f"{model} seq {seq} {variant} batch {batch}: {status} {err or ''}".rstrip())

    for variant in variants:
        try:
            runners[variant] = Runner(opts, dt, modeling, model, variant, seq, device, workdir)
        except Exception as err:  # noqa: BLE001 - a row, not a crash
            status = "oom" if is_oom(err) else "error"
            drop(variant, status, f"{type(err).__name__}: {err}"[:400], 1)
        free_memory(device)

    batches = opts.batches or [2**i for i in range(64) if 2**i <= opts.max_batch]
    for batch_size in batches:
        if not runners:
            break
        if opts.deadline is not None and time.monotonic() > opts.deadline:
            for variant in list(runners):
                drop(variant, "time_budget", f"--time_budget {opts.time_budget:g} s reached "
                     "before this batch", batch_size)
            break
        batch = make_batch(batch_size, seq, next(iter(runners.values())).vocab, device,
                           opts.seed + batch_size,
                           None if opts.sync_positions else modeling.masked_positions)
        measured = {}
        for variant in list(runners):
            runner = runners[variant]
            err = None
            try:
                runner.warm_up(batch, opts.warmup)
                measured[variant] = runner.measure_peak(batch)
            except Exception as e:  # noqa: BLE001
                err = (is_oom(e), f"{type(e).__name__}: {e}"[:400])
                del e
            if err is not None:
                free_memory(device)
                drop(variant, "oom" if err[0] else "error", err[1], batch_size)
                free_memory(device)
        times = {v: [] for v in measured}
        allocations = {v: collections.Counter() for v in measured}
        losses = {}
        for _ in range(opts.rounds):
            for variant in list(times):
                if variant not in runners:
                    continue
                err = None
                try:
                    before = allocator_counts(device)
                    t, losses[variant] = time_steps(runners[variant], batch, opts.steps)
                    times[variant] += t
                    allocations[variant].update(
                        counts_between(before, allocator_counts(device)) or {})
                except Exception as e:  # noqa: BLE001
                    err = (is_oom(e), f"{type(e).__name__}: {e}"[:400])
                    del e
                if err is not None:
                    free_memory(device)
                    times.pop(variant)
                    drop(variant, "oom" if err[0] else "error", err[1], batch_size)
                    free_memory(device)
        resident_all = sum(r.resident for r in runners.values())
        for variant in list(times):
            runner = runners[variant]
            step_ms = statistics.median(times[variant])
            tokens = batch_size * seq * opts.gradient_accumulation
            row = {**base, "variant": variant, "batch": batch_size, "status": "ok",
                   "tokens_per_step": tokens, "step_ms": step_ms,
                   "step_ms_all": [round(t, 3) for t in times[variant]],
                   "tokens_per_s": tokens / step_ms * 1e3,
                   "peak_gib": gib(measured[variant]["peak"]),
                   "process_peak_gib": gib(measured[variant]["process_peak"]),
                   "resident_gib": gib(runner.resident) if device.type == "cuda" else None,
                   "resident_others_gib": gib(resident_all - runner.resident)
                   if device.type == "cuda" else None,
                   "loss": losses.get(variant), "describe": runner.describe,
                   "allocator": dict(allocations[variant]) or None,
                   "optimizer": runner.optimizer, "parameters": runner.parameters,
                   "example_command": runner.command}
            if opts.profile:
                try:
                    trace = None if opts.trace is None else os.path.join(
                        opts.trace, f"{model}_{seq}_x{batch_size}_{variant}.json.gz")
                    split = profile_split(runner, batch, opts.profile_steps, sparse_names,
                                          trace)
                    split["non_attention_ms"] = step_ms - split["attention_ms"]
                    row["profile"] = split
                except Exception as e:  # noqa: BLE001 - the timing stands without it
                    row["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            peak = row["peak_gib"]
            log(f"{model} seq {seq} {variant} batch {batch_size}: {step_ms:.1f} ms, "
                f"{row['tokens_per_s'] / 1e3:.1f}k tokens/s"
                + (f", peak {peak:.2f} GiB" if peak is not None else "")
                + (f", attention {row['profile']['attention_ms']:.1f} ms"
                   if "attention_ms" in row.get("profile", {}) else "")
                + (", GPU idle " + " / ".join(f"{k} {v:.1f}" for k, v in
                                              row["profile"]["gpu_idle_ms"].items())
                   if row.get("profile", {}).get("gpu_idle_ms") else "")
                + (", allocator retries / cudaMalloc / cudaFree " + " / ".join(
                    str(v) for v in row["allocator"].values()) if row["allocator"] else ""))
        del batch
    for variant in list(runners):
        runners.pop(variant).close()
    free_memory(device)
    if opts.compile is not None:
        torch._dynamo.reset()  # the graphs hold the closed models
    return rows


# -- summary and output ------------------------------------------------------------------------
def order_rows(rows: List[dict]) -> List[dict]:
    """Rows by model, sequence, batch and variant (the order of ``MODELS`` / ``VARIANTS``)."""
    models, variants = list(MODELS), list(VARIANTS)
    return sorted(rows, key=lambda r: (models.index(r["model"]), r["seq"], r["batch"],
                                       variants.index(r["variant"])))


def add_ratios(rows: List[dict]) -> None:
    """Each ok sparse row: ``x_dense`` (tokens/s over dense's at the same batch) and, when
    profiled, ``non_attention_vs_dense``."""
    dense = {(r["model"], r["seq"], r["batch"]): r for r in rows
             if r["variant"] == "dense" and r["status"] == "ok"}
    for r in rows:
        d = dense.get((r["model"], r["seq"], r["batch"]))
        if r["variant"] == "dense" or r["status"] != "ok" or d is None:
            continue
        r["x_dense"] = r["tokens_per_s"] / d["tokens_per_s"]
        p, q = r.get("profile", {}), d.get("profile", {})
        if "non_attention_ms" in p and q.get("non_attention_ms"):
            r["non_attention_vs_dense"] = p["non_attention_ms"] / q["non_attention_ms"]


def summarize(rows: List[dict]) -> List[dict]:
    """Per (model, seq, variant): the best tokens/s, its batch and peak, the largest batch
    that ran, the first batch out of memory, and the ratio of best to dense's best."""
    out = []
    models, variants = list(MODELS), list(VARIANTS)
    keys = sorted(set((r["model"], r["seq"], r["variant"]) for r in rows),
                  key=lambda k: (models.index(k[0]), k[1], variants.index(k[2])))
    for model, seq, variant in keys:
        mine = [r for r in rows if (r["model"], r["seq"], r["variant"]) == (model, seq, variant)]
        ok = [r for r in mine if r["status"] == "ok"]
        failed = [r for r in mine if r["status"] != "ok"]
        s = {"model": model, "seq": seq, "variant": variant}
        if ok:
            best = max(ok, key=lambda r: r["tokens_per_s"])
            s.update(best_tokens_per_s=best["tokens_per_s"], best_batch=best["batch"],
                     best_step_ms=best["step_ms"], best_peak_gib=best["peak_gib"],
                     max_batch=max(r["batch"] for r in ok))
        if failed:
            s["stopped_at"] = {"batch": failed[0]["batch"], "status": failed[0]["status"],
                               "error": failed[0]["error"]}
        out.append(s)
    dense = {(s["model"], s["seq"]): s for s in out if s["variant"] == "dense"}
    for s in out:
        d = dense.get((s["model"], s["seq"]))
        if s["variant"] == "dense" or d is None or "best_tokens_per_s" not in s:
            continue
        if "best_tokens_per_s" in d:
            s["x_dense"] = s["best_tokens_per_s"] / d["best_tokens_per_s"]
        else:
            s["x_dense"] = None  # dense did not run at all (out of memory at batch 1)
    return out


def environment(device: torch.device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = gib(torch.cuda.get_device_properties(device).total_memory)
    for name in ("triton", "deepspeed", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed
            pass
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["commit"] = None
    return env


def precision_text(opts) -> str:
    if opts.autocast:
        return ("bf16 by DeepSpeed's \"torch_autocast\" in place of the config's \"bf16\" "
                "(fp32 weights and gradients, matmuls in bf16, the optimizer unwrapped)")
    return "fp32" if opts.fp32 else "the config precision (bf16)"


def conditions(opts) -> List[str]:
    """The run's conditions, one line each (the Markdown record repeats them)."""
    mode = "eager" if opts.compile is None else (
        f"every variant's encoder under torch.compile(mode=\"{opts.compile}\", "
        f"backend=\"{opts.compile_backend}\")")
    lines = [
        f"{mode}; {precision_text(opts)}; residual add + dropout + LayerNorm "
        + ("as the plain modules (--no_fused_norm)" if opts.no_fused_norm
           else "fused on GPUs (the example's default)")
        + "; masked-LM loss " + ("as F.cross_entropy of float32 logits (--no_fused_loss)"
                                 if opts.no_fused_loss else "fused on GPUs (the default)")
        + f"; one optimizer "
        f"step per {opts.gradient_accumulation} micro-batch(es); the shipped config's "
        "optimizer (LAMB) and schedule, monitors off",
        "synthetic full-length batches without padding, no attention mask (dense SDPA keeps "
        "its flash kernel); 15% masked positions, "
        + ("found by the model (a host sync)" if opts.sync_positions
           else "found on the host with the batch (masked_positions)"),
        "attention-probability dropout " + ("kept for dense (the config's)"
                                            if opts.attention_dropout else
                                            "0 in every variant (the sparse kernels have none)"),
        f"warm-up {opts.warmup} steps, then {opts.rounds} rounds of {opts.steps} steps, "
        + (("variants one after the other, each alone on the device ("
            + ("--isolate" if opts.isolate else "CUDA graphs") + ")") if not alternating(opts)
           else "rounds alternating the variants") + "; median step",
    ]
    extra = [flag for flag, on in (("--activation_checkpointing", opts.activation_checkpointing),
                                   (f"--tiled_mlp {opts.tiled_mlp}", opts.tiled_mlp != 1),
                                   (f"--tiled_loss {opts.tiled_loss}", opts.tiled_loss != 1))
             if on]
    if extra:
        lines.append("the example's long-sequence flags: " + " ".join(extra))
    return lines


def alternating(opts) -> bool:
    """Whether the variants share the device and alternate (else one after the other: with
    ``--isolate``, and under CUDA graphs, whose trees take one model's graphs at a time)."""
    return opts.compile not in CUDAGRAPH_MODES and not opts.isolate


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def fmt_x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def sync_text(syncs: Optional[Dict[str, int]]) -> str:
    """``N; site (n)`` for a profile's sync census, ``-`` without one."""
    if syncs is None:
        return "-"
    if not syncs:
        return "0"
    site, n = next(iter(syncs.items()))
    return f"{sum(syncs.values())}; `{site}` ({n})"


def write_markdown(path: str, data: dict) -> None:
    """The run as a Markdown record: device, date, versions, command, conditions, the summary
    table (best tokens/s per variant), every row, and the profile split when present."""
    env, rows, summary = data["env"], data["rows"], data["summary"]
    versions = "; ".join(f"{k} {env[k]}" for k in ("torch", "triton", "deepspeed",
                                                    "transformers", "cuda") if env.get(k))
    md = [f"# bing_bert example: tokens/s, dense against block-sparse ({env['device']})", "",
          f"Date {data['date']}; {versions}; commit {env.get('commit') or '?'}.", "",
          "Command, run from the repository root:", "", f"    {data['command']}", "",
          "Conditions: " + "; ".join(data["conditions"]) + ". Peak: the variant's own "
          "(weights, optimizer state, and the step's peak; GiB).", ""]
    if not data.get("complete", True):
        md += ["**Incomplete**: the run was cut short; the settings below are those it "
               "finished.", ""]
    for s in data.get("skipped_settings") or []:
        md += [f"Skipped: {s['model']} seq {s['seq']} ({', '.join(s['variants'])}): "
               f"{s['reason']}.", ""]
    md += ["| model | seq | variant | best tokens/s | x dense | at batch | step ms | peak GiB "
           "| largest batch | stopped |", "| --- | --- | --- | --- | --- | --- | --- | --- "
           "| --- | --- |"]
    for s in summary:
        stop = s.get("stopped_at")
        stop_text = f"{stop['status']} at {stop['batch']}" if stop else "-"
        if "best_tokens_per_s" not in s:
            md.append(f"| {s['model']} | {s['seq']} | {LABELS.get(s['variant'], s['variant'])}"
                      f" | - | - | - | - | - | - | {stop_text} |")
            continue
        x = s.get("x_dense")
        x_text = fmt_x(x) if s["variant"] != "dense" else "1.00x"
        if s["variant"] != "dense" and x is None:
            x_text = "dense out of memory"
        peak = s.get("best_peak_gib")
        md.append(f"| {s['model']} | {s['seq']} | {LABELS.get(s['variant'], s['variant'])} | "
                  f"{fmt_rate(s['best_tokens_per_s'])} | {x_text} | {s['best_batch']} | "
                  f"{s['best_step_ms']:.1f} | {'-' if peak is None else f'{peak:.2f}'} | "
                  f"{s['max_batch']} | {stop_text} |")
    md += ["", "Every row (tokens/s, step ms, own peak GiB; sparse: x dense at the same "
           "batch; the caching allocator over the timed steps: retries (each frees the cache "
           "and syncs the device) / cudaMalloc / cudaFree calls):", "",
           "| model | seq | batch | variant | tokens/s | step ms | peak GiB | x dense | "
           "allocator | status |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            md.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['variant']} | - | - | "
                      f"- | - | - | {r['status']}: {str(r.get('error') or '')[:80]} |")
            continue
        peak, alloc = r.get("peak_gib"), r.get("allocator")
        alloc_text = "-" if not alloc else " / ".join(
            str(alloc.get(k, 0)) for k in ALLOCATOR_COUNTERS.values())
        md.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['variant']} | "
                  f"{fmt_rate(r['tokens_per_s'])} | {r['step_ms']:.1f} | "
                  f"{'-' if peak is None else f'{peak:.2f}'} | {fmt_x(r.get('x_dense'))} | "
                  f"{alloc_text} | ok |")
    profiled = [r for r in rows if "attention_ms" in r.get("profile", {})]
    if profiled:
        md += ["", f"Profile ({profiled[0]['profile']['source']}, ms per step): attention "
               "kernels; the other kernels; the rest of the step (median step time less "
               "attention: other kernels and host time), and that rest over dense's at the "
               "same batch (issue 22's budget: <= 1.05); GPU idle (no kernel running, first to "
               "last kernel of the profiled step) by the host phase running when it began:",
               "",
               "| model | seq | batch | variant | attention | other kernels | non-attention | "
               "over dense | GPU idle: forward / backward / step / other | syncs: all; "
               "the most frequent site |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in profiled:
            p = r["profile"]
            ratio = r.get("non_attention_vs_dense")
            idle = p.get("gpu_idle_ms")
            idle_text = "-" if idle is None else " / ".join(
                f"{idle.get(k, 0.0):.2f}" for k in (*PHASES, "other"))
            md.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['variant']} | "
                      f"{p['attention_ms']:.2f} | {p['other_ms']:.2f} | "
                      f"{p['non_attention_ms']:.2f} | "
                      f"{'-' if ratio is None else f'{ratio:.3f}'} | {idle_text} | "
                      f"{sync_text(p.get('syncs'))} |")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")


# -- main --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=("base", "large"),
                   help="default: base large (with --tiny: the tiny model)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seqs", type=int, nargs="+", default=None,
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_SEQS))}; "
                   f"--tiny: {' '.join(map(str, TINY_SEQS))})")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="micro-batches to run (default: 1, 2, 4, ... up to --max_batch, "
                   "each variant until it runs out of memory)")
    p.add_argument("--max_batch", type=int, default=256)
    p.add_argument("--gradient_accumulation", type=int, default=1,
                   help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per variant and batch (default 2, 3 with --compile)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"),
                   help="the example's --compile for every variant (like for like)")
    p.add_argument("--compile_backend", default="inductor")
    for flag, what in EXAMPLE_SWITCHES.items():
        p.add_argument(flag, action="store_true", help=f"the example's flag, every variant: {what}")
    p.add_argument("--tiled_mlp", type=int, default=1, metavar="N",
                   help="the example's flag, every variant")
    p.add_argument("--tiled_loss", type=int, default=1, metavar="N",
                   help="the example's flag, every variant")
    p.add_argument("--attention_dropout", action="store_true",
                   help="keep the config's attention-probability dropout for dense (default: "
                   "0 in every variant, as the sparse kernels have none)")
    p.add_argument("--lamb", choices=("auto", "fused", "torch", "master"), default="auto",
                   help="the example's --lamb (auto: master under bf16 at ZeRO stage 0, else "
                   "DeepSpeed's fused LAMB when it builds)")
    p.add_argument("--ds_config_base", default=None,
                   help="DeepSpeed config of BERT-base (and of --tiny; default "
                   f"{os.path.relpath(MODELS['base'][1], ROOT)})")
    p.add_argument("--ds_config_large", default=None,
                   help="DeepSpeed config of BERT-large (default "
                   f"{os.path.relpath(MODELS['large'][1], ROOT)})")
    p.add_argument("--fp32", action="store_true",
                   help="turn bf16/fp16 off in the config (default on CPU)")
    p.add_argument("--autocast", action="store_true",
                   help="every variant in DeepSpeed's \"torch_autocast\" bf16 mode instead of "
                   "the config's \"bf16\": fp32 weights, and the optimizer steps without "
                   "DeepSpeed's per-parameter bf16 wrapper at ZeRO stage 0")
    p.add_argument("--isolate", action="store_true",
                   help="run the variants one after the other, each alone on the device (the "
                   "largest batch without the others' weights resident; no alternation)")
    p.add_argument("--sync_positions", action="store_true",
                   help="feed batches without masked_positions: the model finds the masked "
                   "tokens itself, with a host sync (the example before it made them)")
    p.add_argument("--profile", action="store_true",
                   help="split a profiled step per row into attention kernels and the rest")
    p.add_argument("--profile_steps", type=int, default=1)
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="with --profile: write each row's profiled steps to DIR as a gzipped "
                   "Chrome trace, MODEL_SEQ_xBATCH_VARIANT.json.gz (scripts/dev/trace_gaps.py "
                   "lists where the GPU waited)")
    p.add_argument("--tiny", action="store_true",
                   help="the example's tiny model (2 layers, hidden 128) at short lengths: a "
                   "smoke run of the harness (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None,
                   help="write the results as JSON here, and a Markdown table beside it "
                   "(rewritten after every (model, seq), \"complete\": false until the end)")
    p.add_argument("--time_budget", type=float, default=None, metavar="S",
                   help="start no new batch or (model, seq) after S seconds (what is left is "
                   "recorded as skipped); default: no limit")
    opts = p.parse_args(argv)
    if opts.time_budget is not None and opts.time_budget <= 0:
        p.error(f"--time_budget {opts.time_budget:g}: must be positive")
    opts.deadline = None if opts.time_budget is None else time.monotonic() + opts.time_budget
    if opts.trace is not None:
        if not opts.profile:
            p.error("--trace writes the profiled steps: give --profile too")
        os.makedirs(opts.trace, exist_ok=True)
    for flag in ("max_batch", "gradient_accumulation", "steps", "rounds", "profile_steps",
                 "tiled_mlp", "tiled_loss"):
        if getattr(opts, flag) < 1:
            p.error(f"--{flag} {getattr(opts, flag)}: must be at least 1")
    for flag in ("seqs", "batches"):
        bad = [x for x in getattr(opts, flag) or [] if x < 1]
        if bad:
            p.error(f"--{flag} {bad[0]}: must be at least 1")
    if opts.warmup is not None and opts.warmup < 0:
        p.error(f"--warmup {opts.warmup}: must be at least 0")
    if opts.tiny:
        opts.models = ["tiny"]
        opts.seqs = opts.seqs or TINY_SEQS
        if opts.warmup is None:
            opts.warmup = 1
    opts.models = opts.models or ["base", "large"]
    opts.seqs = opts.seqs or DEFAULT_SEQS
    if opts.warmup is None:
        opts.warmup = 3 if opts.compile else 2
    if opts.autocast and opts.fp32:
        p.error("--autocast and --fp32: give one precision")
    if torch.device(opts.device).type != "cuda" and not opts.autocast:
        opts.fp32 = True
    return opts


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if importlib.util.find_spec("deepspeed") is None:
        print("error: scripts/bench_bing_bert.py runs the bing_bert example, which needs "
              "DeepSpeed: pip install deepspeed (on the GPU image: put its wheel in .whl/, "
              "which scripts/dev/gpu_check.sh installs)", file=sys.stderr, flush=True)
        return 2
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {opts.device}: no CUDA device here", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
            print(f"error: --device {opts.device} with DS_ACCELERATOR="
                  f"{os.environ['DS_ACCELERATOR']}: DeepSpeed would put the model elsewhere; "
                  f"unset DS_ACCELERATOR", file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
    else:  # DeepSpeed's engine puts the model on its accelerator's device
        os.environ["DS_ACCELERATOR"] = "cpu"
    if opts.compile is not None:
        import torch._dynamo as dynamo

        # every (variant, batch) is its own graph; keep them all compiled
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
    dt, modeling = load_example()
    env = environment(device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "PYTHONPATH=. python3 scripts/bench_bing_bert.py " + shlex.join(argv)

    def log(msg):
        print(msg, flush=True)

    log(f"# bing_bert example, tokens/s; {env}")
    for line in conditions(opts):
        log(f"# {line}")
    rows: List[dict] = []
    skipped: List[dict] = []

    def record(complete: bool) -> dict:
        ordered = order_rows(rows)
        add_ratios(ordered)
        data = {"benchmark": "bing_bert", "env": env, "date": started, "command": command,
                "conditions": conditions(opts), "complete": complete,
                "skipped_settings": skipped,
                "args": {k: v for k, v in vars(opts).items() if k != "deadline"},
                "rows": ordered, "summary": summarize(ordered)}
        if opts.out:  # after every setting, so that a run cut short keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
            with open(opts.out, "w") as f:
                json.dump(data, f, indent=2, default=str)
            write_markdown(os.path.splitext(opts.out)[0] + ".md", data)
        return data

    for model in opts.models:
        for seq in opts.seqs:
            groups = [opts.variants] if alternating(opts) else [[v] for v in opts.variants]
            for variants in groups:
                if opts.deadline is not None and time.monotonic() > opts.deadline:
                    skipped.append({"model": model, "seq": seq, "variants": variants,
                                    "reason": f"--time_budget {opts.time_budget:g} s"})
                    log(f"{model} seq {seq} {' '.join(variants)}: skipped (--time_budget)")
                    continue
                rows += run_setting(opts, dt, modeling, model, seq, variants, device, log)
                record(complete=False)
    data = record(complete=True)
    summary = data["summary"]
    log("")
    for s in summary:
        if "best_tokens_per_s" in s:
            log(f"{s['model']} seq {s['seq']} {s['variant']}: best "
                f"{fmt_rate(s['best_tokens_per_s'])} tokens/s at batch {s['best_batch']}"
                + (f", {fmt_x(s['x_dense'])} dense" if s.get("x_dense") else ""))
        else:
            log(f"{s['model']} seq {s['seq']} {s['variant']}: no batch ran "
                f"({s['stopped_at']['status']})")
    if opts.out:
        log(f"wrote {opts.out} and {os.path.splitext(opts.out)[0]}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
