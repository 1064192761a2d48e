"""Checkpoints that record their sparse-attention layout and say when they are complete.

DeepSpeed 0.19's ``engine.save_checkpoint(save_dir, tag)`` writes the tag's files in place
(``torch.save`` straight to the final names) and then, on rank 0, writes ``save_dir/latest``
(truncate, then write) without waiting for the other ranks' files; ``load_checkpoint`` without
a tag reads ``latest``, and with a tag it takes whatever files are there (a tag that is not
there ends in an ``AssertionError`` from inside DeepSpeed). Nothing records which layout a
checkpoint was trained with. So a run killed while it saves can leave a folder that looks like
a checkpoint, or a ``latest`` naming one whose other ranks' files were never written.

``save_checkpoint(engine, save_dir, tag, run=run)`` here:

1. rank 0 writes ``<tag>/sparse_attention_layout.json`` first (the layout record: sparse or
   dense, the ``sparse_attention`` block, the layout checksum and its length; the step), after
   removing an older ``checkpoint_complete.json`` of the same tag;
2. every rank writes DeepSpeed's files (``engine.save_checkpoint(..., save_latest=False)``,
   which ends with a barrier);
3. rank 0 flushes the tag's files to disk (fsync), writes ``<tag>/checkpoint_complete.json``
   (the record again, and each file's size) by renaming a temporary file into place, and only
   then points ``latest`` at the tag (also renamed into place).

A tag folder with the layout record and without the completion marker is a save that did not
finish. ``resolve_checkpoint(load_dir, tag)`` picks what to resume: without a tag the newest
complete checkpoint (one line names the unfinished ones skipped); with a tag that one, if it
is complete. Checkpoints written before these files existed (neither file) are taken as
DeepSpeed takes them (``latest``, or the tag asked for), and their layout cannot be checked.
``check_resume_layout(record, run)`` refuses to resume with another layout than the
checkpoint's, unless told to allow it.
"""
from __future__ import annotations

import difflib
import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from .run import LauncherConfigError, _rank

logger = logging.getLogger("sparse_attn.launcher")

RECORD_NAME = "sparse_attention_layout.json"
COMPLETE_NAME = "checkpoint_complete.json"
LATEST_NAME = "latest"
FORMAT = 1
ALLOW_FLAG = "--allow_layout_change"
# DeepSpeed's files in a tag folder (model states of every layout of ranks, ZeRO shards)
_DS_PATTERNS = ("*model_states.pt", "*optim_states.pt", "zero_pp_rank_*")


class CheckpointError(LauncherConfigError):
    """A checkpoint that cannot be resumed: missing, unfinished, damaged; the message says
    which and what is there."""


class LayoutChangeError(CheckpointError):
    """Resuming with a layout other than the checkpoint's, without allowing it."""


# -- the layout record ---------------------------------------------------------------------
def layout_record(run) -> dict:
    """What a checkpoint records of the attention it was trained with: ``sparse_attention``
    (on or off), and when on: ``mode``, ``block``, ``sparse_attention_block`` (every setting,
    defaults filled in), ``layout_length`` and ``layout_checksum`` (of the layout at that
    length), ``num_heads``."""
    if run is None or not run.enabled:
        return {"sparse_attention": False}
    from sparse_attn.config import resolved

    return {"sparse_attention": True, "mode": run.block_model.mode, "block": run.block,
            "sparse_attention_block": resolved(run.block_model),
            "layout_length": run.layout_length, "layout_checksum": run.layout_checksum,
            "num_heads": run.sparsity_config.num_heads}


def describe_record(record: Optional[dict]) -> str:
    if record is None:
        return "an unrecorded layout"
    if not record.get("sparse_attention"):
        return "dense attention (no sparse attention)"
    text = f"sparse attention: mode {record.get('mode')}, block {record.get('block')}"
    if record.get("layout_checksum"):
        text += f", layout {record['layout_checksum']}"
        if record.get("layout_length"):
            text += f" at {record['layout_length']} tokens"
    return text


