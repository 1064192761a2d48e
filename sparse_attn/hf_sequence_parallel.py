"""DeepSpeed Ulysses sequence parallelism for transformers encoders with block-sparse attention.

DeepSpeed's Ulysses for transformers (``deepspeed.runtime.sequence_parallel.ulysses_sp``)
wraps one registered attention function: around it, an all-to-all turns this rank's shard of
the sequence (all ``H`` heads, ``seq / P`` tokens) into the full sequence of ``H / P`` heads,
and another turns the context back. Here the wrapped function is ours, registered as
``"block_sparse_ulysses"``, and it attends with the layout rows of this rank's heads.

    import deepspeed
    import sparse_attn.hf as sahf

    deepspeed.init_distributed()
    model = BertForMaskedLM(config)
    sahf.enable_sparse_attention(model, BigBirdSparsityConfig(num_heads=12, block=64))
    mpu = sahf.enable_sequence_parallel(model, sequence_parallel_size=4, micro_batch_size=1)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu, ...)
    for batch in sahf.sequence_parallel_dataloader(dataloader, model):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        labels = batch.pop("labels")                   # this rank's [batch, seq / P] shard
        logits = engine(**batch).logits
        loss = sahf.sequence_parallel_loss_part(logits, labels)
        engine.backward(loss)
        engine.step()

Decisions (and why):

* The key padding mask is carried across, not refused. DeepSpeed's wrapper passes
  ``attention_mask=None`` to the core attention (the mask transformers builds covers the
  rank's shard only), so a padded batch would silently attend to padding. Carrying the mask
  gives the one-process result (the tests check it to fp32 round-off); refusing padded
  batches would refuse the usual variable-length data, and the padding to a multiple of
  ``P * block`` that every other sequence length needs. A forward pre-hook on the base model all-gathers the ranks'
  ``[batch, seq / P]`` masks over the sequence group once per forward (``batch * seq`` bytes,
  tiny next to the activations) and passes the full mask to every layer in a keyword argument,
  which transformers hands down to the attention function and which gradient checkpointing
  replays; the padded keys are then masked exactly as in one process.
* ``position_ids`` are required. transformers 5 BERT/RoBERTa/ELECTRA pass the ``position_ids``
  the caller gave the model down to the attention function, and DeepSpeed's wrapper gathers
  them (it asserts they are there). More importantly, without them each rank's embeddings
  would number its shard from 0: a silently wrong model. The hook refuses a forward without
  them; ``sequence_parallel_dataloader`` adds the model's own positions
  (``sequence_position_ids``) before sharding.
* A separate name, ``"block_sparse_ulysses"``: DeepSpeed's registration replaces the named
  entry for the whole process, so a model on ``"block_sparse"`` (an evaluation copy, say)
  keeps running without the all-to-all. A model saved under sequence parallelism saves as a
  plain ``"block_sparse"`` model.
* One registration per process, as DeepSpeed has it (its sequence groups are created once,
  and its wrapper is built for one micro batch size, head count and head size). Further
  models with the same sizes reuse it; other sizes raise ``ValueError``.
* The model's own loss is refused (``labels=...``): it would be the mean over this rank's
  shard, not over the sequence. ``sequence_parallel_loss_part`` returns this rank's part of
  the sequence's mean; the parts add up over the group, and DeepSpeed (given ``mpu``) sums
  the gradients over the group and averages them over the data-parallel replicas.
* Heads that read the first token ([CLS]: sequence classification, multiple choice,
  next-sentence prediction) are refused: only the group's rank 0 holds that token. A base
  model's ``pooler_output`` is likewise the pooling of each rank's own first token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hf_attention import (
    SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION, SEQUENCE_PARALLEL_KWARG, SequenceParallelForward,
    _settings, _sparse_mask)
from .layout_agreement import check_same_layout
from .layout_parts import layout_checksum
from .sequence_parallel import gather_sequence_shards

__all__ = ["enable_sequence_parallel", "sequence_parallel_dataloader",
           "sequence_parallel_loss_part", "sequence_position_ids"]

# Heads that read the first token of the sequence ([CLS]), which only rank 0 of a group holds.
_FIRST_TOKEN_HEADS = ("ForSequenceClassification", "ForMultipleChoice",
                      "ForNextSentencePrediction", "BertForPreTraining")
_PLACE_ATTR = "_sparse_attn_sequence_parallel"
_IGNORE_INDEX = -100


@dataclass(frozen=True)
class _Registration:
    """What DeepSpeed's (process-wide) Ulysses wrapper was built for."""

    size: int
    micro_batch_size: int
    num_heads: int
    head_dim: int
    seq_length: Optional[int]
    wrapper: Any


