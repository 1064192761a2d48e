"""Prepare a DeepSpeed run with (or without) sparse attention.

``prepare_sparse_attention(args, num_heads=...)`` reads the DeepSpeed config named by
``--deepspeed_config``, validates its ``"sparse_attention"`` block, removes it (DeepSpeed 0.19
raises ``DeepSpeedConfigError`` on it), writes the cleaned config to a private temporary file
and points ``args.deepspeed_config`` there, so both ``run.initialize(...)`` and a script's own
``deepspeed.initialize(args=args, ...)`` see a config DeepSpeed accepts. The user's file is
only read.
"""
from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

logger = logging.getLogger("sparse_attn.launcher")

#: Environment variable: set to 1 to let DeepSpeed build and use its shared-memory CPU
#: collective op (a C++ JIT build of a minute or more) on the CPU accelerator.
ENV_CPU_SHM_COMM = "SPARSE_ATTN_DS_SHM_COMM"


class LauncherConfigError(ValueError):
    """The run cannot start: a bad or missing config, flag or data; the message says why."""


def _ensure_log_handler() -> None:
    """Make the launcher's INFO lines visible: its own level is INFO unless the user set one
    (so a root configured at WARNING still shows them), and it gets a stderr handler when
    the script configured no logging at all."""
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[sparse_attn.launcher] %(levelname)s: %(message)s"))
    logger.addHandler(handler)


def _rank() -> int:
    for name in ("RANK", "LOCAL_RANK"):
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                pass
    return 0


