"""Sequence tiling for long sequences: the feed-forward block and the masked-LM loss computed
shard by shard, with the shard recomputed in the backward instead of its activations kept.

Both wrap DeepSpeed's own autograd functions (``deepspeed.runtime.sequence_parallel.
ulysses_sp``): ``TiledMLP`` for the feed-forward and ``sequence_tiled_compute`` for the loss.
Neither keeps more than one shard's intermediate tensors alive: the feed-forward's
``[tokens, intermediate_size]`` activation and the loss's ``[masked tokens, vocab]`` logits are
the two largest tensors of a BERT step at long sequences. The forward runs each shard under
``no_grad``; the backward runs it again with gradients, so the computed function must be
deterministic (no dropout inside: the callers keep dropout outside the tiled function).

DeepSpeed is imported on first use (the example needs it anyway).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _ulysses_sp():
    try:
        from deepspeed.runtime.sequence_parallel import ulysses_sp
    except ImportError as err:  # pragma: no cover - the example needs DeepSpeed anyway
        raise ImportError(
            "--tiled_mlp / --tiled_loss use DeepSpeed's sequence tiling "
            "(deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP and "
            f"sequence_tiled_compute), which could not be imported: {err}; install "
            "deepspeed>=0.17") from err
    return ulysses_sp


def check_shards(flag: str, shards) -> int:
    """``shards`` as an int >= 1, else a ValueError naming ``flag``."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"{flag} {shards!r}: the number of sequence shards must be an "
                         f"integer >= 1 (1: no tiling)")
    return shards


def tiled_mlp(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], module: nn.Module,
              x: torch.Tensor, shards: int, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """``fn(module, x)`` computed in ``shards`` pieces along the sequence (DeepSpeed's
    ``TiledMLP``).

    Args:
        fn: a position-wise function of ``x`` (``fn(module, x_shard)``), deterministic (no
            dropout): it runs once per shard in the forward and again in the backward.
        module: passed to ``fn`` as its first argument.
        x: ``[batch, seq, hidden]`` (any float dtype; the output keeps ``fn``'s dtype).
        shards: pieces along ``seq`` (the last one may be shorter); 1 calls ``fn`` directly.
        params: the parameters ``fn`` uses (DeepSpeed ZeRO is told to reduce their gradients
            only after the last shard).

    Returns ``fn(module, x)`` as one tensor ``[batch, seq, out_features]``; the gradients of
    ``x`` and of ``params`` equal those of the untiled call.
    """
    if shards <= 1:
        return fn(module, x)
    return _ulysses_sp().TiledMLP.apply(fn, module, x, shards, list(params))


def _masked_lm_loss_sum(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of the token losses of one shard: ``x`` ``[1, n, hidden]``, ``y`` ``[1, n]``."""
    scores = head.prediction_scores(x[0])
    return F.cross_entropy(scores.float(), y[0], reduction="sum")


def tiled_masked_lm_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                             shards: int) -> torch.Tensor:
    """The masked-LM loss summed over the masked tokens, without the whole logits tensor.

    Args:
        head: the pre-training heads (``BertPreTrainingHeads``): ``head.prediction_scores(h)``
            maps ``[n, hidden]`` to ``[n, vocab]`` scores; deterministic (no dropout).
        hidden: ``[n, hidden]``, the final hidden states at the ``n`` masked positions (the
            encoder's dtype).
        labels: ``[n]`` int64, the tokens to predict.
        shards: pieces of the ``n`` positions; each shard's ``[n / shards, vocab]`` logits
            are computed in the forward and again in the backward, never all at once.

    Returns the float32 scalar ``sum_i cross_entropy(scores_i, labels_i)`` (divide by ``n`` for
    the mean); its gradients to ``hidden`` and to the head's parameters equal those of the
    untiled ``F.cross_entropy(scores.float(), labels, reduction="sum")``.
    """
    n = hidden.shape[0]
    if shards <= 1:
        return _masked_lm_loss_sum(head, hidden[None], labels[None])
    params = [p for p in head.parameters() if p.requires_grad]
    return _ulysses_sp().sequence_tiled_compute(
        lambda x, y: _masked_lm_loss_sum(head, x, y), n, shards,
        kwargs_to_shard={"x": hidden[None], "y": labels[None]}, kwargs_to_pass={},
        grad_requiring_tensor_key="x", compute_params=params, output_unshard_dimension=0,
        output_reduction="sum")