_REGISTRATION: Optional[_Registration] = None


class _Place:
    """One model's place under sequence parallelism; its ``before_forward`` is the base
    model's forward pre-hook. Shared, never copied (it holds a process group)."""

    def __init__(self, model: nn.Module, size: int, rank: int, group, block: int,
                 micro_batch_size: int, seq_length: Optional[int], max_seq_length: int):
        self.model_name = type(model).__name__
        self.config = model.config
        self.size, self.rank, self.group, self.block = size, rank, group, block
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.max_seq_length = max_seq_length
        self.handles = []

    def __deepcopy__(self, memo):
        return self

    def before_forward(self, module, args, kwargs):
        """Check this rank's shard and pass the full key padding mask down (one all-gather
        over the sequence group)."""
        if self.config._attn_implementation != SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION:
            raise ValueError(
                f"{self.model_name} was made sequence-parallel but now uses "
                f"attn_implementation={self.config._attn_implementation!r}; its inputs are "
                f"shards of the sequence, which only {SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION!r} "
                f"(DeepSpeed's Ulysses around block-sparse attention) can attend over")
        if len(args) > 1:
            raise ValueError(
                f"under sequence parallelism pass {type(module).__name__}'s inputs other than "
                f"input_ids as keywords (attention_mask=..., position_ids=...)")
        ids = args[0] if args else kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            return None  # the model raises its own error
        batch, local = ref.shape[0], ref.shape[1]
        p, block = self.size, self.block
        full = local * p
        if batch != self.micro_batch_size:
            raise ValueError(
                f"a batch of {batch} sequences, but enable_sequence_parallel was given "
                f"micro_batch_size={self.micro_batch_size} (DeepSpeed's Ulysses wrapper is "
                f"built for one batch size); batch the data by {self.micro_batch_size}")
        if local % block:
            multiple = p * block
            raise ValueError(
                f"the full sequence of {full} tokens ({p} shards of {local}) is not a multiple "
                f"of sequence_parallel_size * block = {p} * {block} = {multiple}: pad it to "
                f"{-(-full // multiple) * multiple} tokens (attention_mask 0 on the padding) "
                f"before sharding; sequence_parallel_dataloader does")
        if self.seq_length is not None and full != self.seq_length:
            raise ValueError(
                f"the full sequence has {full} tokens ({p} shards of {local}) but "
                f"enable_sequence_parallel was given seq_length={self.seq_length}; pass "
                f"seq_length=None for sequences of varying length")
        if full > self.max_seq_length:
            raise ValueError(
                f"the full sequence of {full} tokens ({p} shards of {local}) exceeds the "
                f"sparse attention's max_seq_length={self.max_seq_length}")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError(
                f"under sequence parallelism {type(module).__name__} needs position_ids: this "
                f"rank's [batch, seq / P] = [{batch}, {local}] shard of the full sequence's "
                f"position ids (sequence_position_ids(model, input_ids) before sharding); "
                f"without them each rank would number its shard from 0. "
                f"sequence_parallel_dataloader adds them")
        if position_ids.dim() != 2 or position_ids.shape[-1] != local \
                or position_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}; expected this rank's "
                f"shard [batch, seq / P] = [{batch}, {local}]")
        mask = kwargs.get("attention_mask")
        if mask is not None and tuple(mask.shape) != (batch, local):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; under sequence parallelism "
                f"pass this rank's shard of the 2-D padding mask, [batch, seq / P] = "
                f"[{batch}, {local}] (1 keeps, 0 pads)")
        keep = (torch.ones(batch, local, dtype=torch.uint8, device=ref.device) if mask is None
                else (mask != 0).to(torch.uint8))
        # Every rank gathers, with or without a mask: all ranks of the group issue the same
        # collectives. One host sync tells whether any rank pads.
        keep = gather_sequence_shards(keep, self.group, dim=1).bool()
        kpm = None if bool(keep.all()) else _sparse_mask(batch, full, full, attention_mask=keep)
        kwargs[SEQUENCE_PARALLEL_KWARG] = SequenceParallelForward(self.rank, p, kpm)
        return args, kwargs