@dataclass
class SparseAttentionRun:
    """What ``prepare_sparse_attention`` decided for this run.

    Attributes:
        enabled: sparse attention is on (flag given and block present).
        block_model: the validated ``sparse_attention`` block (pydantic model), or None.
        sparsity_config: the ``SparsityConfig`` for the model's head count, or None (dense).
        ds_config: the DeepSpeed config without the block (a dict; edit it before
            ``initialize`` if needed, e.g. to fill monitor output paths).
        ds_config_path: the temporary file holding ``ds_config`` (``args.deepspeed_config``
            points to it), or None when prepared from a dict without args.
        user_config_path: the user's config file (never written), or None for a dict.
        max_seq_length: the sequence length the run was prepared for (as given).
        padded_seq_length: ``max_seq_length`` rounded up to the block (property).
        layout_checksum: checksum of the layout at ``padded_seq_length`` (same on every rank).
        transformer_kernel_disabled: ``--deepspeed_transformer_kernel`` was turned off.
    """

    enabled: bool
    block_model: Any
    sparsity_config: Any
    ds_config: dict
    ds_config_path: Optional[str] = None
    user_config_path: Optional[str] = None
    max_seq_length: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    layout_checksum: Optional[str] = None
    transformer_kernel_disabled: bool = False
    args: Any = field(default=None, repr=False)

    @property
    def padded_seq_length(self) -> Optional[int]:
        """``max_seq_length`` rounded up to a multiple of the block when sparse attention is
        on (inputs are padded to it, as bing_bert's ``pad_to_block_size`` did); equal to
        ``max_seq_length`` for dense runs; None when ``max_seq_length`` is unknown."""
        if self.max_seq_length is None:
            return None
        if self.sparsity_config is None:
            return self.max_seq_length
        return _round_up(self.max_seq_length, self.block)

    @property
    def layout_length(self) -> Optional[int]:
        """The sequence length the layout is built at (``padded_seq_length``; None when
        unknown or dense): patched layers use it, and ``layout_checksum`` is its."""
        if self.sparsity_config is None:
            return None
        return self.padded_seq_length

    @property
    def block(self) -> Optional[int]:
        return self.sparsity_config.block if self.sparsity_config is not None else None

    def describe(self) -> str:
        if not self.enabled:
            return "dense attention"
        mode = getattr(self.block_model, "mode", "fixed")
        text = f"sparse attention: mode {mode}, block {self.block}"
        if self.layout_checksum:
            text += f", layout {self.layout_checksum}"
        return text

    # -- model -------------------------------------------------------------------------
    def patch_model(self, model, pad_token_id: Optional[int] = None):
        """Put sparse self-attention into ``model``'s BERT encoder and pad/unpad around it.

        No-op (returns ``model``) when sparse attention is off. Handles transformers 5
        ``Bert*``/``Roberta*`` models and user (bing_bert-style) BERT classes; a model that
        already holds ``BertSparseSelfAttention`` layers only gets the padding.
        """
        if not self.enabled:
            return model
        from .patching import patch_bert_model

        return patch_bert_model(model, self.sparsity_config, pad_token_id=pad_token_id,
                                max_position=self.layout_length)

    # -- DeepSpeed ---------------------------------------------------------------------
    def write_config(self) -> str:
        """(Re)write ``ds_config`` to the temporary file and return its path."""
        if self.ds_config_path is None:
            self.ds_config_path = _temp_config_path()
        with open(self.ds_config_path, "w") as f:
            json.dump(self.ds_config, f, indent=2)
        if self.args is not None:
            self.args.deepspeed_config = self.ds_config_path
        return self.ds_config_path

    def initialize(self, **kwargs):
        """``deepspeed.initialize`` with the cleaned config; returns what it returns.

        Pass ``model``, ``model_parameters``, ``optimizer``... as to ``deepspeed.initialize``.
        After it, every rank's layout checksum (of the layouts the model's sparse layers use)
        is compared across ranks; ranks that disagree raise.
        """
        import deepspeed

        if self.args is not None:
            self.write_config()
            result = deepspeed.initialize(args=self.args, **kwargs)
        else:
            result = deepspeed.initialize(config=copy.deepcopy(self.ds_config), **kwargs)
        self.check_layouts_match(kwargs.get("model"))
        return result

    def check_layouts_match(self, model=None) -> None:
        """Compare this rank's layout checksum with every other rank's; raise if they differ.

        With ``model``, the checksum is that of the layouts its sparse layers actually use
        (it replaces ``layout_checksum``; a warning says when it differs from the config's
        layout at ``padded_seq_length``)."""
        if not self.enabled:
            return
        if model is not None:
            found = model_layout_checksums(model)
            if found:
                local = found[0] if len(found) == 1 else _combine(found)
                if self.layout_checksum is not None and local != self.layout_checksum:
                    logger.warning(
                        "the model's sparse layers use layout %s, not the config's layout %s "
                        "at %s tokens (were they built for another length?)", local,
                        self.layout_checksum, self.padded_seq_length)
                self.layout_checksum = local
        if self.layout_checksum is None:
            return
        from sparse_attn.layout_agreement import check_same_layout

        sums = check_same_layout(self.layout_checksum)
        if sums is None:
            logger.info("rank %d: %s", _rank(), self.describe())
            return
        logger.info("rank %d: %s (same on all %d ranks)", _rank(), self.describe(), len(sums))


