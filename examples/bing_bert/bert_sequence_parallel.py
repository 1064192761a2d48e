"""Ulysses sequence parallelism for the bing_bert example (``--sequence_parallel_size P``).

The world of ``W`` ranks is cut into ``W / P`` sequence groups of ``P`` consecutive ranks by
DeepSpeed's own Ulysses groups module, which the engine gets as its ``mpu``. The ranks of a
group read the same batch, pad it to a multiple of ``P * block`` and each keeps its shard of
the tokens (``shard_batch``); the attention layers are
``sparse_attn.sequence_parallel.SequenceParallelSparseAttention`` (``use_in_model``).

Losses: each rank returns its part, and the parts of a group add up to the loss of the whole
sequence: masked-LM ``sum of this shard's token losses / masked tokens of the whole
sequence``; next-sentence: the whole loss on the group's rank 0, which holds the [CLS] token,
and 0 on the others (their pooler runs on their own first token, only so that every rank has
the same graph and gradients, zero there). No collective runs in the backward pass besides
DeepSpeed's own all-to-alls, so every rank issues the same collectives in the same order.
DeepSpeed (given the groups as ``mpu``) sums gradients over the sequence group and averages
them over the data-parallel replicas, so the update is that of the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["SequenceShard", "check_sizes", "make_groups", "sequence_parallel_mpu",
           "use_in_model", "shard_batch",
           "masked_lm_loss_part", "next_sentence_loss_part"]


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place: ``size`` (``P``) ranks share a sequence; this one is ``rank`` of
    them in ``group`` and holds tokens ``[rank * S / P, (rank + 1) * S / P)``; ``dp_rank`` of
    ``dp_size`` data-parallel replicas."""

    size: int
    rank: int
    group: Any
    dp_size: int
    dp_rank: int


def check_sizes(size: int, world: int, num_heads: int, layout_length: Optional[int],
                block: Optional[int]) -> None:
    """``ValueError`` unless ``size`` ranks per sequence fit the world, the heads and the
    layout (checked before DeepSpeed starts)."""
    if size < 1:
        raise ValueError(f"--sequence_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if block is None:
        raise ValueError("--sequence_parallel_size > 1 needs --deepspeed_sparse_attention "
                         "(the sequence-parallel attention is the block-sparse one)")
    if world % size != 0:
        raise ValueError(f"--sequence_parallel_size {size} does not divide the {world} ranks "
                         f"of the run; launch a multiple of {size} ranks")
    if num_heads % size != 0:
        raise ValueError(f"--sequence_parallel_size {size} does not divide the model's "
                         f"{num_heads} attention heads (each rank attends with heads / P)")
    if layout_length is not None and layout_length % (size * block) != 0:
        good = -(-layout_length // (size * block)) * size * block
        raise ValueError(
            f"--max_seq_length (padded: {layout_length}) is not a multiple of "
            f"sequence_parallel_size * block = {size} * {block} = {size * block}: use "
            f"--max_seq_length {good}")


def make_groups(size: int) -> SequenceShard:
    """Create the sequence groups with DeepSpeed's own Ulysses groups module
    (``deepspeed.runtime.sequence_parallel.parallel_state_sp``: groups of ``size`` consecutive
    ranks) and return this rank's place. Pass ``mpu=sequence_parallel_mpu()`` to
    ``deepspeed.initialize`` so that the engine reduces gradients over them (a sum over the
    sequence group, a mean over the data-parallel replicas). ``torch.distributed`` must be
    initialised (``deepspeed.init_distributed``)."""
    import torch.distributed as dist

    mpu = sequence_parallel_mpu()
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    rank = dist.get_rank()
    return SequenceShard(size=size, rank=mpu.get_sequence_parallel_rank(),
                         group=mpu.get_sequence_parallel_group(),
                         dp_size=dist.get_world_size() // size, dp_rank=rank // size)


def sequence_parallel_mpu():
    """DeepSpeed's Ulysses groups module (what ``deepspeed.initialize(mpu=...)`` takes)."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    return mpu


def use_in_model(model, shard: SequenceShard, sparsity_config, layout_length: int) -> None:
    """Make every sparse self-attention of ``model`` (a ``BertForPreTraining`` with
    ``BertSparseSelfAttention`` layers) sequence-parallel over ``shard.group``, and tell the
    model its shard. A collective (the layout is compared across the group)."""
    from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention
    from sparse_attn.sequence_parallel import SequenceParallelSparseAttention

    layers = [m for m in model.modules() if isinstance(m, BertSparseSelfAttention)]
    if not layers:
        raise ValueError("the model has no BertSparseSelfAttention layer to make "
                         "sequence-parallel")
    for layer in layers:
        layer.sparse_self_attention = SequenceParallelSparseAttention(
            sparsity_config, shard.group, shard.size, max_seq_length=layout_length)
    model.bert.sequence_shard = shard


def shard_batch(batch: dict, shard: SequenceShard, block: int, pad_token_id: int,
                ignore_index: int) -> dict:
    """This rank's part of a full batch: ``input_ids``, ``token_type_ids`` and
    ``masked_lm_labels`` (``[batch, S]`` int64) padded to a multiple of ``P * block`` and cut
    to ``[batch, S' / P]``; ``attention_mask`` padded (with 0) but kept whole, ``[batch, S']``
    (the attention needs the full sequence's mask); ``next_sentence_label`` as is. The whole
    batch's ``masked_positions`` are dropped (the model finds its shard's own)."""
    length = batch["input_ids"].shape[1]
    padded = -(-length // (shard.size * block)) * shard.size * block
    part = padded // shard.size
    cut = slice(shard.rank * part, (shard.rank + 1) * part)
    fill = {"input_ids": pad_token_id, "token_type_ids": 0, "attention_mask": 0,
            "masked_lm_labels": ignore_index}
    out = dict(batch)
    out.pop("masked_positions", None)
    for name, value in fill.items():
        t = F.pad(batch[name], (0, padded - length), value=value)
        out[name] = t if name == "attention_mask" else t[:, cut].contiguous()
    return out


def masked_lm_loss_part(scores: torch.Tensor, labels: torch.Tensor,
                        shard: SequenceShard) -> torch.Tensor:
    """This shard's part of the masked-LM mean: the sum of its token losses (``scores``
    ``[n, vocab]`` float32, ``labels`` ``[n]``) over the masked tokens of the whole sequence
    (counted over the group: one small all-reduce)."""
    import torch.distributed as dist

    count = torch.tensor(float(labels.numel()), device=scores.device)
    dist.all_reduce(count, group=shard.group)
    return F.cross_entropy(scores, labels, reduction="sum") / count


def next_sentence_loss_part(loss: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """This rank's part of the next-sentence loss: all of it on the group's rank 0 (which
    holds the [CLS] token), zero elsewhere (a zero that keeps the graph and its gradients)."""
    return loss if shard.rank == 0 else loss * 0.0
