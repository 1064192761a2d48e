"""Block-sparse attention layouts, parameter for parameter compatible with DeepSpeed's classes.

A layout is a ``torch.int64`` tensor of 0/1 with shape ``[num_heads, nb, nb]`` where
``nb = seq_len // block``: ``layout[h, i, j] == 1`` lets the queries of block ``i`` of head
``h`` see the keys of block ``j``.

Differences from DeepSpeed, on purpose:

* Random blocks (BigBird, Variable) come from a ``torch.Generator`` seeded with ``seed``, so
  one config gives one layout in every process and on every rank; DeepSpeed drew from
  Python's unseeded ``random``.
* A unidirectional layout never has a block above the diagonal. DeepSpeed's Fixed (with
  ``num_global_blocks > 1``) and Variable (global ranges, random blocks) put some there,
  letting tokens see the future; those blocks are dropped. The kernels mask the future
  tokens inside the diagonal blocks.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from .layout_parts import (  # noqa: F401 (layout_checksum and the constants: public here too)
    ATTENTIONS, BIDIRECTIONAL, UNIDIRECTIONAL, check_attention, check_block, check_flag,
    check_global_indices, check_positive, check_seed, layout_checksum, local_windows,
    random_generator, sliding_window)

class SparsityConfig:
    """Base class of all layouts.

    Args:
        num_heads: attention heads of the layer.
        block: side of the square blocks, in tokens.
        different_layout_per_head: give each head its own layout; when False every head gets
            head 0's layout.

    A user-defined structure subclasses this and overrides ``make_layout(seq_len)``.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False):
        check_positive("num_heads", num_heads)
        check_block(block)
        check_flag("different_layout_per_head", different_layout_per_head)
        self.num_heads = num_heads
        self.block = block
        self.different_layout_per_head = different_layout_per_head
        self.num_layout_heads = num_heads if different_layout_per_head else 1

    attention = BIDIRECTIONAL

    def setup_layout(self, seq_len: int) -> torch.Tensor:
        """An all-zero ``[num_heads, seq_len // block, seq_len // block]`` int64 layout."""
        if not isinstance(seq_len, int) or seq_len <= 0 or seq_len % self.block != 0:
            raise ValueError(
                f"sequence length {seq_len} must be a positive multiple of the block size "
                f"{self.block}")
        nb = seq_len // self.block
        return torch.zeros((self.num_heads, nb, nb), dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout: torch.Tensor) -> torch.Tensor:
        """Copy head 0 to every head when the layout is shared by all heads."""
        if not self.different_layout_per_head:
            layout[1:] = layout[0]
        return layout

    def _finish(self, layout: torch.Tensor) -> torch.Tensor:
        if self.attention == UNIDIRECTIONAL:
            layout = torch.tril(layout)
        layout = self.check_and_propagate_first_head_layout(layout)
        nb = layout.shape[-1]
        if nb >= 32 and not getattr(self, "_density_warned", False) \
                and float(layout.float().mean()) > 0.5:
            self._density_warned = True
            warnings.warn(f"{self!r} keeps {float(layout.float().mean()):.0%} of the blocks "
                          f"at {nb} blocks: check its parameters (DenseSparsityConfig is the "
                          f"way to ask for full attention)", UserWarning, stacklevel=3)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} must override make_layout(seq_len)")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if k not in ("num_layout_heads", "_density_warned"))
        return f"{type(self).__name__}({args})"


class DenseSparsityConfig(SparsityConfig):
    """Every block is attended: full attention, for testing and comparison."""

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False):
        super().__init__(num_heads, block, different_layout_per_head)

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        layout[:] = 1
        return layout


