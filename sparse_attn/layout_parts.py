"""The parts the layout classes of ``sparsity_config`` are built from: the checks of their
parameters (one message per rule) and the primitives that draw windows, bands and random
blocks into a ``[heads, nb, nb]`` layout."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

__all__ = ["BIDIRECTIONAL", "UNIDIRECTIONAL", "ATTENTIONS", "BLOCKS", "check_block", "check_flag",
           "check_seed", "check_positive", "check_attention",
           "check_global_indices", "local_windows", "sliding_window", "random_generator",
           "layout_checksum"]

BIDIRECTIONAL = "bidirectional"
UNIDIRECTIONAL = "unidirectional"
ATTENTIONS = (BIDIRECTIONAL, UNIDIRECTIONAL)


BLOCKS = (16, 32, 64, 128)  # what the kernels, the JSON block and MatMul/Softmax take


def check_block(block) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")


def check_global_indices(starts: Sequence[int], ends: Optional[Sequence[int]]) -> None:
    """Global block starts, and ends (exclusive) when given: one rule for the layout classes
    and the JSON block (messages start with the key, as the JSON errors do)."""
    for i, s in enumerate(starts):
        check_positive(f"global_block_indices[{i}]", s, minimum=0)
    if ends is None:
        return
    if len(ends) != len(starts):
        raise ValueError(
            f"global_block_end_indices: {len(ends)} entries, but global_block_indices has "
            f"{len(starts)}; they must have the same length")
    for i, (s, e) in enumerate(zip(starts, ends)):
        check_positive(f"global_block_end_indices[{i}]", e, minimum=0)
        if e <= s:
            raise ValueError(
                f"global_block_end_indices[{i}]: {e} must be greater than "
                f"global_block_indices[{i}] = {s}")


def local_windows(layout: torch.Tensor, h: int, windows, unidirectional: bool) -> None:
    """Set square windows ``[start, end)`` on head ``h`` (lower triangle only if uni)."""
    for start, end in windows:
        if unidirectional:
            n = end - start
            layout[h, start:end, start:end] = torch.ones(n, n, dtype=layout.dtype).tril()
        else:
            layout[h, start:end, start:end] = 1


def sliding_window(layout: torch.Tensor, h: int, width: int, unidirectional: bool) -> None:
    nb = layout.shape[1]
    half = width // 2
    rows = torch.arange(nb)[:, None]
    cols = torch.arange(nb)[None, :]
    band = (cols >= rows - half) & (cols <= (rows if unidirectional else rows + half))
    layout[h] |= band.to(layout.dtype)


def random_generator(seed: int, h: int) -> torch.Generator:
    # One stream per (seed, head): a head's random blocks do not depend on the other heads.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + h)


def layout_checksum(layout: torch.Tensor) -> str:
    """A short stable fingerprint of a layout, to compare layouts across ranks and runs."""
    data = layout.to(torch.uint8).contiguous().cpu().numpy().tobytes()
    shape = "x".join(str(s) for s in layout.shape)
    return f"{shape}:{hashlib.sha1(data).hexdigest()[:12]}"