def _checksum_at(run, length: Optional[int]) -> Optional[str]:
    """The checksum of this run's layout rule at ``length`` tokens (None if it cannot make
    one there, e.g. a length that is not a multiple of its block)."""
    if length is None or not run.enabled:
        return None
    if length == run.layout_length and run.layout_checksum:
        return run.layout_checksum
    from sparse_attn.sparsity_config import layout_checksum

    try:
        return layout_checksum(run.sparsity_config.make_layout(int(length)))
    except (ValueError, RuntimeError):
        return None


def layout_differences(saved: dict, run) -> List[str]:
    """What differs between a checkpoint's layout record and this run: "sparse or dense",
    the names of the ``sparse_attention`` settings that differ, "layout checksum" (this run's
    layout at the checkpoint's length against the recorded one). Empty when they agree."""
    here = layout_record(run)
    if bool(saved.get("sparse_attention")) != here["sparse_attention"]:
        return ["sparse or dense"]
    if not here["sparse_attention"]:
        return []
    diffs = []
    old, new = saved.get("sparse_attention_block") or {}, here["sparse_attention_block"]
    keys = sorted(set(old) | set(new), key=lambda k: ({"mode": 0, "block": 1}.get(k, 2), k))
    if old.get("mode") != new.get("mode"):
        keys = ["mode", "block"]  # other modes have other settings: not listed one by one
    diffs += [key for key in keys if old.get(key) != new.get(key)]
    recorded = saved.get("layout_checksum")
    if recorded and _checksum_at(run, saved.get("layout_length")) != recorded:
        diffs.append("layout checksum")
    return diffs


def _log_rank0(level: int, msg: str) -> None:
    if _rank() == 0:
        logger.log(level, "%s", msg)


def check_resume_layout(saved: Optional[dict], run, *, allow_change: bool = False,
                        checkpoint: str = "the checkpoint",
                        flag: str = ALLOW_FLAG) -> Optional[str]:
    """Compare a checkpoint's layout record (``saved``; None for a checkpoint without one)
    with this run's; raise ``LayoutChangeError`` naming both when they differ, unless
    ``allow_change``. Returns the one line logged (rank 0), or None when nothing was said:
    no record ("cannot be checked"), a change allowed by ``flag``, or the same layout rule at
    another sequence length."""
    here = layout_record(run)
    if saved is None:
        line = (f"{checkpoint} has no layout record ({RECORD_NAME}: saved before checkpoints "
                f"recorded it): whether it was trained with this run's {describe_record(here)} "
                f"cannot be checked")
        _log_rank0(logging.WARNING, line)
        return line
    diffs = layout_differences(saved, run)
    length = saved.get("layout_length")
    # this run's layout shown at the checkpoint's length, so that the checksums compare
    shown = dict(here)
    if here["sparse_attention"] and length and length != here.get("layout_length"):
        shown.update(layout_length=length, layout_checksum=_checksum_at(run, length))
    if diffs:
        if not allow_change:
            raise LayoutChangeError(
                f"{checkpoint} was trained with {describe_record(saved)}; this run has "
                f"{describe_record(shown)} (different: {', '.join(diffs)}). Resuming would go "
                f"on training with another attention layout: resume with the checkpoint's "
                f"\"sparse_attention\" block (and --deepspeed_sparse_attention as it was), or "
                f"pass {flag} to change the layout on purpose")
        line = (f"{flag}: resuming {checkpoint}, trained with {describe_record(saved)}, with "
                f"{describe_record(shown)} (different: {', '.join(diffs)})")
        _log_rank0(logging.WARNING, line)
        return line
    if here["sparse_attention"] and length and here.get("layout_length") \
            and length != here["layout_length"]:
        line = (f"{checkpoint} was trained at {length} tokens, this run at "
                f"{here['layout_length']}: the same sparse_attention block, whose layout at "
                f"{length} tokens is the checkpoint's ({saved.get('layout_checksum')})")
        _log_rank0(logging.INFO, line)
        return line
    return None