class FixedSparsityConfig(SparsityConfig):
    """Local windows plus global representative blocks (Sparse Transformers, Child et al.).

    Args:
        num_local_blocks: blocks per local window; windows start at block 0.
        num_global_blocks: consecutive blocks per window that represent it globally.
        attention: ``"bidirectional"`` or ``"unidirectional"``.
        horizontal_global_attention: representatives also attend to everything (rows as
            well as columns); bidirectional only.
        num_different_global_patterns: how many heads' worth of distinct representative
            positions; > 1 needs ``different_layout_per_head``.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_local_blocks: int = 4, num_global_blocks: int = 1,
                 attention: str = BIDIRECTIONAL, horizontal_global_attention: bool = False,
                 num_different_global_patterns: int = 1):
        super().__init__(num_heads, block, different_layout_per_head)
        check_positive("num_local_blocks", num_local_blocks)
        check_positive("num_global_blocks", num_global_blocks)
        check_positive("num_different_global_patterns", num_different_global_patterns)
        check_attention(attention)
        if num_local_blocks % num_global_blocks != 0:
            raise ValueError(
                f"num_local_blocks ({num_local_blocks}) must be divisible by "
                f"num_global_blocks ({num_global_blocks})")
        if horizontal_global_attention and attention != BIDIRECTIONAL:
            raise ValueError("horizontal_global_attention needs attention 'bidirectional'")
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError(
                f"num_different_global_patterns: {num_different_global_patterns} needs "
                f"different_layout_per_head: true")
        max_patterns = num_local_blocks // num_global_blocks
        if num_different_global_patterns > max_patterns:
            raise ValueError(
                f"num_different_global_patterns ({num_different_global_patterns}) can be at "
                f"most num_local_blocks // num_global_blocks = {max_patterns}")
        self.num_local_blocks = num_local_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self.num_different_global_patterns = num_different_global_patterns

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb, w = layout.shape[1], self.num_local_blocks
        windows = [(s, min(s + w, nb)) for s in range(0, nb, w)]
        local_windows(layout, h, windows, self.attention == UNIDIRECTIONAL)
        return layout

    def _set_global(self, h: int, layout: torch.Tensor, start: int, end: int) -> None:
        first_row = 0 if self.attention == BIDIRECTIONAL else start
        layout[h, first_row:, start:end] = 1
        if self.horizontal_global_attention:
            layout[h, start:end, :] = 1

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb, w, g = layout.shape[1], self.num_local_blocks, self.num_global_blocks
        offset = w - (1 + h % self.num_different_global_patterns) * g
        full_end = nb - nb % w
        for start in range(offset, full_end, w):
            self._set_global(h, layout, start, start + g)
        if full_end < nb:  # a short last window
            start = min(full_end + offset, nb - g)
            self._set_global(h, layout, max(start, 0), max(start, 0) + g)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self._finish(layout)


class VariableSparsityConfig(SparsityConfig):
    """Random, variable-size local windows, and global blocks (or ranges of blocks).

    Args:
        num_random_blocks: random key blocks per query block row (drawn with ``seed``).
        local_window_blocks: sizes of the local windows in order; the last size repeats to
            the end of the sequence.
        global_block_indices: global blocks (or range starts when
            ``global_block_end_indices`` is given); indices past the sequence are ignored.
        global_block_end_indices: exclusive range ends, same length as the starts.
        attention: ``"bidirectional"`` or ``"unidirectional"``.
        horizontal_global_attention: global blocks are rows as well as columns;
            bidirectional only.
        seed: seed of the random blocks.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_random_blocks: int = 0, local_window_blocks: Sequence[int] = (4,),
                 global_block_indices: Sequence[int] = (0,),
                 global_block_end_indices: Optional[Sequence[int]] = None,
                 attention: str = BIDIRECTIONAL, horizontal_global_attention: bool = False,
                 seed: int = 0):
        super().__init__(num_heads, block, different_layout_per_head)
        check_positive("num_random_blocks", num_random_blocks, minimum=0)
        local_window_blocks = list(local_window_blocks)
        if not local_window_blocks:
            raise ValueError("local_window_blocks must hold at least one window size")
        for i, w in enumerate(local_window_blocks):
            check_positive(f"local_window_blocks[{i}]", w)
        global_block_indices = list(global_block_indices)
        if global_block_end_indices is not None:
            global_block_end_indices = list(global_block_end_indices)
        check_global_indices(global_block_indices, global_block_end_indices)
        check_attention(attention)
        if horizontal_global_attention and attention != BIDIRECTIONAL:
            raise ValueError("horizontal_global_attention needs attention 'bidirectional'")
        self.num_random_blocks = num_random_blocks
        self.local_window_blocks = local_window_blocks
        self.global_block_indices = global_block_indices
        self.global_block_end_indices = global_block_end_indices
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        check_seed(seed)
        self.seed = seed

    def set_random_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.num_random_blocks == 0:
            return layout
        if nb < self.num_random_blocks:
            raise ValueError(
                f"num_random_blocks ({self.num_random_blocks}) is more than the {nb} blocks "
                f"of the sequence")
        gen = random_generator(self.seed, h)
        for row in range(nb):
            cols = torch.randperm(nb, generator=gen)[: self.num_random_blocks]
            layout[h, row, cols] = 1
        return layout

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        windows, start = [], 0
        for size in self.local_window_blocks:
            if start >= nb:
                break
            windows.append((start, min(start + size, nb)))
            start += size
        last = self.local_window_blocks[-1]
        windows += [(s, min(s + last, nb)) for s in range(start, nb, last)]
        local_windows(layout, h, windows, self.attention == UNIDIRECTIONAL)
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        ends = self.global_block_end_indices or [s + 1 for s in self.global_block_indices]
        for start, end in zip(self.global_block_indices, ends):
            if start >= nb:
                continue
            end = min(end, nb)
            if self.horizontal_global_attention:
                layout[h, start:end, :] = 1
            first_row = 0 if self.attention == BIDIRECTIONAL else start
            layout[h, first_row:, start:end] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout)
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self._finish(layout)


