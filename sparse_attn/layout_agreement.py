"""Check that every rank of a process group holds the same sparse attention layout.

One collective (``all_gather_object`` of a short checksum string) per call: call it once per
layout, when the layout is built, never per forward. Uses ``torch.distributed`` only.
"""
from __future__ import annotations

from typing import List, Optional

import torch.distributed as dist

__all__ = ["check_same_layout"]


def check_same_layout(checksum: str, group=None) -> Optional[List[str]]:
    """Gather ``checksum`` (``layout_checksum(layout)``) from every rank of ``group`` (the
    default group when None) and raise ``RuntimeError`` naming every rank's checksum when
    they differ.

    Returns the gathered checksums in rank order of ``group``, or None when there is nothing
    to compare (``torch.distributed`` not initialised, or a group of one rank). Every rank of
    ``group`` must call it (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    sums: List[Optional[str]] = [None] * size
    dist.all_gather_object(sums, checksum, group=group)
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks built different sparse attention layouts: {sums}")
    return sums