# -- finding the checkpoint to resume ---------------------------------------------------------
@dataclass
class Checkpoint:
    """One tag folder of a checkpoint directory.

    ``state``: "complete" (marked complete, files as saved), "incomplete" (its save started
    and did not finish), "damaged" (marked complete, but a file is missing or has another
    size), or "unrecorded" (DeepSpeed's files without this module's records: saved by plain
    DeepSpeed or an older version; taken as DeepSpeed takes it). ``layout``: its layout
    record, or None."""

    tag: str
    path: str
    state: str
    step: Optional[int] = None
    layout: Optional[dict] = None
    why: str = ""

    def label(self) -> str:
        text = self.state
        if self.step is not None:
            text += f", step {self.step}"
        return f"{self.tag} ({text})"


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_deepspeed_files(path: str) -> bool:
    return any(glob.glob(os.path.join(path, p)) for p in _DS_PATTERNS)


def inspect_checkpoint(load_dir: str, tag: str) -> Optional[Checkpoint]:
    """The state of ``load_dir/tag``, or None when it holds no checkpoint at all."""
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        return None
    marker = _read_json(os.path.join(path, COMPLETE_NAME))
    record = _read_json(os.path.join(path, RECORD_NAME))
    if marker is not None:
        layout = marker.get("layout", (record or {}).get("layout"))
        step = marker.get("step")
        for name, size in sorted((marker.get("files") or {}).items()):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return Checkpoint(tag, path, "damaged", step, layout,
                                  f"{name} is missing (it was saved with {size} bytes)")
            if os.path.getsize(file) != size:
                return Checkpoint(tag, path, "damaged", step, layout,
                                  f"{name} has {os.path.getsize(file)} bytes, {size} when "
                                  f"saved")
        return Checkpoint(tag, path, "complete", step, layout)
    if record is not None:
        return Checkpoint(tag, path, "incomplete", record.get("step"), record.get("layout"),
                          f"its save did not finish (no {COMPLETE_NAME})")
    if _has_deepspeed_files(path):
        return Checkpoint(tag, path, "unrecorded", None, None,
                          f"no {RECORD_NAME} or {COMPLETE_NAME}: saved by plain DeepSpeed or "
                          f"an older version of this code")
    return None


def scan_checkpoints(load_dir: str) -> List[Checkpoint]:
    """Every tag folder of ``load_dir`` that holds a checkpoint (or the start of one), in
    step order (unrecorded ones by name, first)."""
    found = []
    for name in sorted(os.listdir(load_dir)):
        if name.startswith("."):
            continue
        ckpt = inspect_checkpoint(load_dir, name)
        if ckpt is not None:
            found.append(ckpt)
    return sorted(found, key=lambda c: (c.step is not None, c.step or 0, c.tag))


def _present(found: List[Checkpoint]) -> str:
    return ", ".join(c.label() for c in found) if found else "none"


def _missing_dir_hint(load_dir: str) -> str:
    nested = os.path.join(load_dir, "checkpoints")
    if os.path.isdir(nested):
        return f" (did you mean {nested}?)"
    return ""