def _reject_labels(module, args, kwargs):
    if kwargs.get("labels") is not None:
        raise ValueError(
            f"under sequence parallelism {type(module).__name__}'s own loss would be the mean "
            f"over this rank's shard of the sequence, not over the sequence: call the model "
            f"without labels and take sparse_attn.hf.sequence_parallel_loss_part(logits, "
            f"labels)")
    return None


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def enable_sequence_parallel(model: nn.Module, sequence_parallel_size: int,
                             micro_batch_size: int, seq_length: Optional[int] = None):
    """Run ``model``'s block-sparse attention under DeepSpeed's Ulysses sequence parallelism
    over groups of ``sequence_parallel_size`` (``P``) ranks; return DeepSpeed's groups module
    (``deepspeed.runtime.sequence_parallel.parallel_state_sp``) for
    ``deepspeed.initialize(mpu=...)``, or None when ``P == 1`` (nothing changes).

    Args:
        model: a transformers model already switched with ``enable_sparse_attention``; a base
            model or a token-level head (masked LM, token classification, question
            answering, ELECTRA's discriminator). Every rank must call this (collectives).
        sequence_parallel_size: ``P``, ranks per sequence; must divide the model's heads and
            the world size (``torch.distributed`` initialised, e.g.
            ``deepspeed.init_distributed()``).
        micro_batch_size: sequences per forward on each rank (DeepSpeed's wrapper is built for
            one batch size).
        seq_length: the full sequence length when it is fixed (a multiple of ``P * block``,
            at most the sparse ``max_seq_length``), None when it varies (each batch's length
            must then be a multiple of ``P * block``).

    Does, in this order: checks the sizes; registers ``"block_sparse_ulysses"`` as
    DeepSpeed's Ulysses core attention with
    ``UlyssesSPAttentionHF.register_with_transformers`` (once per process; DeepSpeed creates
    its sequence groups of ``P`` consecutive ranks there); switches the model to that name;
    checks that every rank holds the same layout (``check_same_layout`` over the world);
    installs the forward hooks described in this module's docstring.

    Each forward then takes this rank's shard: ``input_ids``, ``attention_mask`` (optional),
    ``position_ids`` (required) and ``token_type_ids`` as ``[micro_batch_size, seq / P]``
    int64 tensors, rank ``r`` of the group holding tokens ``[r * seq / P, (r + 1) * seq / P)``
    (``sequence_parallel_dataloader`` produces them), and returns this shard's outputs.

    Raises ``ValueError`` for a size that does not fit (heads or world not divisible by ``P``,
    ``seq_length`` not a multiple of ``P * block``), for a model that is not sparse or has a
    head that reads the first token, when ``torch.distributed`` is not initialised (no process
    group of ``P`` ranks), or when this process already registered Ulysses for other sizes;
    ``RuntimeError`` when DeepSpeed's sequence groups were created by someone else, or when
    ranks hold different layouts.
    """
    from . import hf

    p = _check_int("sequence_parallel_size", sequence_parallel_size)
    mb = _check_int("micro_batch_size", micro_batch_size)
    if seq_length is not None:
        seq_length = _check_int("seq_length", seq_length)
    if not hf.is_sparse(model):
        raise ValueError(
            f"{type(model).__name__} does not use block-sparse attention; call "
            f"sparse_attn.hf.enable_sparse_attention(model, sparsity_config) first")
    hf.check_supported(model)
    name = type(model).__name__
    if any(name.endswith(head) for head in _FIRST_TOKEN_HEADS):
        raise ValueError(
            f"{name} reads the sequence's first token ([CLS]), which under sequence "
            f"parallelism only rank 0 of each group holds; sequence parallelism supports base "
            f"models and token-level heads (ForMaskedLM, ForTokenClassification, "
            f"ForQuestionAnswering, ElectraForPreTraining)")
    config = model.config
    settings = _settings(config)
    heads, block = config.num_attention_heads, settings.sparsity_config.block
    if heads % p:
        raise ValueError(
            f"num_attention_heads {heads} is not divisible by sequence_parallel_size {p}: "
            f"Ulysses gives each rank heads / P heads; use a sequence_parallel_size that "
            f"divides {heads}")
    if seq_length is not None:
        if seq_length % (p * block):
            multiple = p * block
            raise ValueError(
                f"seq_length {seq_length} is not a multiple of sequence_parallel_size * block "
                f"= {p} * {block} = {multiple}: pad the sequences to "
                f"{-(-seq_length // multiple) * multiple} tokens")
        if seq_length > settings.max_seq_length:
            raise ValueError(
                f"seq_length {seq_length} exceeds the sparse attention's max_seq_length="
                f"{settings.max_seq_length} (set by enable_sparse_attention)")
    if p == 1:
        return None

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"sequence_parallel_size {p} needs a process group of {p} ranks, but "
            f"torch.distributed is not initialised: call deepspeed.init_distributed() in a "
            f"run of a multiple of {p} ranks (deepspeed or torchrun launcher) first")
    world = dist.get_world_size()
    if world % p:
        raise ValueError(
            f"sequence_parallel_size {p} needs process groups of {p} ranks, but the world of "
            f"{world} ranks cannot be cut into them; launch a multiple of {p} ranks")

    mpu = _register(model, p, mb, seq_length)
    group = mpu.get_sequence_parallel_group()
    rank = mpu.get_sequence_parallel_rank()
    check_same_layout(layout_checksum(settings.attention.master_layout))

    old = getattr(model, _PLACE_ATTR, None)
    if old is not None:
        for handle in old.handles:
            handle.remove()
    place = _Place(model, p, rank, group, block, mb, seq_length, settings.max_seq_length)
    base = model.base_model
    place.handles.append(base.register_forward_pre_hook(place.before_forward, with_kwargs=True))
    if base is not model:
        place.handles.append(model.register_forward_pre_hook(_reject_labels, with_kwargs=True))
    object.__setattr__(model, _PLACE_ATTR, place)
    return mpu


