"""DeepSpeedExamples' bing_bert command line on this example.

bing_bert users start sparse-attention pre-training with (its
``ds_sa_train_bert_bsz64k_seq128.sh``)::

    deepspeed deepspeed_train.py --cf bert_large_lamb.json --max_seq_length 128 \\
        --output_dir out --deepspeed --deepspeed_sparse_attention --print_steps 100 \\
        --lr_schedule "EE" --lr_offset 10e-4 --job_name lamb_64k_seq128 \\
        --deepspeed_config ds.json --data_path_prefix /data/bert

This module gives ``deepspeed_train.py`` that command line:

* ``--cf`` reads bing_bert's config file (``load_cf``): the BERT config, the job name and, per
  sequence length, the learning-rate schedule values (``mixed_seq_training``);
* ``--lr_schedule`` / ``--lr_offset``: bing_bert's schedules (``bing_bert_lr``), set on the
  optimizer every step in place of the DeepSpeed config's scheduler;
* ``--data_path_prefix``: where the prepared data is (``resolve_data_path``);
* every other flag of bing_bert's parser is accepted; ``flag_notes`` gives one line per flag
  given, saying what it maps to here or why it is not supported.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

LR_SCHEDULES = ("LE", "EE", "EP")

LR_HELP = (
    "bing_bert's learning-rate schedule, set on the optimizer before every optimizer step "
    "in place of the DeepSpeed config's \"scheduler\"; needs --cf with "
    "mixed_seq_training[\"<max_seq_length>\"]. With t the number of optimizer steps done "
    "(since the resumed step with --rewarmup), T = total_training_steps, "
    "W = warmup_proportion * T, lr = learning_rate * f(t) + lr_offset where "
    "LE (bing_bert's default): f = t/W for t < W, else decay_rate ** ((t - W) / decay_step); "
    "EE: f = (t/W)**2 for t < W, else decay_rate ** ((t - W) / decay_step); "
    "EP: f = (t/W)**1.5 for t < W, else (1 - min(t, T)/T)**2. "
    "A warmup_proportion of 0 makes f = 1 for LE and EE (no warmup, no decay), as in bing_bert.")

# the keys of bing_bert's config file ("--cf")
CF_KEYS = ("name", "bert_token_file", "bert_model_file", "bert_model_config", "data",
           "mixed_seq_training", "validation", "training")
BERT_KEYS = {
    "vocab_size": int, "vocab_size_or_config_json_file": int, "hidden_size": int,
    "num_hidden_layers": int, "num_attention_heads": int, "intermediate_size": int,
    "hidden_act": str, "hidden_dropout_prob": float, "attention_probs_dropout_prob": float,
    "max_position_embeddings": int, "type_vocab_size": int, "initializer_range": float,
    "layer_norm_eps": float,
}
HIDDEN_ACTS = ("gelu", "relu", "tanh")
TRAINING_KEYS = {
    "num_epochs": int, "warmup_proportion": float, "learning_rate": float,
    "num_workers": int, "async_worker": bool, "decay_rate": float, "decay_step": int,
    "total_training_steps": int, "weight_decay": float,
}
SCHEDULE_NEEDS = {
    "LE": ("learning_rate", "warmup_proportion", "decay_rate", "decay_step",
           "total_training_steps"),
    "EE": ("learning_rate", "warmup_proportion", "decay_rate", "decay_step",
           "total_training_steps"),
    "EP": ("learning_rate", "warmup_proportion", "total_training_steps"),
}


class BingBertError(ValueError):
    """A bing_bert flag or config file that cannot be used; the message says why."""


# -- the learning-rate schedules ------------------------------------------------------------
def lr_factor(schedule: str, step: int, *, warmup_proportion: float, total_training_steps: int,
              decay_rate: float = 1.0, decay_step: int = 1) -> float:
    """The factor ``f(t)`` of bing_bert's schedule ``schedule`` (LE, EE, EP) at ``step``
    optimizer steps done (see ``LR_HELP``)."""
    t, total = float(step), float(total_training_steps)
    warmup_end = warmup_proportion * total
    if schedule in ("LE", "EE"):
        if warmup_proportion == 0:
            return 1.0
        if t < warmup_end:
            ramp = t / warmup_end
            return ramp if schedule == "LE" else ramp ** 2
        return decay_rate ** ((t - warmup_end) / decay_step)
    if schedule == "EP":
        if t < warmup_end:
            return (t / warmup_end) ** 1.5
        return (1.0 - min(t, total) / total) ** 2
    raise BingBertError(f"--lr_schedule {schedule!r}: one of {', '.join(LR_SCHEDULES)}")


@dataclass
class BingBertLR:
    """``lr = learning_rate * f(step - start_step) + lr_offset`` (bing_bert's
    ``update_learning_rate``)."""

    schedule: str
    training: dict
    lr_offset: float = 0.0
    start_step: int = 0

    def __call__(self, step: int) -> float:
        t = max(0, step - self.start_step)
        kwargs = {k: self.training[k] for k in ("warmup_proportion", "total_training_steps",
                                                "decay_rate", "decay_step")
                  if k in self.training}
        return self.training["learning_rate"] * lr_factor(self.schedule, t, **kwargs) \
            + self.lr_offset

    def describe(self) -> str:
        tr = self.training
        text = (f"bing_bert schedule {self.schedule}: learning_rate {tr['learning_rate']:g}, "
                f"warmup_proportion {tr['warmup_proportion']:g} of total_training_steps "
                f"{tr['total_training_steps']}")
        if self.schedule != "EP":
            text += f", decay_rate {tr['decay_rate']:g} every {tr['decay_step']} steps"
        return text + f", lr_offset {self.lr_offset:g}"


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- the config file ----------------------------------------------------------------------------
@dataclass
class BingBertConfig:
    """bing_bert's ``--cf`` file, validated."""

    path: str
    name: Optional[str]
    bert: dict                                # BertConfig keyword arguments
    training: dict = field(default_factory=dict)   # "128" -> {learning_rate, ...}
    default_training: Optional[dict] = None   # the older top-level "training" block
    bert_token_file: Optional[str] = None
    bert_model_file: Optional[str] = None
    data: Optional[dict] = None
    validation: Optional[dict] = None

    def training_for(self, max_seq_length: Optional[int]) -> Optional[dict]:
        if max_seq_length is not None and str(max_seq_length) in self.training:
            return self.training[str(max_seq_length)]
        return self.default_training

    def where(self, max_seq_length) -> str:
        if max_seq_length is not None and str(max_seq_length) in self.training:
            return f"mixed_seq_training[\"{max_seq_length}\"]"
        return "training"

    def schedule_values(self, schedule: str, max_seq_length: Optional[int]) -> dict:
        """The values ``schedule`` needs for this length, or a clear error naming what is
        missing."""
        training = self.training_for(max_seq_length)
        if training is None:
            have = ", ".join(f'"{k}"' for k in self.training) or "none"
            raise BingBertError(
                f"--lr_schedule {schedule} needs bing_bert's schedule values for "
                f"--max_seq_length {max_seq_length}: {self.path} has no "
                f"mixed_seq_training[\"{max_seq_length}\"] (its lengths: {have}); add one "
                f"with {', '.join(SCHEDULE_NEEDS[schedule])}")
        missing = [k for k in SCHEDULE_NEEDS[schedule] if k not in training]
        if missing:
            raise BingBertError(
                f"--lr_schedule {schedule} needs {', '.join(missing)} in "
                f"{self.path}: {self.where(max_seq_length)}")
        return training


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise BingBertError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _unknown(key: str, known, where: str) -> BingBertError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return BingBertError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(known)}")


