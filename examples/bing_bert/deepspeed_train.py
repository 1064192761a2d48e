"""BERT pre-training (masked LM + next-sentence prediction) with DeepSpeed and block-sparse
attention, in the style of DeepSpeedExamples' bing_bert.

    deepspeed deepspeed_train.py --deepspeed_sparse_attention \
        --deepspeed_config ../../configs/bing_bert/ds_sa_bert_tiny_cpu.json \
        --bert_config bert_config_tiny.json --data_dir data/seq512 --output_dir out/tiny

The optimizer and LR schedule come from the DeepSpeed config (LAMB on GPU as bing_bert used,
torch AdamW on CPU), as do the batch sizes, gradient accumulation, fp16/bf16, ZeRO and the
monitor (CSV / TensorBoard; empty ``output_path`` means ``<output_dir>/monitor``). Every
``--save_every`` optimizer steps a checkpoint goes to ``<output_dir>/checkpoints/step_N``;
``--load_checkpoint_dir`` resumes from one and continues the same loss curve (data order and
dropout are functions of the step, so a resumed run sees what the uninterrupted one saw).
Each checkpoint records its layout and is marked complete only once all its files are written
(``launcher.save_checkpoint``); a resume takes the newest complete one (or the tag given) and
refuses another layout than the checkpoint's unless ``--allow_layout_change``. In bf16/fp32 a
non-finite loss stops the run (exit status 3) before its optimizer update, naming the step and
the last good checkpoint; in fp16, DeepSpeed's loss scaling skips such steps.
``<output_dir>/metrics.jsonl`` gets one line per logged step and per evaluation.
``--sequence_parallel_size P`` splits every sequence over ``P`` ranks (DeepSpeed Ulysses;
``bert_sequence_parallel.py``).

Speed and long sequences: on GPUs each residual add, its dropout and the LayerNorm after it run
as one kernel each way (``residual_norm.py``; ``--no_fused_norm``: the plain modules), and
the masked-LM loss reads the bf16 logits without float32 copies (``cross_entropy.py``;
``--no_fused_loss``).
``--compile [MODE]`` compiles the encoder in place with
``torch.compile`` (``reduce-overhead``: CUDA graphs, each step marked); the sparse attention
is a registered custom op, so the GPU graph has no break. ``--activation_checkpointing``
checkpoints every encoder layer, ``--tiled_mlp N`` computes each feed-forward in ``N`` pieces
of the sequence and ``--tiled_loss N`` the masked-LM logits and loss in ``N`` pieces of the
masked positions (DeepSpeed's ``TiledMLP`` / ``sequence_tiled_compute``, ``tiling.py``): the
same losses and gradients with less activation memory. ``build_model`` and
``initialize_engine`` build the model and the engine as ``main`` does, for other drivers
(``scripts/bench_bing_bert.py``).

DeepSpeedExamples' bing_bert command line works too (``bing_bert_compat.py``): ``--cf`` (its
config file) for ``--bert_config``, ``--data_path_prefix`` for ``--data_dir``, ``--print_steps``
for ``--log_every``, ``--lr_schedule`` / ``--lr_offset`` (its learning-rate schedules), and
every other flag of its parser with one line saying what it maps to or why it is ignored.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import bing_bert_compat as bb  # noqa: E402
from launcher import (LauncherConfigError, add_sparse_attention_arguments,  # noqa: E402
                      check_resume_layout, layout_record, prepare_sparse_attention,
                      resolve_checkpoint, save_checkpoint, scaled_backward)
from modeling import (BertConfig, BertForPreTraining, count_parameters,  # noqa: E402
                      masked_positions)

DEFAULT_MAX_STEPS = 300
#: torch.compile modes of --compile ("default": torch.compile's default mode)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the modes that run the compiled encoder as CUDA graphs (each step must be marked)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
#: Exit status of a run stopped on a non-finite loss (2: a bad flag, config or input).
EXIT_NONFINITE_LOSS = 3

# Test-only fault injection (used by tests/example/test_bing_bert.py; never set them in a real
# run). The value is an optimizer step.
#: SIGKILL this run's process group (the ``deepspeed`` launcher and every rank) while it saves
#: the checkpoint of that step: after its files are written, before it is marked complete.
FAULT_KILL_IN_SAVE = "SPARSE_ATTN_TEST_FAULT_KILL_IN_SAVE_AT_STEP"
#: Make the loss NaN (times NaN, so the gradients are NaN too) in that step's micro steps.
FAULT_NAN_LOSS = "SPARSE_ATTN_TEST_FAULT_NAN_LOSS_AT_STEP"


class DataError(ValueError):
    pass


# -- data ------------------------------------------------------------------------------------
def load_split(data_dir: str, split: str):
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; create it with "
                        f"prepare_data.py --output_dir {data_dir}")
    if not os.path.isfile(meta_path):
        raise DataError(f"{meta_path} is missing: {data_dir} is not a prepared data directory "
                        f"(run prepare_data.py --output_dir {data_dir})")
    with open(meta_path) as f:
        meta = json.load(f)
    names = meta.get(f"{split}_shards") or []
    if not names:
        raise DataError(f"{meta_path} lists no {split} shards")
    parts = []
    for name in names:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"data shard {path} is missing (re-run prepare_data.py)")
        parts.append(torch.load(path))
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return meta, data


def make_batch(data, indices, device, full_length=False):
    """Rows ``indices``, cut to the longest sequence of the batch (the model pads to the
    block itself); with ``full_length``, every batch keeps the data's whole length (one shape
    for every step: what ``--compile`` wants, a graph per shape). The batch carries its
    ``masked_positions`` (found here, on the host) and goes to a GPU by non-blocking copies
    from pinned memory, so that the step never waits for the device."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    lengths = data["lengths"][idx]
    longest = data["input_ids"].shape[1] if full_length else int(lengths.max())
    ids = data["input_ids"][idx, :longest].long()
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": ids,
        "token_type_ids": data["token_type_ids"][idx, :longest].long(),
        "attention_mask": mask,
        "masked_lm_labels": data["masked_lm_labels"][idx, :longest].long(),
        "next_sentence_label": data["next_sentence_label"][idx].long(),
    }
    batch["masked_positions"] = masked_positions(batch["masked_lm_labels"])
    return to_device(batch, device), int(lengths.sum())