def _register(model: nn.Module, p: int, mb: int, seq_length: Optional[int]):
    """DeepSpeed's ``register_with_transformers`` for ``"block_sparse_ulysses"``, once per
    process; later models of the same sizes reuse the wrapper. Returns DeepSpeed's mpu."""
    global _REGISTRATION
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .hf import self_attention_modules

    config = model.config
    heads = config.num_attention_heads
    head_dim = self_attention_modules(model)[0].attention_head_size
    want = dict(size=p, micro_batch_size=mb, num_heads=heads, head_dim=head_dim,
                seq_length=seq_length)
    name = SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION
    reg = _REGISTRATION
    if reg is not None:
        have = {k: getattr(reg, k) for k in want}
        if have != want:
            raise ValueError(
                f"this process already registered DeepSpeed's Ulysses for {have}; "
                f"{type(model).__name__} needs {want}. DeepSpeed's registration is "
                f"process-wide (its wrapper is built for one batch size, head count and head "
                f"size, and its sequence groups are created once): run models of other sizes "
                f"in another process")
        if ALL_ATTENTION_FUNCTIONS[name] is not reg.wrapper:
            raise RuntimeError(
                f"ALL_ATTENTION_FUNCTIONS[{name!r}] is no longer the Ulysses wrapper that "
                f"enable_sequence_parallel registered")
        model.set_attn_implementation(name)
        return mpu
    try:
        mpu.get_sequence_parallel_group()
        taken = True
    except AssertionError:
        taken = False
    if taken:
        raise RuntimeError(
            "DeepSpeed's sequence parallel groups (parallel_state_sp) were already created in "
            "this process by something other than enable_sequence_parallel; DeepSpeed creates "
            "them once, in register_with_transformers, which enable_sequence_parallel calls")
    model.set_attn_implementation(name)
    # DeepSpeed reads num_key_value_heads, which BERT-style configs lack (they are multi-head:
    # as many key/value heads as query heads). Set for the call only, so the saved config does
    # not change.
    text_config = config.get_text_config()
    added = not hasattr(text_config, "num_key_value_heads")
    if added:
        text_config.num_key_value_heads = heads
    try:
        result = UlyssesSPAttentionHF.register_with_transformers(
            model, core_attn_implementation=name, sequence_parallel_size=p,
            micro_batch_size=mb, seq_length=seq_length,
            seq_length_is_variable=seq_length is None)
    finally:
        if added:
            delattr(text_config, "num_key_value_heads")
    _REGISTRATION = _Registration(wrapper=ALL_ATTENTION_FUNCTIONS[name], **want)
    return result


