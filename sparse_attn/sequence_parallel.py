"""Block-sparse attention as the local attention of DeepSpeed's Ulysses sequence parallelism.

Each of the ``P`` ranks of a sequence process group holds ``seq / P`` tokens of every head.
DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention`` exchanges query, key and value
all-to-all so that rank ``r`` (its rank within the group) holds the whole sequence for heads
``[r * H / P, (r + 1) * H / P)``; it calls the local attention on them and exchanges the
context back. The local attention here is ``SparseSelfAttention`` over that rank's slice of the
per-head layout ``[H, nb, nb]``.

Decisions:

* Key padding mask: the module takes the mask of the FULL sequence, ``[batch, seq]``, on every
  rank (the same tensor everywhere). A mask is ``batch * seq`` numbers, far smaller than
  ``q``; gathering shards inside the module would cost one collective per layer and call. A
  loader that hands each rank only its shard gathers it once per step with
  ``gather_sequence_shards`` and passes the result to every layer.
* Layout: built once, at ``max_seq_length``, on every rank, and checked to be the same on every
  rank of the group (``layout_checksum`` compared by ``check_same_layout``: one collective, at
  construction). Each rank's local module keeps its head slice of exactly that checked tensor;
  shorter sequences use its top-left corner, as ``SparseSelfAttention`` does, cached per
  (length, device): no host sync per call.
* ``P == 1`` is today's path: ``SparseSelfAttention`` alone, no process group needed, no
  all-to-all.

DeepSpeed is imported only when a module with ``P > 1`` is built.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layout_agreement import check_same_layout
from .layout_parts import layout_checksum
from .sparse_self_attention import SparseSelfAttention
from .sparsity_config import SparsityConfig

__all__ = ["SequenceParallelSparseAttention", "HeadSliceLayout", "gather_sequence_shards",
           "check_sequence_parallel_setup"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_sequence_parallel_setup(num_heads: int, sequence_parallel_size: int,
                                  group_size: Optional[int]) -> None:
    """Raise ``ValueError`` unless ``num_heads`` heads can be split over
    ``sequence_parallel_size`` ranks and the sequence process group (``group_size`` ranks, None
    when no group was given) has exactly that many ranks."""
    p = sequence_parallel_size
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"sequence_parallel_size must be an integer >= 1, got {p!r}")
    if num_heads % p != 0:
        raise ValueError(
            f"num_heads {num_heads} is not divisible by sequence_parallel_size {p}: Ulysses "
            f"gives each rank num_heads / P heads; use a sequence_parallel_size that divides "
            f"{num_heads}")
    if p > 1 and group_size is None:
        raise ValueError(
            f"sequence_parallel_size {p} needs a sequence process group of {p} ranks, got "
            f"sequence_process_group=None; initialise torch.distributed (or deepspeed.comm) "
            f"and pass the group, e.g. deepspeed.comm.new_group(ranks)")
    if group_size is not None and group_size != p:
        raise ValueError(
            f"sequence_parallel_size is {p} but the sequence process group has {group_size} "
            f"ranks; they must be equal")


class HeadSliceLayout(SparsityConfig):
    """The heads ``[start, stop)`` of a fixed ``[H, NB, NB]`` layout, as a ``SparsityConfig``
    of ``stop - start`` heads.

    ``make_layout(seq_len)`` returns the int64 ``[stop - start, nb, nb]`` top-left corner
    (``nb = seq_len // block <= NB``) of those heads. ``attention`` is that of the layout's
    config, so a unidirectional layout stays causal inside its diagonal blocks.
    """

    def __init__(self, layout: torch.Tensor, block: int, start: int, stop: int,
                 attention: str):
        if not 0 <= start < stop <= layout.shape[0]:
            raise ValueError(f"head slice [{start}, {stop}) is outside the layout's "
                             f"{layout.shape[0]} heads")
        super().__init__(num_heads=stop - start, block=block, different_layout_per_head=True)
        self.attention = attention
        self._layout = layout[start:stop].to(torch.int64).cpu().contiguous()
        self.head_start, self.head_stop = start, stop

    def make_layout(self, seq_len: int) -> torch.Tensor:
        nb_max = self._layout.shape[1]
        if seq_len % self.block != 0 or not 0 < seq_len // self.block <= nb_max:
            raise ValueError(f"sequence length {seq_len} must be a positive multiple of "
                             f"{self.block} up to {nb_max * self.block}")
        nb = seq_len // self.block
        return self._layout[:, :nb, :nb].clone()


class _BatchFirstLocalAttention(nn.Module):
    """What ``DistributedAttention`` calls: ``SparseSelfAttention`` on ``[batch, seq,
    local_heads, head_dim]`` tensors (DeepSpeed's batch-first layout after the exchange).
    Returns ``[batch, seq, local_heads, head_dim]``."""

    def __init__(self, attention: SparseSelfAttention):
        super().__init__()
        self.attention = attention

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self.attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return out.transpose(1, 2)


class SequenceParallelSparseAttention(nn.Module):
    """Block-sparse self-attention of a sequence split over the ``P`` ranks of a sequence
    process group (DeepSpeed Ulysses).

    Args:
        sparsity_config: the layout of all ``H`` heads (``SparsityConfig``); ``H`` must be
            divisible by ``sequence_parallel_size``.
        sequence_process_group: the group of the ``P`` ranks that share one sequence (a
            ``torch.distributed``/``deepspeed.comm`` group); may be None when ``P == 1``.
        sequence_parallel_size: ``P``; 1 runs ``SparseSelfAttention`` alone.
        key_padding_mask_mode, attn_mask_mode: as for ``SparseSelfAttention``.
        max_seq_length: the longest FULL sequence (all shards together); the layout is built
            at it (rounded up to the block) and checked across the group once, here. With
            ``P > 1`` this is a collective: every rank of the group must build the module.

    Raises ``ValueError`` when ``H`` is not divisible by ``P``, or ``P > 1`` without a group of
    ``P`` ranks; ``RuntimeError`` when ranks of the group built different layouts.
    """

    def __init__(self, sparsity_config: SparsityConfig, sequence_process_group=None,
                 sequence_parallel_size: int = 1, key_padding_mask_mode: str = "add",
                 attn_mask_mode: str = "mul", max_seq_length: int = 2048):
        super().__init__()
        if not isinstance(sparsity_config, SparsityConfig):
            raise TypeError(
                f"sparsity_config must be a SparsityConfig, got {type(sparsity_config).__name__}")
        p = sequence_parallel_size
        group_size = None
        if sequence_process_group is not None:
            import torch.distributed as dist

            group_size = dist.get_world_size(sequence_process_group)
        check_sequence_parallel_setup(sparsity_config.num_heads, p, group_size)
        self.sparsity_config = sparsity_config
        self.sequence_parallel_size = p
        self.sequence_process_group = sequence_process_group
        modes = dict(key_padding_mask_mode=key_padding_mask_mode, attn_mask_mode=attn_mask_mode,
                     max_seq_length=max_seq_length)
        if p == 1:
            self.local_attention = SparseSelfAttention(sparsity_config, **modes)
            self.distributed_attention = None
            self.head_start, self.head_stop = 0, sparsity_config.num_heads
            self.layout_checksum = layout_checksum(self.local_attention.master_layout)
            return
        import torch.distributed as dist
        from deepspeed.sequence.layer import DistributedAttention

        full = SparseSelfAttention(sparsity_config, **modes).master_layout
        self.layout_checksum = layout_checksum(full)
        check_same_layout(self.layout_checksum, sequence_process_group)
        heads = sparsity_config.num_heads // p
        rank = dist.get_rank(sequence_process_group)
        self.head_start, self.head_stop = rank * heads, (rank + 1) * heads
        local = HeadSliceLayout(full, sparsity_config.block, self.head_start, self.head_stop,
                                sparsity_config.attention)
        self.local_attention = SparseSelfAttention(local, **modes)
        # Batch-first: DeepSpeed scatters the heads (dim 2) and gathers the sequence (dim 1).
        self.distributed_attention = DistributedAttention(
            _BatchFirstLocalAttention(self.local_attention), sequence_process_group,
            scatter_idx=2, gather_idx=1)

    @property
    def block(self) -> int:
        return self.sparsity_config.block

    @property
    def max_seq_length(self) -> int:
        """The longest full sequence; fixed at construction (the layout was checked there)."""
        return self.local_attention.max_seq_length

    def get_layout(self, seq_len: int, device=None) -> torch.Tensor:
        """This rank's ``[H / P, nb, nb]`` layout for a full sequence of ``seq_len`` tokens."""
        return self.local_attention.get_layout(seq_len, device)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention context of this rank's shard, ``[batch, heads, seq / P, head_dim]``, in
        the dtype of ``query``.

        Args:
            query, key, value: this rank's shard, ``[batch, heads, seq / P, head_dim]``, all
                ``H`` heads, one dtype (fp16, bf16, fp32 or fp64); rank ``r`` of the group
                holds tokens ``[r * seq / P, (r + 1) * seq / P)``.
            key_padding_mask: of the FULL sequence, ``[batch, seq]`` (singleton middle
                dimensions allowed), the same on every rank; float in
                ``key_padding_mask_mode``, or bool (True keeps).
            attn_mask: of the full sequence, ``[seq, seq]``, float in ``attn_mask_mode`` or
                bool.

        ``seq / P`` must be a multiple of the block (the full sequence a multiple of
        ``P * block``).
        """
        if self.distributed_attention is None:
            return self.local_attention(query, key, value, key_padding_mask=key_padding_mask,
                                        attn_mask=attn_mask)
        if query.dim() != 4:
            raise ValueError(f"query must be [batch, heads, seq / P, head_dim], got shape "
                             f"{tuple(query.shape)}")
        p, block = self.sequence_parallel_size, self.block
        heads, local_seq = query.shape[1], query.shape[2]
        if heads != self.sparsity_config.num_heads:
            raise ValueError(
                f"the inputs have {heads} heads but the sparsity config was built for "
                f"num_heads={self.sparsity_config.num_heads}; pass all heads of this rank's "
                f"sequence shard")
        if local_seq % block != 0:
            full, multiple = local_seq * p, p * block
            raise ValueError(
                f"the full sequence of {full} tokens ({p} shards of {local_seq}) is not a "
                f"multiple of sequence_parallel_size * block = {p} * {block} = {multiple}: "
                f"pad the full sequence to {_round_up(full, multiple)} tokens before sharding")
        if key_padding_mask is not None and key_padding_mask.shape[-1] != local_seq * p:
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; it must cover "
                f"the full sequence of {local_seq * p} tokens, [batch, {local_seq * p}]: "
                f"gather the shards once per step with gather_sequence_shards")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self.distributed_attention(q, k, v, 0, key_padding_mask=key_padding_mask,
                                         attn_mask=attn_mask)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"sequence_parallel_size={self.sequence_parallel_size}, heads "
                f"[{self.head_start}, {self.head_stop}) of {self.sparsity_config!r}, "
                f"layout {self.layout_checksum}")


def gather_sequence_shards(shard: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's shard of ``group`` along ``dim`` in rank order: e.g. the key
    padding mask shards ``[batch, seq / P]`` -> ``[batch, seq]``. One all-gather; call it once
    per step, not per layer. Not differentiable (for masks and ids)."""
    import torch.distributed as dist

    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