class BigBirdSparsityConfig(SparsityConfig):
    """Random, sliding-window and global blocks (BigBird, Zaheer et al.).

    Args:
        num_random_blocks: random key blocks per query block row (within ``0..row`` when
            unidirectional), drawn with ``seed``.
        num_sliding_window_blocks: width of the sliding window, centred on the diagonal.
        num_global_blocks: the first blocks, attended by and attending to all.
        attention: ``"bidirectional"`` or ``"unidirectional"`` (lower triangle only).
        seed: seed of the random blocks.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_random_blocks: int = 1, num_sliding_window_blocks: int = 3,
                 num_global_blocks: int = 1, attention: str = BIDIRECTIONAL, seed: int = 0):
        super().__init__(num_heads, block, different_layout_per_head)
        check_positive("num_random_blocks", num_random_blocks, minimum=0)
        check_positive("num_sliding_window_blocks", num_sliding_window_blocks)
        check_positive("num_global_blocks", num_global_blocks, minimum=0)
        check_attention(attention)
        self.num_random_blocks = num_random_blocks
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        check_seed(seed)
        self.seed = seed

    def _check_fits(self, nb: int) -> None:
        for name in ("num_random_blocks", "num_sliding_window_blocks", "num_global_blocks"):
            if getattr(self, name) > nb:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is more than the {nb} blocks of the "
                    f"sequence")

    def set_random_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.num_random_blocks == 0:
            return layout
        gen = random_generator(self.seed, h)
        for row in range(nb):
            n = nb if self.attention == BIDIRECTIONAL else row + 1
            cols = torch.randperm(n, generator=gen)[: self.num_random_blocks]
            layout[h, row, cols] = 1
        return layout

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        sliding_window(layout, h, self.num_sliding_window_blocks, unidirectional=False)
        return layout

    def set_global_layout_itc(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        g = self.num_global_blocks
        layout[h, :g, :] = 1
        layout[h, :, :g] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        self._check_fits(layout.shape[1])
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout)
            self.set_sliding_window_layout(h, layout)
            self.set_global_layout_itc(h, layout)
        return self._finish(layout)


class BSLongformerSparsityConfig(SparsityConfig):
    """Sliding window plus global blocks (block-sparse Longformer, Beltagy et al.).

    Args:
        num_sliding_window_blocks: width of the sliding window, centred on the diagonal.
        global_block_indices: global blocks (or range starts with
            ``global_block_end_indices``); each is a whole row and a whole column.
        global_block_end_indices: exclusive range ends, same length as the starts.
        attention: ``"bidirectional"`` or ``"unidirectional"`` (lower triangle only).
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False,
                 num_sliding_window_blocks: int = 3, global_block_indices: Sequence[int] = (0,),
                 global_block_end_indices: Optional[Sequence[int]] = None,
                 attention: str = BIDIRECTIONAL):
        super().__init__(num_heads, block, different_layout_per_head)
        check_positive("num_sliding_window_blocks", num_sliding_window_blocks)
        global_block_indices = list(global_block_indices)
        if global_block_end_indices is not None:
            global_block_end_indices = list(global_block_end_indices)
        check_global_indices(global_block_indices, global_block_end_indices)
        check_attention(attention)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = global_block_indices
        self.global_block_end_indices = global_block_end_indices
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.num_sliding_window_blocks > nb:
            raise ValueError(
                f"num_sliding_window_blocks ({self.num_sliding_window_blocks}) is more than "
                f"the {nb} blocks of the sequence")
        sliding_window(layout, h, self.num_sliding_window_blocks, unidirectional=False)
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        ends = self.global_block_end_indices or [s + 1 for s in self.global_block_indices]
        for start, end in zip(self.global_block_indices, ends):
            if start >= nb:
                continue
            end = min(end, nb)
            layout[h, start:end, :] = 1
            layout[h, :, start:end] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
            self.set_global_layout(h, layout)
        return self._finish(layout)


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """A sliding window only (as in GPT-3's local layers).

    Args:
        num_sliding_window_blocks: width of the window, centred on the diagonal when
            bidirectional, ending at it when unidirectional.
        attention: ``"unidirectional"`` (default) or ``"bidirectional"``.
    """

    def __init__(self, num_heads: int, block: int = 16, num_sliding_window_blocks: int = 3,
                 attention: str = UNIDIRECTIONAL):
        super().__init__(num_heads, block, different_layout_per_head=False)
        check_positive("num_sliding_window_blocks", num_sliding_window_blocks)
        check_attention(attention)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.num_sliding_window_blocks > nb:
            raise ValueError(
                f"num_sliding_window_blocks ({self.num_sliding_window_blocks}) is more than "
                f"the {nb} blocks of the sequence")
        sliding_window(layout, h, self.num_sliding_window_blocks,
                        unidirectional=self.attention == UNIDIRECTIONAL)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        self.set_sliding_window_layout(0, layout)
        return self._finish(layout)