def _place(model: nn.Module) -> _Place:
    place = getattr(model, _PLACE_ATTR, None)
    if place is None:
        raise ValueError(f"{type(model).__name__} is not sequence-parallel; call "
                         f"enable_sequence_parallel(model, ...) first")
    return place


def sequence_position_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ids ``model`` computes itself for full sequences ``input_ids``
    (``[batch, seq]`` int64): ``0 .. seq - 1`` for BERT and ELECTRA; for RoBERTa, XLM-RoBERTa
    and CamemBERT ``padding_idx + 1 ..`` counting non-padding tokens, ``padding_idx`` on
    padding. Returns ``[batch, seq]`` int64. Under sequence parallelism every rank passes its
    shard of these (each rank computing its own would number its shard from 0)."""
    emb = getattr(model.base_model, "embeddings", None)
    make = getattr(emb, "create_position_ids_from_input_ids", None)
    padding_idx = getattr(emb, "padding_idx", None)
    if make is not None and padding_idx is not None:
        return make(input_ids, padding_idx)
    batch, seq = input_ids.shape
    return torch.arange(seq, device=input_ids.device).expand(batch, seq).contiguous()


# What each token-level key is padded with when a sequence is padded to P * block.
def _pad_values(model: nn.Module) -> Dict[str, int]:
    pad_id = getattr(model.config, "pad_token_id", None)
    return {"input_ids": 0 if pad_id is None else int(pad_id), "attention_mask": 0,
            "token_type_ids": 0, "labels": _IGNORE_INDEX}


class _FullBatches:
    """The user's loader with what DeepSpeed's adapter needs: sequences padded to a multiple
    of ``P * block``, ``position_ids`` (the model's own), and the labels kept aside (the
    adapter shifts ``labels`` for causal LMs; these models need them unshifted)."""

    LABELS = "sparse_attn_token_labels"

    def __init__(self, dataloader, model: nn.Module, multiple: int):
        self.dataloader, self.model, self.multiple = dataloader, model, multiple
        self.pad_values = _pad_values(model)

    def __len__(self):
        return len(self.dataloader)

    def __iter__(self):
        for batch in self.dataloader:
            yield self.prepare(batch)

    def prepare(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("input_ids")):
            raise ValueError("sequence_parallel_dataloader needs batches that are dicts with "
                             "an 'input_ids' tensor [batch, seq]")
        batch = dict(batch)
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(ids.shape)}; expected [batch, seq]")
        n, seq = ids.shape
        for key, value in batch.items():
            if torch.is_tensor(value) and tuple(value.shape) != (n, seq):
                raise ValueError(
                    f"batch[{key!r}] has shape {tuple(value.shape)}; DeepSpeed's adapter cuts "
                    f"every tensor of a batch along the sequence, so each must be [batch, seq] "
                    f"= [{n}, {seq}] like input_ids")
        pad = (-seq) % self.multiple
        if pad:
            if "attention_mask" not in batch:
                batch["attention_mask"] = torch.ones_like(ids)
            for key, value in list(batch.items()):
                if not torch.is_tensor(value) or key == "position_ids":
                    continue
                if key not in self.pad_values:
                    raise ValueError(
                        f"the sequences ({seq} tokens) must be padded to a multiple of "
                        f"sequence_parallel_size * block = {self.multiple}, and batch[{key!r}] "
                        f"has no known padding value (known: {sorted(self.pad_values)}); pad "
                        f"the batch to {seq + pad} tokens yourself")
                batch[key] = F.pad(value, (0, pad), value=self.pad_values[key])
        own = sequence_position_ids(self.model, batch["input_ids"])
        given = batch.get("position_ids")
        batch["position_ids"] = own if given is None else torch.cat([given, own[:, seq:]], 1)
        if "labels" in batch:
            batch[self.LABELS] = batch["labels"]
        else:  # DeepSpeed's adapter requires "labels"; dropped again after sharding
            batch["labels"] = torch.full_like(batch["input_ids"], _IGNORE_INDEX)
        return batch


class _ShardedBatches:
    """DeepSpeed's ``UlyssesSPDataLoaderAdapter`` with the labels put back unshifted."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __len__(self):
        return len(self.adapter)

    def __iter__(self):
        for batch in self.adapter:
            batch.pop("shift_labels", None)
            labels = batch.pop(_FullBatches.LABELS, None)
            if labels is not None:
                batch["labels"] = labels
            yield batch