def resolve_checkpoint(load_dir: str, tag: Optional[str] = None, *,
                       tag_flag: str = "--load_checkpoint_tag",
                       dir_flag: str = "--load_checkpoint_dir") -> Checkpoint:
    """The checkpoint to resume from ``load_dir``: ``tag`` if given (it must be there and
    complete, or unrecorded), else the newest complete one (by its recorded step; one log
    line names unfinished or damaged ones newer than it, skipped), else what DeepSpeed's
    ``latest`` names when the folder holds only unrecorded checkpoints. Raises
    ``CheckpointError`` naming the tag asked for and the tags present."""
    if not os.path.exists(load_dir):
        raise CheckpointError(f"{dir_flag} {load_dir} does not exist"
                              f"{_missing_dir_hint(load_dir)}")
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"{dir_flag} {load_dir} is a file, not a checkpoint directory")
    found = scan_checkpoints(load_dir)
    if not found:
        raise CheckpointError(f"{dir_flag} {load_dir} holds no checkpoint (tags present: "
                              f"none){_missing_dir_hint(load_dir)}")
    complete = [c for c in found if c.state == "complete"]
    if tag is not None:
        chosen = next((c for c in found if c.tag == tag), None)
        if chosen is None:
            close = difflib.get_close_matches(tag, [c.tag for c in found], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CheckpointError(f"{tag_flag} {tag}: {load_dir} has no checkpoint {tag}"
                                  f"{hint}; tags present: {_present(found)}")
        if chosen.state in ("incomplete", "damaged"):
            raise CheckpointError(
                f"{tag_flag} {tag}: {chosen.path} is {chosen.state} ({chosen.why}) and cannot "
                f"be resumed; complete checkpoints: {_present(complete)}")
        return chosen
    if complete:
        chosen = complete[-1]
        newer = [c for c in found if c.state in ("incomplete", "damaged")
                 and (c.step is None or c.step >= chosen.step)]
        if newer:
            _log_rank0(logging.WARNING,
                       f"{load_dir}: skipped " + "; ".join(f"{c.tag} ({c.state}: {c.why})"
                                                           for c in newer)
                       + f"; resuming from the newest complete checkpoint, {chosen.tag}")
        return chosen
    latest = os.path.join(load_dir, LATEST_NAME)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            named = f.read().strip()
        chosen = next((c for c in found if c.tag == named), None)
        if chosen is not None and chosen.state == "unrecorded":
            _log_rank0(logging.WARNING,
                       f"{load_dir}: resuming {named}, named by DeepSpeed's '{LATEST_NAME}' "
                       f"file ({chosen.why}): whether its save finished cannot be checked")
            return chosen
    raise CheckpointError(
        f"{dir_flag} {load_dir} holds no complete checkpoint to resume (tags present: "
        f"{_present(found)}); give {tag_flag} to pick one")


# -- saving ---------------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` is either the old file or the whole new
    one: a temporary file beside it, flushed to disk, renamed into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tag_files(path: str) -> dict:
    """Relative path -> size of every file under ``path`` but the completion marker, each
    flushed to disk first (so the marker never describes data still in the page cache)."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            file = os.path.join(root, name)
            rel = os.path.relpath(file, path)
            if rel == COMPLETE_NAME or ".tmp" in name:
                continue
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            out[rel] = os.path.getsize(file)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(engine, save_dir: str, tag: str, *, run=None, client_state=None,
                    step: Optional[int] = None, extra: Optional[dict] = None,
                    before_commit: Optional[Callable[[str], None]] = None) -> str:
    """``engine.save_checkpoint`` that records the layout (``run``: the
    ``SparseAttentionRun``; None records dense attention) and marks the checkpoint complete
    only once every rank's files are written; ``latest`` is updated after that. Every rank
    calls it (as DeepSpeed's). ``extra``: more keys for the record (informational).
    ``before_commit(path)``: called on every rank after the files are written and before the
    checkpoint is marked complete (a test hook). Returns the tag's folder."""
    path = os.path.join(save_dir, tag)
    step = engine.global_steps if step is None else step
    record = {"format": FORMAT, "tag": tag, "step": step, "layout": layout_record(run),
              "saved_at": time.time(), **(extra or {})}
    if engine.global_rank == 0:
        os.makedirs(path, exist_ok=True)
        marker = os.path.join(path, COMPLETE_NAME)
        if os.path.exists(marker):  # saving over an older checkpoint of this tag
            os.remove(marker)
            _fsync_dir(path)
        _write_atomic(os.path.join(path, RECORD_NAME), json.dumps(record, indent=2) + "\n")
    _barrier()  # the record and the removed marker come before any rank's files
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {},
                           save_latest=False)  # ends with a barrier: all files written
    if before_commit is not None:
        before_commit(path)
    if engine.global_rank == 0:
        files = _tag_files(path)
        _write_atomic(os.path.join(path, COMPLETE_NAME),
                      json.dumps(dict(record, files=files), indent=2) + "\n")
        _fsync_dir(path)
        _write_atomic(os.path.join(save_dir, LATEST_NAME), tag)
        _fsync_dir(save_dir)
    _barrier()
    return path