def _check_type(value, kind, where: str):
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        name = {int: "an integer", float: "a number", bool: "true or false",
                str: "a string", dict: "an object"}[kind]
        raise BingBertError(f"{where} must be {name}, not {json.dumps(value)}")
    return value


def _bert_config(block, where: str) -> dict:
    _check_type(block, dict, where)
    out = {}
    for key, value in block.items():
        if key not in BERT_KEYS:
            raise _unknown(key, list(BERT_KEYS), where)
        if key == "vocab_size_or_config_json_file" and isinstance(value, str):
            raise BingBertError(
                f"{where}.vocab_size_or_config_json_file: a path to a config file "
                f"({value!r}) is not read here; give the vocab size (an integer)")
        _check_type(value, BERT_KEYS[key], f"{where}.{key}")
        out[key] = value
    if "vocab_size_or_config_json_file" in out:
        old = out.pop("vocab_size_or_config_json_file")
        if "vocab_size" in out and out["vocab_size"] != old:
            raise BingBertError(
                f"{where}: vocab_size {out['vocab_size']} and vocab_size_or_config_json_file "
                f"{old} disagree (both name the vocab size); keep one")
        out["vocab_size"] = old
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "vocab_size"):
        if key in out and out[key] <= 0:
            raise BingBertError(f"{where}.{key} must be positive, not {out[key]}")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if key in out and not 0 <= out[key] < 1:
            raise BingBertError(f"{where}.{key} must be in [0, 1), not {out[key]}")
    if "hidden_act" in out and out["hidden_act"] not in HIDDEN_ACTS:
        raise BingBertError(f"{where}.hidden_act {out['hidden_act']!r} is not supported here "
                            f"(one of {', '.join(HIDDEN_ACTS)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in out:
            raise BingBertError(f"{where} has no {key}")
    if out["hidden_size"] % out["num_attention_heads"]:
        raise BingBertError(f"{where}: hidden_size {out['hidden_size']} is not a multiple of "
                            f"num_attention_heads {out['num_attention_heads']}")
    return out


def _training(block, where: str) -> dict:
    _check_type(block, dict, where)
    for key, value in block.items():
        if key not in TRAINING_KEYS:
            raise _unknown(key, list(TRAINING_KEYS), where)
        _check_type(value, TRAINING_KEYS[key], f"{where}.{key}")
    checks = {
        "learning_rate": (lambda v: v > 0, "positive"),
        "warmup_proportion": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "decay_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "decay_step": (lambda v: v > 0, "positive"),
        "total_training_steps": (lambda v: v > 0, "positive"),
        "num_epochs": (lambda v: v > 0, "positive"),
        "num_workers": (lambda v: v >= 0, "0 or more"),
        "weight_decay": (lambda v: v >= 0, "0 or more"),
    }
    for key, (ok, what) in checks.items():
        if key in block and not ok(block[key]):
            raise BingBertError(f"{where}.{key} must be {what}, not {block[key]}")
    return dict(block)


def load_cf(path: str) -> BingBertConfig:
    """Read and validate bing_bert's config file (``--cf``); errors name the key."""
    if not os.path.isfile(path):
        raise BingBertError(f"--cf {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise BingBertError(f"{path}: malformed JSON at line {err.lineno}, column "
                            f"{err.colno}: {err.msg}") from None
    except BingBertError as err:
        raise BingBertError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise BingBertError(f"{path}: bing_bert's config file is a JSON object")
    for key in data:
        if key not in CF_KEYS:
            raise _unknown(key, list(CF_KEYS), path)
    if "bert_model_config" not in data:
        raise BingBertError(f"{path} has no bert_model_config (the BERT config: hidden_size, "
                            f"num_hidden_layers, num_attention_heads, ...)")
    bert = _bert_config(data["bert_model_config"], f"{path}: bert_model_config")
    for key in ("name", "bert_token_file", "bert_model_file"):
        if key in data:
            _check_type(data[key], str, f"{path}: {key}")
    for key in ("data", "validation"):
        if key in data:
            _check_type(data[key], dict, f"{path}: {key}")
    training = {}
    if "mixed_seq_training" in data:
        block = _check_type(data["mixed_seq_training"], dict, f"{path}: mixed_seq_training")
        for seq, entry in block.items():
            if not seq.isdigit() or int(seq) <= 0:
                raise BingBertError(f"{path}: mixed_seq_training key {seq!r} must be a "
                                    f"sequence length (e.g. \"128\")")
            training[str(int(seq))] = _training(entry, f"{path}: mixed_seq_training[\"{seq}\"]")
    default = None
    if "training" in data:
        default = _training(data["training"], f"{path}: training")
    return BingBertConfig(path=path, name=data.get("name"), bert=bert, training=training,
                          default_training=default, bert_token_file=data.get("bert_token_file"),
                          bert_model_file=data.get("bert_model_file"), data=data.get("data"),
                          validation=data.get("validation"))


def checkpoint_note(cf: BingBertConfig) -> Optional[str]:
    """One line on bert_token_file / bert_model_file (not loaded here)."""
    names = [f"{k} {getattr(cf, k)!r}" for k in ("bert_token_file", "bert_model_file")
             if getattr(cf, k)]
    if not names:
        return None
    return (f"--cf {cf.path}: {' and '.join(names)} not loaded: this example pre-trains from "
            f"random weights with the vocab of the prepared data (nothing is downloaded)")


# -- data -------------------------------------------------------------------------------------
def resolve_data_path(prefix: str, max_seq_length: Optional[int]) -> str:
    """The prepared data (a folder with meta.json) for ``--data_path_prefix``: ``prefix``
    itself or ``prefix/seq<max_seq_length>``."""
    candidates = []
    if max_seq_length is not None:
        candidates.append(os.path.join(prefix, f"seq{max_seq_length}"))
    candidates.append(prefix)
    for path in candidates:
        if os.path.isfile(os.path.join(path, "meta.json")):
            return path
    target = candidates[0]
    seq = max_seq_length or 512
    where = " or ".join(candidates)
    found = ""
    if os.path.isdir(prefix):
        subs = sorted(d for d in os.listdir(prefix)
                      if os.path.isfile(os.path.join(prefix, d, "meta.json")))
        if subs:
            found = f" (prepared data found in: {', '.join(subs)})"
    raise BingBertError(
        f"--data_path_prefix {prefix}: no prepared data at {where} (no meta.json){found}. "
        f"bing_bert's own dataset format (its wiki/bookcorpus shards, NVIDIA's HDF5 files) is "
        f"not read here; prepare data with: python examples/bing_bert/prepare_data.py "
        f"--output_dir {target} --max_seq_length {seq} [--input corpus.txt --vocab vocab.txt]")


# -- the other flags of bing_bert's parser ------------------------------------------------------
_BOOL = dict(nargs="?", const=True)  # bing_bert's switches; its older train.py took "True"
_VALUE = dict()

# (option strings, argparse kwargs, what it means here)
UNSUPPORTED = [
    (("--refresh_bucket_size",), _VALUE,
     "ignored: bing_bert repeated one dataset's batches to suit APEX's DistributedDataParallel "
     "buckets; here there is one prepared dataset and DeepSpeed's engine reduces the gradients"),
    (("--use_nvidia_dataset",), _BOOL,
     "not supported: NVIDIA's HDF5 pre-training shards are not read here; the data is "
     "prepare_data.py output (--data_path_prefix or --data_dir)"),
    (("--finetune",), _BOOL,
     "not supported: this example pre-trains (masked LM + next sentence), as bing_bert's "
     "deepspeed_train.py did; fine-tuning is not part of it"),
    (("--use_pretrain",), _BOOL,
     "not supported: bing_bert started from the weights of bert_model_file; here the model "
     "starts from random weights (nothing is downloaded)"),
    (("--max_predictions_per_seq", "--max_pred"), _VALUE,
     "fixed when the data is prepared (prepare_data.py --max_predictions_per_seq); ignored here"),
    (("--masked_lm_prob", "--mlm_prob"), _VALUE,
     "fixed when the data is prepared (prepare_data.py --masked_lm_prob); ignored here"),
    (("--do_lower_case",), _BOOL,
     "set when the data is prepared (prepare_data.py's WordPiece tokenizer lower-cases); "
     "ignored here"),
    (("--max_steps_per_epoch",), _VALUE,
     "not supported: training here is one stream of optimizer steps over the prepared data, "
     "not bing_bert's epochs of data shards; use --max_steps"),
    (("--ckpt_to_save",), dict(nargs="+"),
     "not supported: bing_bert saved at the end of the listed epochs; here checkpoints go to "
     "<output_dir>/checkpoints/step_N every --save_every optimizer steps"),
    (("--progressive_layer_drop",), _BOOL,
     "not supported: bing_bert's progressive-layer-drop model (modelingpreln_layerdrop.py) is "
     "not part of this example; every layer runs every step"),
    (("--no_cuda",), _BOOL,
     "ignored: the device is DeepSpeed's accelerator (DS_ACCELERATOR=cpu for the CPU)"),
    (("--fp16",), _BOOL,
     "ignored: the precision comes from the DeepSpeed config (its \"fp16\" / \"bf16\" blocks)"),
    (("--loss_scale",), _VALUE,
     "ignored: the loss scale comes from the DeepSpeed config (fp16.loss_scale)"),
    (("--train_batch_size",), _VALUE,
     "ignored: the batch comes from the DeepSpeed config (train_batch_size, "
     "train_micro_batch_size_per_gpu)"),
    (("--gradient_accumulation_steps",), _VALUE,
     "ignored: gradient accumulation comes from the DeepSpeed config "
     "(gradient_accumulation_steps, or train_batch_size / (micro batch x ranks))"),
    (("--files_location",), _VALUE,
     "ignored: bing_bert's Azure ML storage prefix; give the data with --data_path_prefix"),
    (("--display_progress_bar",), _BOOL,
     "ignored: the progress line shows on a terminal (--no_progress_bar turns it off)"),
]
KERNEL_OPTIONS = [
    (("--stochastic_mode",), "stochastic_mode"),
    (("--attention_dropout_checkpoint",), "attn_dropout_checkpoint"),
    (("--normalize_invertible",), "normalize_invertible"),
    (("--gelu_checkpoint",), "gelu_checkpoint"),
]


def _dest(option: str) -> str:
    return "bb_" + option.lstrip("-").replace("-", "_")


def add_bing_bert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add bing_bert's flags to ``parser`` (the example's own flags are added by it)."""
    g = parser.add_argument_group(
        "bing_bert", "DeepSpeedExamples' bing_bert command line (see README: \"From "
        "DeepSpeedExamples' bing_bert\")")
    g.add_argument("--cf", "--config-file", "--config_file", dest="cf", default=None,
                   help="bing_bert's config file (name, bert_model_config, "
                   "mixed_seq_training, ...): the BERT config, the job name and the "
                   "--lr_schedule values; instead of --bert_config")
    g.add_argument("--data_path_prefix", default=None,
                   help="the prepared data (prepare_data.py output) at this folder or at "
                   "<folder>/seq<max_seq_length>; instead of --data_dir")
    g.add_argument("--validation_data_path_prefix", default=None,
                   help="evaluate on the eval split of the prepared data at this folder (or "
                   "<folder>/seq<max_seq_length>) instead of the training data's")
    g.add_argument("--lr_schedule", default=None, choices=LR_SCHEDULES, help=LR_HELP)
    g.add_argument("--lr_offset", type=float, default=None,
                   help="added to the scheduled learning rate (bing_bert's --lr_offset); "
                   "alone it means --lr_schedule LE, bing_bert's default")
    g.add_argument("--load_training_checkpoint", "--load_cp", default=None,
                   help="bing_bert's name of --load_checkpoint_dir")
    g.add_argument("--load_checkpoint_id", "--load_cp_id", default=None,
                   help="bing_bert's name of --load_checkpoint_tag")
    g.add_argument("--rewarmup", **_BOOL, default=None,
                   help="with --lr_schedule and a resumed checkpoint: restart the schedule "
                   "(warmup included) at the resumed step")
    for options, kwargs, note in UNSUPPORTED:
        g.add_argument(*options, dest=_dest(options[0]), default=argparse.SUPPRESS,
                       help=f"bing_bert: {note}", **kwargs)
    for options, name in KERNEL_OPTIONS:
        g.add_argument(*options, dest=_dest(options[0]), default=argparse.SUPPRESS, **_BOOL,
                       help=f"bing_bert: DeepSpeed transformer kernel option {name} (dense "
                       f"runs with --deepspeed_transformer_kernel only)")
    return parser


def truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "1", "yes")
    return bool(value)


def kernel_options(args) -> dict:
    """bing_bert's transformer-kernel flags given, as DeepSpeedTransformerConfig arguments."""
    return {name: truthy(getattr(args, _dest(options[0])))
            for options, name in KERNEL_OPTIONS if hasattr(args, _dest(options[0]))}