def _round_up(length: int, block: int) -> int:
    return -(-length // block) * block


def _combine(checksums) -> str:
    import hashlib

    return "combined:" + hashlib.sha1("|".join(checksums).encode()).hexdigest()[:12]


def model_layout_checksums(model) -> list:
    """Checksums (sorted, distinct) of the layouts the sparse layers of ``model`` use: its
    ``SparseSelfAttention`` modules and, for a transformers model switched to
    ``"block_sparse"``, the layout stored in its config."""
    from sparse_attn.sequence_parallel import SequenceParallelSparseAttention
    from sparse_attn.sparse_self_attention import SparseSelfAttention
    from sparse_attn.sparsity_config import layout_checksum

    # A sequence-parallel layer counts with its whole layout (the same on every rank), not
    # with the head slice its inner SparseSelfAttention runs on this rank.
    parallel = [m for m in model.modules() if isinstance(m, SequenceParallelSparseAttention)]
    inner = {id(m.local_attention) for m in parallel}
    sums = {m.layout_checksum for m in parallel}
    sums |= {layout_checksum(m.master_layout) for m in model.modules()
             if isinstance(m, SparseSelfAttention) and id(m) not in inner}
    settings = getattr(getattr(model, "config", None), "sparse_attention", None)
    if isinstance(settings, dict) and "transformers" in sys.modules:
        from sparse_attn import hf

        sc = hf.get_sparsity_config(model)
        if sc is not None:
            length = int(settings.get("max_seq_length") or 0)
            if length:
                length = -(-length // sc.block) * sc.block
                sums.add(layout_checksum(sc.make_layout(length)))
    return sorted(sums)


_TEMP_DIRS = []


def _temp_config_path() -> str:
    d = tempfile.mkdtemp(prefix="sparse_attn_ds_config_")
    _TEMP_DIRS.append(d)
    return os.path.join(d, "ds_config.json")


@atexit.register
def _remove_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def avoid_cpu_op_builds() -> bool:
    """On DeepSpeed's CPU accelerator, keep DeepSpeed from JIT-building its shared-memory
    collective op (``deepspeed_shm_comm``, a C++ build of a minute or more on first use):
    collectives then go through plain gloo. Set ``SPARSE_ATTN_DS_SHM_COMM=1`` to keep the op.
    Returns True when the op was turned off. (The other CPU build, ``fused_adam``, is avoided
    by the config: ``"torch_adam": true`` in the optimizer params.)
    """
    if os.environ.get(ENV_CPU_SHM_COMM, "0") == "1":
        return False
    try:
        from deepspeed.accelerator import get_accelerator
        import deepspeed.ops

        if get_accelerator().device_name() != "cpu":
            return False
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        return True
    except Exception:  # DeepSpeed missing or changed: nothing to avoid
        return False


def prepare_from_config(config, *, sparse_attention: bool, num_heads: int,
                        max_seq_length: Optional[int] = None,
                        max_position_embeddings: Optional[int] = None,
                        transformer_kernel: bool = False) -> SparseAttentionRun:
    """Validate a DeepSpeed config (path or dict) and decide dense or sparse attention.

    The function behind ``prepare_sparse_attention``, for code without argparse (e.g. a
    Hugging Face ``Trainer``: pass ``run.ds_config`` as ``TrainingArguments(deepspeed=...)``).
    On DeepSpeed's CPU accelerator it also calls ``avoid_cpu_op_builds()``.

    A ``max_seq_length`` that is not a multiple of the block is padded to the next multiple
    (as bing_bert did): the layout is built for that length (``run.padded_seq_length``),
    with one log line.

    Raises ``LauncherConfigError`` for: no config, a missing or malformed file, an invalid
    block, ``sparse_attention=True`` without a block, ``max_seq_length`` (padded to the block
    when sparse) above ``max_position_embeddings``.
    """
    from sparse_attn.config import split_deepspeed_config

    _ensure_log_handler()
    avoid_cpu_op_builds()
    if config is None:
        raise LauncherConfigError(
            "no DeepSpeed config: pass --deepspeed_config ds.json (a JSON file with the "
            "\"sparse_attention\" block)")
    user_path = None
    if not isinstance(config, dict):
        user_path = os.fspath(config)
        if not os.path.isfile(user_path):
            raise LauncherConfigError(f"DeepSpeed config {user_path} does not exist")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block_model, cleaned = split_deepspeed_config(config)
        for w in caught:  # e.g. keys of other modes, ignored: one log line each
            logger.warning("%s", w.message)
    except ValueError as err:
        where = f"{user_path}: " if user_path and user_path not in str(err) else ""
        raise LauncherConfigError(f"{where}{err}") from None
    source = user_path or "the DeepSpeed config"

    if max_seq_length is not None and max_position_embeddings is not None \
            and max_seq_length > max_position_embeddings:
        raise LauncherConfigError(
            f"max_seq_length {max_seq_length} is above the model's max_position_embeddings "
            f"{max_position_embeddings}: extend the position embeddings first "
            f"(SparseAttentionUtils.extend_position_embedding(model, {max_seq_length}), or "
            f"raise max_position_embeddings in the model config)")

    if not sparse_attention:
        if block_model is not None:
            logger.info(
                "%s has a \"sparse_attention\" block (mode %s); it is valid but ignored "
                "because --deepspeed_sparse_attention is not set: dense attention", source,
                block_model.mode)
        return SparseAttentionRun(
            enabled=False, block_model=block_model, sparsity_config=None, ds_config=cleaned,
            user_config_path=user_path, max_seq_length=max_seq_length,
            max_position_embeddings=max_position_embeddings)

    if block_model is None:
        raise LauncherConfigError(
            f"--deepspeed_sparse_attention is set but {source} has no \"sparse_attention\" "
            f"block; add one, e.g. \"sparse_attention\": {{\"mode\": \"fixed\", \"block\": 16}} "
            f"(see configs/modes/), or drop the flag for dense attention")
    block = block_model.block
    layout_length = max_seq_length
    if max_seq_length is not None and max_seq_length % block != 0:
        layout_length = _round_up(max_seq_length, block)
        if max_position_embeddings is not None and layout_length > max_position_embeddings:
            raise LauncherConfigError(
                f"max_seq_length {max_seq_length}, padded to a multiple of "
                f"sparse_attention.block {block}, is {layout_length}: above the model's "
                f"max_position_embeddings {max_position_embeddings}: extend the position "
                f"embeddings first (SparseAttentionUtils.extend_position_embedding(model, "
                f"{layout_length}), or raise max_position_embeddings in the model config), or "
                f"use a max_seq_length that is a multiple of {block}")
        logger.info(
            "max_seq_length %d is not a multiple of sparse_attention.block %d: inputs are "
            "padded to %d tokens (the next multiple) and the layout is built for that length",
            max_seq_length, block, layout_length)
    try:
        sparsity_config = block_model.build(num_heads)
    except ValueError as err:
        raise LauncherConfigError(f"{source}: sparse_attention: {err}") from None
    checksum = None
    if layout_length is not None:
        from sparse_attn.sparsity_config import layout_checksum

        try:
            layout = sparsity_config.make_layout(layout_length)
        except ValueError as err:
            what = f"max_seq_length {max_seq_length}" + (
                f" (padded to {layout_length})" if layout_length != max_seq_length else "")
            raise LauncherConfigError(
                f"{source}: sparse_attention cannot make a layout for {what}: {err}") from None
        checksum = layout_checksum(layout)
    run = SparseAttentionRun(
        enabled=True, block_model=block_model, sparsity_config=sparsity_config,
        ds_config=cleaned, user_config_path=user_path, max_seq_length=max_seq_length,
        max_position_embeddings=max_position_embeddings, layout_checksum=checksum)
    if transformer_kernel:
        logger.warning(
            "--deepspeed_transformer_kernel is turned off: DeepSpeed's transformer kernels "
            "cannot run sparse attention")
        run.transformer_kernel_disabled = True
    logger.info("%s (from %s, %d heads)", run.describe(), source, num_heads)
    return run


def prepare_sparse_attention(args, *, num_heads: int, max_seq_length: Optional[int] = None,
                             max_position_embeddings: Optional[int] = None) -> SparseAttentionRun:
    """Prepare a run from parsed arguments (``add_sparse_attention_arguments``).

    Reads ``args.deepspeed_config`` (or the deprecated ``args.deepscale_config``), validates
    and removes the ``sparse_attention`` block, builds the ``SparsityConfig`` for
    ``num_heads`` when ``args.deepspeed_sparse_attention`` is set, turns
    ``args.deepspeed_transformer_kernel`` off (with a warning) when sparse attention is on,
    writes the cleaned config to a temporary file and sets ``args.deepspeed_config`` to it.
    The original path is kept in ``args.deepspeed_config_user``. Safe to call again on the
    same args.
    """
    user_config = getattr(args, "deepspeed_config_user", None)
    if user_config is None:
        user_config = getattr(args, "deepspeed_config", None) or getattr(
            args, "deepscale_config", None)
    run = prepare_from_config(
        user_config, sparse_attention=bool(getattr(args, "deepspeed_sparse_attention", False)),
        num_heads=num_heads, max_seq_length=max_seq_length,
        max_position_embeddings=max_position_embeddings,
        transformer_kernel=bool(getattr(args, "deepspeed_transformer_kernel", False)))
    if run.transformer_kernel_disabled:
        args.deepspeed_transformer_kernel = False
    args.deepspeed_config_user = user_config
    if getattr(args, "deepscale_config", None) is not None:
        args.deepscale_config = None
    run.args = args
    run.write_config()
    return run
