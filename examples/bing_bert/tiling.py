"""Sequence tiling for long sequences: the feed-forward block and the masked-LM loss computed
shard by shard, with the shard recomputed in the backward instead of its activations kept.

Both wrap DeepSpeed's own autograd functions (``deepspeed.runtime.sequence_parallel.
ulysses_sp``): ``TiledMLP`` for the feed-forward and ``sequence_tiled_compute`` for the loss.
Neither keeps more than one shard's intermediate tensors alive: the feed-forward's
``[tokens, intermediate_size]`` activation and the loss's ``[masked tokens, vocab]`` logits are
the two largest tensors of a BERT step at long sequences. The forward runs each shard under
``no_grad``; the backward runs it again with gradients, so the computed function must be
deterministic (no dropout inside: the callers keep dropout outside the tiled function).

DeepSpeed is imported on first use; where its module cannot be imported (DeepSpeed installed
without einops, which ``ulysses_sp`` imports), equivalent functions of this file run instead,
with one warning (``USE_DEEPSPEED``).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


#: set to False to use this file's equivalent functions instead of DeepSpeed's (tests; and
#: automatically, with one warning, when DeepSpeed's module cannot be imported, e.g. a
#: DeepSpeed installed without its dependency einops)
USE_DEEPSPEED = True
_warned = False


def _ulysses_sp():
    """DeepSpeed's ``ulysses_sp`` module, or None (then the local equivalents run)."""
    global USE_DEEPSPEED, _warned
    if not USE_DEEPSPEED:
        return None
    try:
        from deepspeed.runtime.sequence_parallel import ulysses_sp
    except ImportError as err:
        USE_DEEPSPEED = False
        if not _warned:
            _warned = True
            warnings.warn(f"deepspeed.runtime.sequence_parallel.ulysses_sp cannot be imported "
                          f"({err}): --tiled_mlp / --tiled_loss use the example's equivalent "
                          f"functions (tiling.py)")
        return None
    return ulysses_sp


class _TiledSequence(torch.autograd.Function):
    """The local equivalent of DeepSpeed's ``TiledMLP``: ``fn(x)`` in ``shards`` pieces along
    dim -2 of ``x``, no graph kept in the forward; each piece recomputed with gradients in the
    backward (the parameters' gradients accumulate there)."""

    @staticmethod
    def forward(ctx, fn, x, shards):
        ctx.fn, ctx.shards = fn, shards
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(part) for part in x.chunk(shards, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grads = []
        for part, g in zip(x.detach().chunk(ctx.shards, dim=-2), grad.chunk(ctx.shards, dim=-2)):
            part = part.detach().requires_grad_(True)
            with torch.enable_grad():
                out = ctx.fn(part)
            torch.autograd.backward(out, g)
            grads.append(part.grad)
        return None, torch.cat(grads, dim=-2), None


class _TiledSum(torch.autograd.Function):
    """The local equivalent of DeepSpeed's ``sequence_tiled_compute`` with a sum: the sum of
    the scalars ``fn(x_i, y_i)`` over ``shards`` pieces of dim 0 of ``x`` and ``y``, each piece
    recomputed with gradients in the backward."""

    @staticmethod
    def forward(ctx, fn, x, y, shards):
        ctx.fn, ctx.shards = fn, shards
        ctx.save_for_backward(x, y)
        with torch.no_grad():
            return torch.stack([fn(a, b) for a, b in zip(x.chunk(shards), y.chunk(shards))]).sum()

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        grads = []
        for a, b in zip(x.detach().chunk(ctx.shards), y.chunk(ctx.shards)):
            a = a.detach().requires_grad_(True)
            with torch.enable_grad():
                out = ctx.fn(a, b)
            torch.autograd.backward(out, grad)
            grads.append(a.grad)
        return None, torch.cat(grads), None, None


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
    ulysses_sp = _ulysses_sp()
    if ulysses_sp is None:
        return _TiledSequence.apply(lambda part: fn(module, part), x, shards)
    return ulysses_sp.TiledMLP.apply(fn, module, x, shards, list(params))


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
    ulysses_sp = _ulysses_sp()
    if ulysses_sp is None:
        return _TiledSum.apply(lambda x, y: _masked_lm_loss_sum(head, x[None], y[None]),
                               hidden, labels, shards)
    params = [p for p in head.parameters() if p.requires_grad]
    return ulysses_sp.sequence_tiled_compute(
        lambda x, y: _masked_lm_loss_sum(head, x, y), n, shards,
        kwargs_to_shard={"x": hidden[None], "y": labels[None]}, kwargs_to_pass={},
        grad_requiring_tensor_key="x", compute_params=params, output_unshard_dimension=0,
        output_reduction="sum")