def to_device(batch: dict, device) -> dict:
    """The CPU tensors of ``batch`` on ``device``; to a GPU by non-blocking copies from pinned
    memory (a pageable copy would wait for the device's queue to drain)."""
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class Sampler:
    """Deterministic sample order: epoch ``e`` is a permutation seeded by ``seed + e``; micro
    step ``m`` of rank ``r`` reads ``micro`` samples at flat position
    ``(m * world + r) * micro``. Resuming at micro step ``m`` continues the same stream."""

    def __init__(self, n, micro, world, rank, seed):
        self.n, self.micro, self.world, self.rank, self.seed = n, micro, world, rank, seed
        self._epoch, self._perm = None, None

    def indices(self, micro_step):
        start = (micro_step * self.world + self.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, i = divmod(pos, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
            out.append(int(self._perm[i]))
        return out


# -- args ------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BERT pre-training with DeepSpeed and sparse "
                                "attention (bing_bert style)")
    p.add_argument("--bert_config", default=None,
                   help="BERT model config JSON (or bing_bert's --cf file)")
    p.add_argument("--data_dir", default=None,
                   help="output of prepare_data.py (or --data_path_prefix)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="default: the data's sequence length; with sparse attention, a "
                   "length that is not a multiple of the block is padded to the next one")
    p.add_argument("--max_steps", type=int, default=None,
                   help=f"optimizer steps (default: total_training_steps of --cf's "
                   f"mixed_seq_training for this length, else {DEFAULT_MAX_STEPS})")
    p.add_argument("--log_every", "--print_steps", dest="log_every", type=int, default=10,
                   help="log every N optimizer steps (bing_bert: --print_steps)")
    p.add_argument("--eval_every", type=int, default=50, help="0: no periodic evaluation")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--save_every", type=int, default=0,
                   help="checkpoint every N optimizer steps (and at the end); 0: never")
    p.add_argument("--load_checkpoint_dir", default=None,
                   help="resume from this checkpoint directory (<output_dir>/checkpoints)")
    p.add_argument("--load_checkpoint_tag", default=None,
                   help="checkpoint tag (e.g. step_100); default: the newest complete one "
                   "(checkpoints whose save did not finish are skipped)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no_progress_bar", action="store_true")
    p.add_argument("--job_name", default=None,
                   help="monitor job name (default: --cf's name, else bing_bert_sa)")
    p.add_argument("--lamb", choices=("auto", "fused", "torch", "master"), default="auto",
                   help="for a \"Lamb\" optimizer config: DeepSpeed's fused LAMB (a CUDA "
                   "extension), the plain PyTorch LAMB of lamb.py, or master (bf16 at ZeRO "
                   "stage 0 only): the PyTorch LAMB keeps the float32 master weights itself "
                   "and the example casts the model to bf16, so DeepSpeed runs no bf16 "
                   "optimizer wrapper (whose overflow test syncs the host once per "
                   "parameter). auto: master under bf16 at ZeRO stage 0, else fused when it "
                   "builds, else torch. Resume with the optimizer the checkpoint was saved "
                   "with")
    p.add_argument("--sequence_parallel_size", type=int, default=1,
                   help="ranks that share one sequence (DeepSpeed Ulysses): each holds "
                   "1/P of the tokens and, inside attention, 1/P of the heads; needs "
                   "--deepspeed_sparse_attention and a --max_seq_length that is a multiple "
                   "of P * block")
    g = p.add_argument_group("speed and long sequences")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the encoder in place (state_dict keys unchanged); "
                   "MODE (default: default) is torch.compile's mode: reduce-overhead and "
                   "max-autotune add CUDA graphs (each training and evaluation step is "
                   "marked); batches keep the data's whole length (one shape, one graph)")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend with --compile (default inductor; e.g. "
                   "aot_eager to check a graph without code generation)")
    g.add_argument("--no_fused_norm", action="store_true",
                   help="run each encoder layer's residual adds, dropouts and LayerNorms as "
                   "the plain PyTorch modules; by default they are one kernel each way on GPUs "
                   "(residual_norm.py; the same computation, another dropout mask)")
    g.add_argument("--no_fused_loss", action="store_true",
                   help="compute the masked-LM loss as F.cross_entropy of float32 logits; by "
                   "default on GPUs one kernel each way reads the bf16 logits "
                   "(cross_entropy.py; the same loss)")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="checkpoint every encoder layer (torch.utils.checkpoint, "
                   "non-reentrant): keep only each layer's input, run the layer again in the "
                   "backward")
    g.add_argument("--tiled_mlp", type=int, default=1, metavar="N",
                   help="compute each layer's feed-forward in N pieces of the sequence "
                   "(DeepSpeed's TiledMLP; recomputed in the backward); 1: off")
    g.add_argument("--tiled_loss", type=int, default=1, metavar="N",
                   help="compute the masked-LM logits and loss in N pieces of the masked "
                   "positions (recomputed in the backward); 1: off")
    add_sparse_attention_arguments(p)
    bb.add_bing_bert_arguments(p)
    return p.parse_args(argv)


