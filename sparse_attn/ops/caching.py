"""Keys and placement of the device-side tables built from a layout (the fused kernel's
look-up tables, MatMul/Softmax tables, the torch backend's block index), shared by every
backend so that they are cached and built the same way.

    key = layout_identity(layout)             # which layout tensor, in which state (no sync)
    key = layout_digest(cpu_layout)           # what it holds (MatMul/Softmax: equal layouts
                                              # of different modules share their tables)
    table = cached_table(kind, key, block, device, build)
    cache = LayoutCache(64, TABLE_BYTES); table = cache.get(key, layout, device, build)  # LRU
"""
import hashlib
import threading
from collections import OrderedDict
from typing import Optional

import torch

__all__ = ["layout_identity", "layout_digest", "cached_table", "table_cache_size",
           "LayoutCache", "TABLE_BYTES", "build_outside_graph_pools"]

# Bytes of tables (and the layouts they pin) each layout-keyed cache may hold: the tables of
# the longest layouts of a few lengths (BigBird 64 at 262144 tokens: 3 GiB with its layout).
TABLE_BYTES = 4 << 30


def layout_identity(layout: torch.Tensor) -> tuple:
    """Key of one layout tensor as it is now: its storage, offset, shape, strides, dtype,
    device and version counter. Views that read the same blocks get the same key; a view
    that reads them differently (a transpose) or an in-place change gets another. Keep a
    reference to ``layout`` beside what is cached under this key, so its storage (and the
    key) stays valid."""
    try:
        version = layout._version
    except Exception:  # inference tensors have no version counter
        version = -1
    return (layout.untyped_storage().data_ptr(), layout.storage_offset(), tuple(layout.shape),
            tuple(layout.stride()), layout.dtype, str(layout.device), version)


def layout_digest(layout: torch.Tensor) -> tuple:
    """Content key of a CPU 0/1 layout: equal only for equal layouts."""
    digest = hashlib.sha1(layout.to(torch.uint8).numpy().tobytes()).hexdigest()
    return (tuple(layout.shape), digest)


_TABLES: dict = {}


def cached_table(kind: str, key, block: int, device, build):
    """The ``kind`` table of the layout keyed ``key`` at ``block`` on ``device``; ``build()``
    makes it (outside CUDA-graph pools) the first time."""
    full_key = (kind, key, block, str(device))
    table = _TABLES.get(full_key)
    if table is None:
        table = _TABLES[full_key] = build_outside_graph_pools(build, torch.device(device))
    return table


def table_cache_size() -> int:
    """How many MatMul/Softmax tables are cached."""
    return len(_TABLES)


class LayoutCache:
    """Tables keyed on a ``layout_identity`` key, least recently used dropped past ``size``
    entries or past ``max_bytes`` of tables and the layouts they pin (those of the latest
    layout stay, whatever their size). Each entry keeps its layout tensor alive: the key
    names that tensor's storage, which must not be freed and reused by another layout while
    the entry stands. The byte bound matters at long sequences, where layouts and tables grow
    with the square of the length (BigBird 64 at 262144 tokens: a 1.5 GiB layout and two
    0.75 GiB tables) and batches of varying length would otherwise pin a layout per length."""

    def __init__(self, size: int, max_bytes: Optional[int] = None):
        self.size, self.max_bytes = size, max_bytes
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, key, layout: torch.Tensor, device: torch.device, build):
        """The table of ``key``; ``build()`` makes it (outside CUDA-graph pools) on a miss."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[1]
        table = build_outside_graph_pools(build, device)
        self._entries[key] = (layout, table)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        if self.max_bytes is not None:
            # the oldest first, but never a table of the new entry's layout: a layout's row and
            # column tables must coexist, or a step would rebuild them layer after layer
            mine = layout.untyped_storage().data_ptr()
            for old in [k for k, (lay, _) in self._entries.items()
                        if lay.untyped_storage().data_ptr() != mine]:
                if self.nbytes() <= self.max_bytes:
                    break
                del self._entries[old]
        return table

    def nbytes(self) -> int:
        """Bytes of the cached tables and of the layouts they keep alive, each storage
        counted once."""
        seen, total = set(), 0
        for layout, table in self._entries.values():
            for t in (layout, *_tensors(table)):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _tensors(obj, depth=0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3:
        if isinstance(obj, dict):
            items = obj.values()
        elif isinstance(obj, (list, tuple)):
            items = obj
        elif hasattr(obj, "__slots__"):
            items = [getattr(obj, n, None) for n in obj.__slots__]
        elif hasattr(obj, "__dict__"):
            items = vars(obj).values()
        else:
            return
        for item in items:
            yield from _tensors(item, depth + 1)


def build_outside_graph_pools(build, device: torch.device):
    """``build()`` for a table cached on ``device``. On CUDA it runs on a fresh thread, whose
    stream is synchronized before returning, and every CUDA tensor of the result is recorded
    on the caller's stream.

    Why: torch.compile(mode="reduce-overhead") warms a CUDA graph up with the allocations of
    the calling thread routed to the graph's private pool; a cached table built there would
    be a live tensor the graph does not own, which cudagraph trees refuse. Built on another
    thread it lives in the ordinary allocator; ``record_stream`` keeps its memory from being
    reused (after eviction) before the caller's kernels are done with it. Runs once per
    table, so the thread costs nothing per call."""
    if device.type != "cuda":
        return build()
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    result = {}

    def target():
        try:
            with torch.cuda.device(device):
                result["value"] = build()
                torch.cuda.current_stream(device).synchronize()
        except BaseException as err:  # re-raised on the caller's thread
            result["error"] = err

    worker = threading.Thread(target=target, name="sparse_attn-table")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    stream = torch.cuda.current_stream(device)
    for t in _tensors(result["value"]):
        if t.is_cuda:
            t.record_stream(stream)
    return result["value"]