def sequence_parallel_dataloader(dataloader: Iterable, model: nn.Module, device=None):
    """This rank's shards of ``dataloader``'s batches, through DeepSpeed's
    ``UlyssesSPDataLoaderAdapter``, for a model made sequence-parallel by
    ``enable_sequence_parallel``.

    ``dataloader`` yields dicts of ``[batch, seq]`` tensors of FULL sequences
    (``input_ids`` required; ``attention_mask``, ``token_type_ids``, token-level ``labels``,
    ``position_ids`` optional); every rank's loader yields its own batches. Each batch is
    padded to a multiple of ``P * block`` (``input_ids`` with the pad token,
    ``attention_mask`` and ``token_type_ids`` with 0, ``labels`` with -100), gets the model's
    own ``position_ids`` unless it has them, and is cut along the sequence. As DeepSpeed's
    adapter does, the ``P`` ranks of a group take turns: step ``i`` of every rank of the group
    holds a shard of the batch that rank ``i % P`` of the group read. The yielded dicts hold
    ``[batch, seq' / P]`` CPU tensors (DeepSpeed's adapter keeps them there; move them to the
    model's device) with ``labels`` unshifted (DeepSpeed's adapter shifts them for causal
    LMs). ``len()`` is ``P`` times the loader's.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    place = _place(model)
    full = _FullBatches(dataloader, model, place.size * place.block)
    adapter = UlyssesSPDataLoaderAdapter(full, sp_rank=place.rank, sp_group=place.group,
                                         sp_world_size=place.size,
                                         device=device if device is not None else "cpu")
    return _ShardedBatches(adapter)


def sequence_parallel_loss_part(logits: torch.Tensor, labels: torch.Tensor, group=None,
                                ignore_index: int = _IGNORE_INDEX) -> torch.Tensor:
    """This rank's part of the token-level cross-entropy mean over the whole sequence.

    Args:
        logits: this rank's shard, ``[batch, seq / P, classes]`` (any float dtype; the loss
            is computed in float32).
        labels: its labels, ``[batch, seq / P]`` int64, ``ignore_index`` where no loss is
            taken.
        group: the sequence process group (default: DeepSpeed's, from
            ``enable_sequence_parallel``).

    Returns a float32 scalar: the sum of this shard's token losses over the labelled tokens
    of the whole sequence (counted over the group with one small all-reduce; at least 1).
    The parts of a group add up to the one-process mean; their gradients are parts too, which
    DeepSpeed (given ``mpu``) sums over the group. For the sequence's loss (logging),
    all-reduce ``part.detach()`` over the group.
    """
    import torch.distributed as dist

    if group is None:
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

        group = mpu.get_sequence_parallel_group()
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         f"must be [batch, seq / P, classes] and [batch, seq / P]")
    count = (labels != ignore_index).sum().to(torch.float32)
    dist.all_reduce(count, group=group)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=ignore_index, reduction="sum")
    return total / count.clamp(min=1.0)