# -- helpers ---------------------------------------------------------------------------------
def fill_monitor_paths(ds_config: dict, output_dir: str, job_name: str) -> None:
    for key in ("tensorboard", "csv_monitor", "wandb", "comet"):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            if key in ("tensorboard", "csv_monitor") and not section.get("output_path"):
                section["output_path"] = os.path.join(output_dir, "monitor") + os.sep
            section.setdefault("job_name", job_name)


class Progress:
    def __init__(self, total, enabled, start=0):
        self.total, self.enabled, self.start = total, enabled, start
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.time()

    def update(self, step, loss, tokens_per_s, lr, force=False):
        if not self.enabled or not (self.tty or force):
            return
        done = step / max(1, self.total)
        rate = (step - self.start) / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        line = (f"[{bar}] step {step}/{self.total} loss {loss:.4f} "
                f"{tokens_per_s / 1000:.1f}k tok/s lr {lr:.2e} eta {eta:.0f}s")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def param_groups(model, weight_decay=None):
    """bing_bert's groups: no weight decay on biases and LayerNorm weights (``weight_decay``:
    the others' decay, default the optimizer's)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    first = {"params": decay}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    return [first, {"params": no_decay, "weight_decay": 0.0}]


def configure_lamb(ds_config, model, choice, weight_decay=None):
    """For a ``"Lamb"`` optimizer config, return a plain PyTorch LAMB (and remove the
    optimizer from the config DeepSpeed gets) when the fused one is not used; else None.
    ``"master"`` also casts ``model`` to bf16 and turns the config's bf16 and gradient clipping
    off: the LAMB keeps the float32 master weights and clips, and DeepSpeed wraps nothing."""
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() != "lamb":
        return None
    # Under bf16 at ZeRO stage 0 DeepSpeed (0.19) steps its own LAMB on the bf16 parameters
    # (its legacy fused path keeps no fp32 copy), and the fused kernel has no bf16 version; a
    # client optimizer, as the PyTorch LAMB is, gets DeepSpeed's fp32 master copies.
    bf16_params = bool((ds_config.get("bf16") or {}).get("enabled")) and \
        int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 0
    if choice == "auto" and bf16_params:
        # DeepSpeed's bf16 wrapper would test each gradient with a host sync
        choice = "master"
    if choice == "master" and not bf16_params:
        raise ValueError(
            "--lamb master is for \"bf16\": {\"enabled\": true} at \"zero_optimization\": "
            "{\"stage\": 0}; this config has neither or a ZeRO stage: use --lamb torch or auto")
    if choice == "fused":
        if bf16_params:
            raise ValueError(
                "--lamb fused: DeepSpeed's fused LAMB has no bf16 kernel, and with "
                "\"bf16\": {\"enabled\": true} and \"zero_optimization\": {\"stage\": 0} "
                "DeepSpeed steps it on the bf16 parameters themselves; use --lamb torch (or "
                "auto), fp16, or a ZeRO stage >= 1")
        return None
    from lamb import Lamb, fused_lamb_available

    if choice == "auto" and fused_lamb_available():
        return None
    params = dict(opt.get("params") or {})
    ds_config.pop("optimizer")
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    if choice == "master":  # the weights are bf16 here; DeepSpeed sees a float32 run
        for key in ("bf16", "bfloat16"):
            if isinstance(ds_config.get(key), dict):
                ds_config[key]["enabled"] = False
        # DeepSpeed's float32 clipping issues four ops per parameter (~1000 a BERT-base step,
        # most of the step's host time); the LAMB clips with a few multi-tensor ops
        clip = float(ds_config.get("gradient_clipping") or 0.0)
        ds_config["gradient_clipping"] = 0.0
        model.to(torch.bfloat16)
        print("optimizer: plain PyTorch LAMB (examples/bing_bert/lamb.py) with its own float32 "
              "master weights" + (f" and gradient clipping ({clip:g})" if clip > 0 else "") +
              "; the model in bf16, no DeepSpeed bf16 wrapper", file=sys.stderr, flush=True)
        return Lamb(param_groups(model, weight_decay), master_weights=True,
                    max_grad_norm=clip, **params)
    print("optimizer: DeepSpeed's fused LAMB is not used here; plain PyTorch LAMB "
          "(examples/bing_bert/lamb.py) with the config's parameters", file=sys.stderr,
          flush=True)
    return Lamb(param_groups(model, weight_decay), **params)


def check_speed_flags(args) -> None:
    """Raise ValueError naming the flag for a bad ``--compile*`` / ``--tiled_*`` value."""
    from tiling import check_shards

    check_shards("--tiled_mlp", args.tiled_mlp)
    check_shards("--tiled_loss", args.tiled_loss)
    if args.compile not in (None, "default") and args.compile_backend != "inductor":
        raise ValueError(f"--compile {args.compile} is a mode of the inductor backend, not of "
                         f"--compile_backend {args.compile_backend}: give --compile alone with "
                         f"that backend, or drop --compile_backend")
    if args.compile is None and args.compile_backend != "inductor":
        raise ValueError(f"--compile_backend {args.compile_backend} has no effect without "
                         f"--compile")


def build_model(args, bert_config, run, micro=None, fp16=False):
    """The example's ``BertForPreTraining`` for ``run`` (``prepare_sparse_attention``), as
    ``main`` builds it: sparse self-attention when ``run`` has a layout, DeepSpeed's
    transformer kernel with ``--deepspeed_transformer_kernel``, then the long-sequence options
    (``--activation_checkpointing``, ``--tiled_mlp``, ``--tiled_loss``), ``--no_fused_norm``,
    ``--no_fused_loss`` and ``--compile`` (the encoder, in place). ``micro``: the micro-batch
    (the transformer kernel's batch size). Raises ValueError for a model or flag that cannot
    be built."""
    check_speed_flags(args)
    model = BertForPreTraining(
        bert_config, sparsity_config=run.sparsity_config,
        use_transformer_kernel=args.deepspeed_transformer_kernel,
        transformer_kernel_args={"batch_size": micro or 1, "fp16": fp16, "seed": args.seed,
                                 **bb.kernel_options(args)},
        sparse_max_seq_length=run.layout_length)
    model.set_memory_options(activation_checkpointing=args.activation_checkpointing,
                             tiled_mlp=args.tiled_mlp, tiled_loss=args.tiled_loss)
    model.set_fused(norm=not args.no_fused_norm, loss=not args.no_fused_loss)
    model.cudagraph_steps = False
    if args.compile is not None:
        mode = None if args.compile == "default" else args.compile
        # in place: the parameters and state_dict keys stay those of the eager model
        model.bert.encoder.compile(mode=mode, backend=args.compile_backend)
        model.cudagraph_steps = args.compile in CUDAGRAPH_MODES
    return model


def begin_step(model) -> None:
    """Before each forward of a model compiled with CUDA graphs: a new step for CUDA-graph
    trees (the previous step's graph outputs may be overwritten). No-op otherwise."""
    if getattr(model, "cudagraph_steps", False):
        torch.compiler.cudagraph_mark_step_begin()


def initialize_engine(args, run, model, weight_decay=None, **parallel):
    """The DeepSpeed engine of ``model`` as ``main`` makes it: bing_bert's parameter groups,
    the optimizer of the DeepSpeed config (a plain PyTorch LAMB for a ``"Lamb"`` config unless
    DeepSpeed's fused one is used: ``--lamb``), ``run.initialize`` (the cleaned config, the
    layouts compared across ranks). ``parallel``: e.g. ``mpu`` for sequence parallelism."""
    client_optimizer = configure_lamb(run.ds_config, model, args.lamb, weight_decay)
    engine, _, _, _ = run.initialize(model=model,
                                     model_parameters=param_groups(model, weight_decay),
                                     optimizer=client_optimizer, **parallel)
    return engine


def write_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def single_process_env() -> None:
    """Started with plain ``python`` (no launcher): run as a world of one process instead of
    letting DeepSpeed look for MPI."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def note(msg: str) -> None:
    """One line on rank 0 (before DeepSpeed starts, every rank runs the same checks)."""
    if is_rank0():
        print(msg, file=sys.stderr, flush=True)


def fault_step(name: str):
    """The step of a test-only fault injection variable (None when unset)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: a step number (test-only fault injection)")


def kill_in_save_hook(step: int):
    """The ``before_commit`` hook of ``FAULT_KILL_IN_SAVE``: SIGKILL to this process group,
    as ``kill -9 -PGID`` would, once the checkpoint's files are written and before it is
    marked complete (rank 0 sends it; the launcher and every rank go)."""
    def hook(path):
        if not is_rank0():
            return
        group = os.getpgrp()
        print(f"\n{FAULT_KILL_IN_SAVE}={step}: test fault injection: SIGKILL to process group "
              f"{group} while saving {path} (files written, not marked complete)",
              file=sys.stderr, flush=True)
        os.killpg(group, signal.SIGKILL)
    return hook


def loss_scale(engine):
    """fp16: the current loss scale of DeepSpeed's optimizer (None if it has none)."""
    opt = engine.optimizer
    for owner in (getattr(opt, "loss_scale_config", None), opt,
                  getattr(opt, "loss_scaler", None)):
        value = getattr(owner, "cur_scale", None) if owner is not None else None
        if isinstance(value, (int, float)):
            return float(value)
    return None


def resolve_inputs(args):
    """The model config and the data of this run, from this example's flags or bing_bert's.
    Returns ``(bert_config, cf, meta, train_data, eval_data)``; raises ValueError."""
    if (args.cf is None) == (args.bert_config is None):
        raise bb.BingBertError(
            "give the model config with exactly one of --bert_config (this example's BERT "
            "config JSON) and --cf (bing_bert's config file)" +
            (", not both" if args.cf else ""))
    if (args.data_dir is None) == (args.data_path_prefix is None):
        raise bb.BingBertError(
            "give the data with exactly one of --data_dir and --data_path_prefix "
            "(prepare_data.py output)" + (", not both" if args.data_dir else ""))
    if args.load_training_checkpoint is not None and args.load_checkpoint_dir is not None:
        raise bb.BingBertError("give one of --load_checkpoint_dir and bing_bert's "
                               "--load_training_checkpoint, not both")
    if args.load_checkpoint_id is not None and args.load_checkpoint_tag is not None:
        raise bb.BingBertError("give one of --load_checkpoint_tag and bing_bert's "
                               "--load_checkpoint_id, not both")
    cf = None
    if args.cf is not None:
        cf = bb.load_cf(args.cf)
        bert_config = BertConfig(**cf.bert)
    else:
        bert_config = BertConfig.from_json_file(args.bert_config)
    if args.data_path_prefix is not None:
        args.data_dir = bb.resolve_data_path(args.data_path_prefix, args.max_seq_length)
    meta, train_data = load_split(args.data_dir, "train")
    eval_dir = args.data_dir
    if args.validation_data_path_prefix is not None:
        eval_dir = bb.resolve_data_path(args.validation_data_path_prefix,
                                        args.max_seq_length or meta["max_seq_length"])
    eval_meta, eval_data = load_split(eval_dir, "eval")
    if eval_meta.get("vocab_size") != meta.get("vocab_size"):
        raise DataError(f"the eval data at {eval_dir} has a vocab of "
                        f"{eval_meta.get('vocab_size')} tokens, the training data at "
                        f"{args.data_dir} {meta.get('vocab_size')}: prepare both with one vocab")
    if cf is not None:
        line = bb.checkpoint_note(cf)
        if line:
            note(line)
    if args.data_path_prefix is not None:
        note(f"data: {args.data_dir} (--data_path_prefix {args.data_path_prefix})")
    if args.validation_data_path_prefix is not None:
        note(f"bing_bert flag --validation_data_path_prefix {args.validation_data_path_prefix}: "
             f"evaluation reads the eval split of {eval_dir}")
    if args.load_training_checkpoint is not None:
        args.load_checkpoint_dir = args.load_training_checkpoint
        note(f"bing_bert flag --load_training_checkpoint {args.load_training_checkpoint}: "
             f"resumes like --load_checkpoint_dir (this example's checkpoints, "
             f"<output_dir>/checkpoints)")
    if args.load_checkpoint_id is not None:
        args.load_checkpoint_tag = args.load_checkpoint_id
        note(f"bing_bert flag --load_checkpoint_id {args.load_checkpoint_id}: the checkpoint "
             f"tag (--load_checkpoint_tag)")
    for line in bb.flag_notes(args, meta):
        note(line)
    return bert_config, cf, meta, train_data, eval_data


def plan_learning_rate(args, cf, ds_config):
    """bing_bert's ``--lr_schedule`` / ``--lr_offset``: a ``BingBertLR`` (and the DeepSpeed
    config's scheduler removed), or None when neither flag is given."""
    if args.lr_schedule is None and args.lr_offset is None:
        if bb.truthy(args.rewarmup):
            note("bing_bert flag --rewarmup: no effect without --lr_schedule (the DeepSpeed "
                 "config's scheduler continues from the resumed step)")
        return None
    schedule = args.lr_schedule or "LE"
    if cf is None:
        raise bb.BingBertError(
            f"--lr_schedule {schedule} takes its values (learning_rate, warmup_proportion, "
            f"decay_rate, decay_step, total_training_steps) from bing_bert's config file: "
            f"give --cf with mixed_seq_training[\"{args.max_seq_length}\"], or drop "
            f"--lr_schedule/--lr_offset and use the DeepSpeed config's scheduler")
    training = cf.schedule_values(schedule, args.max_seq_length)
    plan = bb.BingBertLR(schedule, training, args.lr_offset or 0.0)
    replaced = ds_config.pop("scheduler", None)
    what = (f"replaces the DeepSpeed config's scheduler ({replaced.get('type', '?')})"
            if isinstance(replaced, dict) else "(the DeepSpeed config has no scheduler)")
    note(f"lr: --lr_schedule {schedule} {what}: {plan.describe()} "
         f"({cf.where(args.max_seq_length)} of {cf.path}), set on the optimizer every step")
    return plan


def evaluate(engine, data, micro, world, rank, n_batches, device, shard=None,
             full_length=False):
    """The mean loss of ``n_batches`` batches per data-parallel rank (``world``, ``rank``:
    data-parallel). With a sequence ``shard``, each rank's loss is its part of the sequence's
    loss (the parts add up over the group), so only the group's rank 0 counts the batch.
    ``full_length``: as ``make_batch``'s."""
    engine.eval()
    total, count = 0.0, 0
    n = data["lengths"].shape[0]
    with torch.no_grad():
        for b in range(n_batches):
            start = (b * world + rank) * micro
            idx = [(start + i) % n for i in range(micro)]
            batch, _ = make_batch(data, idx, device, full_length)
            if shard is not None:
                batch = sp_shard_batch(engine, batch, shard)
            begin_step(engine.module)
            loss, _, _ = engine(**batch)
            total += float(loss)
            count += 1 if shard is None or shard.rank == 0 else 0
    engine.train()
    value = torch.tensor([total, count], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)  # on the device: NCCL takes no CPU tensors
    return float(value[0] / value[1])


def sp_shard_batch(engine, batch, shard):
    """This rank's shard of a full batch (``bert_sequence_parallel.shard_batch``)."""
    from bert_sequence_parallel import shard_batch
    from modeling import IGNORE_INDEX

    bert = engine.module.bert
    return shard_batch(batch, shard, bert.sparse_attention_config.block, bert.pad_token_id,
                       IGNORE_INDEX)


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        check_speed_flags(args)
        bert_config, cf, meta, train_data, eval_data = resolve_inputs(args)
    except (ValueError, OSError) as err:
        return error(str(err))
    if args.max_seq_length is None:
        args.max_seq_length = meta["max_seq_length"]
    if args.max_seq_length < meta["max_seq_length"]:
        return error(f"--max_seq_length {args.max_seq_length} is below the data's sequence "
                     f"length {meta['max_seq_length']} ({args.data_dir}); prepare data for "
                     f"{args.max_seq_length} tokens")
    if meta["vocab_size"] > bert_config.vocab_size or \
            meta["vocab_size"] < bert_config.vocab_size // 2:
        size = -(-meta["vocab_size"] // 8) * 8
        if cf is not None:
            note(f"vocab_size: {size} (the prepared data's vocab of {meta['vocab_size']} "
                 f"tokens, rounded up to 8), not the {bert_config.vocab_size} of --cf")
        bert_config.vocab_size = size
    bert_config.pad_token_id = meta.get("pad_token_id", 0)
    if args.job_name is None:
        args.job_name = (cf.name if cf is not None and cf.name else None) or "bing_bert_sa"
    training = cf.training_for(args.max_seq_length) if cf is not None else None
    if args.max_steps is None:
        args.max_steps = DEFAULT_MAX_STEPS
        if training is not None and "total_training_steps" in training:
            args.max_steps = training["total_training_steps"]
            note(f"max_steps: {args.max_steps} (total_training_steps of "
                 f"{cf.where(args.max_seq_length)} in {cf.path}; --max_steps sets another)")
    try:
        run = prepare_sparse_attention(
            args, num_heads=bert_config.num_attention_heads,
            max_seq_length=args.max_seq_length,
            max_position_embeddings=bert_config.max_position_embeddings)
        lr_plan = plan_learning_rate(args, cf, run.ds_config)
        kill_step, nan_step = fault_step(FAULT_KILL_IN_SAVE), fault_step(FAULT_NAN_LOSS)
        # Which checkpoint to resume, and whether it was trained with this layout: checked
        # before the model and the engine are built (every rank reads the same folder).
        resume = None
        if args.load_checkpoint_dir:
            resume = resolve_checkpoint(
                args.load_checkpoint_dir, args.load_checkpoint_tag,
                tag_flag="--load_checkpoint_id" if args.load_checkpoint_id is not None
                else "--load_checkpoint_tag",
                dir_flag="--load_training_checkpoint"
                if args.load_training_checkpoint is not None else "--load_checkpoint_dir")
            check_resume_layout(resume.layout, run, allow_change=args.allow_layout_change,
                                checkpoint=f"checkpoint {resume.path}")
        sp_size = args.sequence_parallel_size
        from bert_sequence_parallel import check_sizes

        check_sizes(sp_size, int(os.environ.get("WORLD_SIZE", "1")),
                    bert_config.num_attention_heads, run.layout_length, run.block)
    except (LauncherConfigError, bb.BingBertError, ValueError) as err:
        return error(str(err))
    fill_monitor_paths(run.ds_config, args.output_dir, args.job_name)
    weight_decay = training.get("weight_decay") if training is not None else None

    single_process_env()
    os.makedirs(args.output_dir, exist_ok=True)
    micro = run.ds_config.get("train_micro_batch_size_per_gpu")
    fp16 = bool(run.ds_config.get("fp16", {}).get("enabled"))
    bf16 = any((run.ds_config.get(key) or {}).get("enabled") for key in ("bf16", "bfloat16"))
    autocast = (run.ds_config.get("torch_autocast") or {}).get("enabled")
    precision = "fp16" if fp16 else "bf16" if bf16 else \
        "fp32 weights, torch_autocast" if autocast else "fp32"
    torch.manual_seed(args.seed)
    try:
        model = build_model(args, bert_config, run, micro=micro, fp16=fp16)
    except ValueError as err:
        return error(str(err))
    shard, parallel = None, {}
    if sp_size > 1:
        import deepspeed
        from bert_sequence_parallel import make_groups, sequence_parallel_mpu, use_in_model

        deepspeed.init_distributed()
        shard = make_groups(sp_size)
        use_in_model(model, shard, run.sparsity_config, run.layout_length)
        parallel = {"mpu": sequence_parallel_mpu()}  # DeepSpeed reduces over its groups
    engine = initialize_engine(args, run, model, weight_decay, **parallel)

    rank = engine.global_rank
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # Data-parallel replicas: the ranks of a sequence group share one batch.
    dp_world, dp_rank = world // sp_size, rank // sp_size
    micro = engine.train_micro_batch_size_per_gpu()
    ga = engine.gradient_accumulation_steps()
    device = engine.device
    is_main = rank == 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    # One write per line: ranks share the launcher's stdout, and print() writes the text
    # and the newline separately, so two ranks' lines could interleave.
    sys.stdout.write(f"rank {rank}/{world}: {run.describe()}; transformer kernel "
                     f"{'on' if args.deepspeed_transformer_kernel else 'off'}\n")
    sys.stdout.flush()
    if is_main:
        seen = dict(getattr(engine._config, "_param_dict", None) or engine.config)
        info = {"sparse_attention": run.enabled, "describe": run.describe(),
                "layout_checksum": run.layout_checksum,
                "transformer_kernel": bool(args.deepspeed_transformer_kernel),
                "transformer_kernel_disabled": run.transformer_kernel_disabled,
                "user_config": run.user_config_path, "ds_config_seen": seen,
                "world_size": world, "sequence_parallel_size": sp_size,
                "engine_sequence_parallel_size": getattr(engine, "sequence_parallel_size", 1),
                "micro_batch": micro, "gradient_accumulation": ga,
                "parameters": count_parameters(model), "bert_config": bert_config.to_dict(),
                "max_seq_length": args.max_seq_length,
                "padded_seq_length": run.padded_seq_length, "job_name": args.job_name,
                "max_steps": args.max_steps, "data_dir": args.data_dir, "cf": args.cf,
                "lr_schedule": lr_plan.schedule if lr_plan else None,
                "lr_offset": lr_plan.lr_offset if lr_plan else None,
                "layout_record": layout_record(run), "precision": precision,
                "compile": args.compile, "compile_backend": args.compile_backend
                if args.compile else None,
                "activation_checkpointing": args.activation_checkpointing,
                "tiled_mlp": args.tiled_mlp, "tiled_loss": args.tiled_loss}
        with open(os.path.join(args.output_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        print(f"model: {count_parameters(model) / 1e6:.2f}M parameters, "
              f"{bert_config.num_hidden_layers} layers, hidden {bert_config.hidden_size}, "
              f"{bert_config.num_attention_heads} heads; data: {meta['train_instances']} "
              f"sequences of up to {meta['max_seq_length']} tokens; batch {micro} x {ga} "
              f"accumulation x {dp_world} data-parallel ranks"
              + (f" x {sp_size} per sequence" if sp_size > 1 else ""), flush=True)

    micro_step = 0
    last_good = None  # the last complete checkpoint of this run (saved, or resumed from)
    if resume is not None:
        try:
            path, client = engine.load_checkpoint(args.load_checkpoint_dir, tag=resume.tag)
        except (KeyError, ValueError, RuntimeError) as err:  # e.g. another optimizer's state
            return error(f"could not load checkpoint {resume.path} ({type(err).__name__}: "
                         f"{err}); its optimizer state must match this run's: a checkpoint "
                         f"saved with --lamb master (the default under bf16 at ZeRO stage 0) "
                         f"resumes only with it, one saved with --lamb torch or fused only "
                         f"with that")
        if path is None:
            return error(f"no checkpoint found in {args.load_checkpoint_dir} (tag "
                         f"{resume.tag})")
        last_good = resume.path
        micro_step = int((client or {}).get("micro_step", engine.global_steps * ga))
        if is_main:
            print(f"resumed from {path} at step {engine.global_steps}", flush=True)
        if lr_plan is not None and bb.truthy(args.rewarmup):
            lr_plan.start_step = engine.global_steps
            if is_main:
                print(f"bing_bert flag --rewarmup: the --lr_schedule {lr_plan.schedule} "
                      f"schedule restarts (warmup included) at step {engine.global_steps}",
                      file=sys.stderr, flush=True)
    elif bb.truthy(args.rewarmup) and lr_plan is not None and is_main:
        print("bing_bert flag --rewarmup: no effect without a resumed checkpoint "
              "(--load_training_checkpoint)", file=sys.stderr, flush=True)

    sampler = Sampler(train_data["lengths"].shape[0], micro, dp_world, dp_rank, args.seed)
    progress = Progress(args.max_steps, is_main and not args.no_progress_bar,
                        start=engine.global_steps)
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    window_loss, window_tokens, window_t0 = [], 0, time.time()
    step_losses = []

    # fp16: a step whose scaled gradients overflow is DeepSpeed's dynamic loss scaling's to
    # ride out (it skips the step and lowers the scale). In bf16/fp32 nothing is scaled: a
    # non-finite loss is a fault, which DeepSpeed skips quietly (its bf16 and ZeRO optimizers)
    # or applies to the weights (plain fp32), and a loss that stays NaN skips every step from
    # then on. So it stops the run, before the optimizer update.
    stop_on_nonfinite = not fp16
    while engine.global_steps < args.max_steps:
        # dropout and data are functions of (seed, step, rank): resuming repeats them exactly
        torch.manual_seed(args.seed * 1_000_003 + micro_step * world + rank)
        batch, tokens = make_batch(train_data, sampler.indices(micro_step), device,
                                   full_length=args.compile is not None)
        if shard is not None:
            batch = sp_shard_batch(engine, batch, shard)
        begin_step(model)
        loss, mlm_loss, nsp_loss = engine(**batch)
        if nan_step is not None and engine.global_steps + 1 == nan_step:
            loss = loss * float("nan")  # test fault injection (FAULT_NAN_LOSS)
        scaled_backward(engine, loss)  # engine.backward(loss), fp16 scale applied (ZeRO 0)
        # The losses come to the host once per micro step (the one sync the loop has), before
        # the optimizer step, so that a non-finite loss is seen before it reaches the weights.
        step_losses.append(torch.stack([loss.detach().float(), mlm_loss.detach().float(),
                                        nsp_loss.detach().float()]).cpu())
        window_tokens += tokens
        boundary = len(step_losses) >= ga
        if boundary:
            losses = torch.stack(step_losses).mean(0).double()
            step_losses = []
            if world > 1:
                losses = losses.to(device)  # NCCL reduces device tensors only
                torch.distributed.all_reduce(losses)
                # a sequence group's parts add up to its loss: the mean over replicas
                losses = (losses / dp_world).cpu()
            # the mean over the accumulation window and every rank: all ranks decide alike
            if stop_on_nonfinite and not all(math.isfinite(float(x)) for x in losses):
                progress.close()
                if is_main:
                    where = (f"the last good checkpoint is {last_good} (resume with "
                             f"--load_checkpoint_dir {os.path.dirname(last_good)} "
                             f"--load_checkpoint_tag {os.path.basename(last_good)})"
                             if last_good else "no checkpoint was saved or resumed by this run "
                             "(--save_every)")
                    print(f"\nerror: non-finite loss at step {engine.global_steps + 1} (loss "
                          f"{float(losses[0])}, mlm {float(losses[1])}, nsp {float(losses[2])}"
                          f", {precision}): stopped before its optimizer update instead of "
                          f"training on it; {where}", file=sys.stderr, flush=True)
                return EXIT_NONFINITE_LOSS
        if lr_plan is not None:  # bing_bert's update_learning_rate: before the optimizer step
            bb.set_lr(engine.optimizer, lr_plan(engine.global_steps))
        engine.step()
        micro_step += 1
        if not boundary:  # not at an optimizer step yet
            continue
        step = engine.global_steps
        loss_v, mlm_v, nsp_v = (float(x) for x in losses)
        lr = engine.get_lr()[0]
        skipped = fp16 and not engine.was_step_applied()
        if skipped and is_main:
            print(f"\nstep {step}: skipped by DeepSpeed's fp16 dynamic loss scaling (the "
                  f"gradients overflowed; weights not updated); loss scale now "
                  f"{loss_scale(engine)}", file=sys.stderr, flush=True)
        window_loss.append(loss_v)
        if engine.monitor.enabled and is_main:
            engine.monitor.write_events([
                ("Train/Samples/train_loss", loss_v, engine.global_samples),
                ("Train/Samples/mlm_loss", mlm_v, engine.global_samples),
                ("Train/Samples/nsp_loss", nsp_v, engine.global_samples)])
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = time.time() - window_t0
            tps = window_tokens * dp_world / max(elapsed, 1e-9)
            avg = sum(window_loss) / len(window_loss)
            if is_main:
                row = {"step": step, "loss": loss_v, "avg_loss": avg, "mlm_loss": mlm_v,
                       "nsp_loss": nsp_v, "lr": lr, "tokens_per_s": tps, "time": time.time()}
                if fp16:
                    row.update(loss_scale=loss_scale(engine), step_skipped=skipped)
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                write_jsonl(metrics_path, row)
            progress.update(step, avg, tps, lr, force=True)
            window_loss, window_tokens, window_t0 = [], 0, time.time()
        else:
            progress.update(step, loss_v, 0.0, lr)
        if args.eval_every and step % args.eval_every == 0:
            ev = evaluate(engine, eval_data, micro, dp_world, dp_rank, args.eval_batches,
                          device, shard, full_length=args.compile is not None)
            if is_main:
                write_jsonl(metrics_path, {"step": step, "eval_loss": ev, "time": time.time()})
                print(f"\nstep {step}: eval loss {ev:.4f}", file=sys.stderr, flush=True)
                if engine.monitor.enabled:
                    engine.monitor.write_events([("Eval/Samples/eval_loss", ev,
                                                  engine.global_samples)])
        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            hook = kill_in_save_hook(step) if step == kill_step else None
            last_good = save_checkpoint(
                engine, ckpt_dir, f"step_{step}", run=run, step=step, before_commit=hook,
                client_state={"micro_step": micro_step, "step": step},
                extra={"max_seq_length": args.max_seq_length, "precision": precision})
            if is_main:
                print(f"\nsaved checkpoint {last_good}", file=sys.stderr, flush=True)
    progress.close()
    if is_main:
        print(f"done: {engine.global_steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