def _shown(value) -> str:
    if value is True:
        return ""
    if isinstance(value, list):
        return " " + " ".join(str(v) for v in value)
    return f" {value}"


# flags fixed by the prepared data: the meta.json key holding the data's value
_DATA_KEYS = {"--max_predictions_per_seq": "max_predictions_per_seq",
              "--masked_lm_prob": "masked_lm_prob"}


def flag_notes(args, meta: Optional[dict] = None) -> list:
    """One line per bing_bert flag given that is not one of this example's own: what it maps
    to, or why it is not supported here (``meta``: the prepared data's meta.json)."""
    lines = []
    for options, _, note in UNSUPPORTED:
        dest = _dest(options[0])
        if hasattr(args, dest):
            key = _DATA_KEYS.get(options[0])
            if key and meta and key in meta:
                note = f"{note} (the prepared data has {meta[key]})"
            lines.append(f"bing_bert flag {options[0]}{_shown(getattr(args, dest))}: {note}")
    kernel_on = bool(getattr(args, "deepspeed_transformer_kernel", False)) and \
        not getattr(args, "deepspeed_sparse_attention", False)
    for options, name in KERNEL_OPTIONS:
        dest = _dest(options[0])
        if not hasattr(args, dest):
            continue
        if kernel_on:
            what = f"passed to DeepSpeed's transformer kernel ({name})"
        elif getattr(args, "deepspeed_sparse_attention", False):
            what = ("ignored: an option of DeepSpeed's transformer kernel, which cannot run "
                    "sparse attention (--deepspeed_sparse_attention turns it off)")
        else:
            what = ("ignored: an option of DeepSpeed's transformer kernel, which is off "
                    "(--deepspeed_transformer_kernel not given)")
        lines.append(f"bing_bert flag {options[0]}{_shown(getattr(args, dest))}: {what}")
    if getattr(args, "deepscale", False):
        lines.append("bing_bert flag --deepscale: DeepSpeed's deprecated name of --deepspeed "
                     "(a switch for user code); nothing to do")
    return lines
