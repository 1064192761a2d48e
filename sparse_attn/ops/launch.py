"""A cheaper way to launch an already compiled Triton kernel.

``kernel[grid](*args, **constexprs)`` re-derives, on every launch, what Triton needs to pick
the compiled binary: it binds the arguments to the signature, specializes each one, builds a
cache key from them, looks the kernel up and checks the globals it read. On the H100 host
that bookkeeping costs about 35 us a launch (``scripts/dev/host_breakdown.py``: six launches of
one BigBird forward+backward take 288 us through ``kernel[grid]`` and 69 us straight into the
compiled launcher), and a batch-1 BERT step is bound by host time.

``Launcher(module, name)(grid, *args, **constexprs)`` launches ``module.<name>`` (looked up
at each call, so a test may replace it) and keys its own cache on what Triton specializes
on (each tensor's dtype and 16-byte alignment; each int's equality to 1, divisibility by 16
and width; the constexprs and launch options). A miss goes through ``kernel[grid]`` as usual,
which compiles if needed, launches, and returns the compiled kernel, kept for the key. A hit
calls that kernel's launcher directly with the same arguments ``kernel[grid]`` would pass.

The direct path is used only where it is exactly equivalent: compiled kernels (never under
``TRITON_INTERPRET=1``) and no launch hooks installed (a profiler such as proton sets them).
``SPARSE_ATTN_DIRECT_LAUNCH=0`` in the environment, or ``set_direct_launch(False)``, turns it
off.

Computing that key costs about as much as the launch itself (some 45 arguments per fused
kernel). ``launcher.prepare(grid, **constexprs)`` returns a ``Prepared`` launch for a caller
that knows its arguments keep their specialization from call to call (the same ints, the
same tensor dtypes; the fused attention's per-signature plans do): it keys once, on its first
launch. Per call, the caller asks ``direct_context(tensors)`` once (hooks, current device and
stream, alignment of the tensors that change between calls) and launches each kernel with
``prepared.launch(context, *args)``.
``tests/sm90_compile.py`` checks, launch by launch, that both paths pass the same
arguments to the same binary.
"""
import os

import torch

from . import common

try:
    import triton
    from triton.runtime.driver import driver as _driver
except Exception:  # pragma: no cover - triton missing
    triton = None
    _driver = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - a Triton without host tensor descriptors
    TensorDescriptor = None

__all__ = ["Launcher", "Prepared", "direct_context", "set_direct_launch"]

# off under the interpreter (nothing is compiled) or with SPARSE_ATTN_DIRECT_LAUNCH=0
_DIRECT = (triton is not None and not common.interpreting()
           and os.environ.get("SPARSE_ATTN_DIRECT_LAUNCH", "1") not in ("", "0"))


def set_direct_launch(enabled: bool) -> None:
    """Turn the direct launch path on or off (on by default on GPUs; off in the interpreter)."""
    global _DIRECT
    _DIRECT = bool(enabled)


_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)


def _active(hook) -> bool:
    # Triton 3.6 keeps None when no hook is set; later versions keep an empty HookChain
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_installed() -> bool:
    if _RUNTIME is None:
        return True  # a Triton without knobs: keep to its own launch path
    return _active(_RUNTIME.launch_enter_hook) or _active(_RUNTIME.launch_exit_hook)


def _spec(a):
    """What Triton specializes an argument on (a superset of it)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        # Triton specializes a host descriptor on its dtype and block; the rest is kept too
        return (TensorDescriptor, a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.shape),
                tuple(a.strides), tuple(a.block_shape), a.padding)
    if isinstance(a, bool) or a is None or isinstance(a, float):
        return type(a), a if a is None or isinstance(a, bool) else None
    if isinstance(a, int):
        return int, a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31
    return type(a), a


class Launcher:
    """``launcher(grid, *args, **constexprs_and_options)``: launch ``module.<name>``; see the
    module doc."""

    __slots__ = ("module", "name", "cache")

    def __init__(self, module, name):
        self.module, self.name = module, name
        self.cache = {}

    def prepare(self, grid, **meta) -> "Prepared":
        """A launch of this kernel on ``grid`` with these constexprs and options, for
        arguments whose specialization does not change between calls (see ``Prepared``)."""
        return Prepared(self, grid, meta)

    def _key(self, fn, device, args, meta):
        return (id(fn), device, tuple(meta.items()), tuple(map(_spec, args)))

    def __call__(self, grid, *args, **meta):
        fn = getattr(self.module, self.name)
        if not _DIRECT:
            return fn[grid](*args, **meta)
        device = _driver.active.get_current_device()
        key = self._key(fn, device, args, meta)
        hit = self.cache.get(key)
        if hit is None or _hooks_installed():
            return self._first(fn, key, device, grid, args, meta)
        run, function, packed, tail = hit
        g = tuple(grid) + (1, 1)
        # launch metadata only feeds launch hooks, and none is active; the (inactive) hook
        # objects themselves are passed as kernel[grid] passes them
        run(g[0], g[1], g[2], _driver.active.get_current_stream(device), function, packed,
            None, _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook, *args, *tail)
        return None

    def _first(self, fn, key, device, grid, args, meta):
        kernel = fn[grid](*args, **meta)
        if _hooks_installed() or not isinstance(fn, triton.runtime.JITFunction) or kernel is None:
            return kernel
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        binder = fn.device_caches[device][-1]
        bound = binder(*args, **meta)[0]
        values = list(bound.values())
        if any(x is not y for x, y in zip(values, args)):
            return kernel  # positional arguments do not map one to one: stay on kernel[grid]
        if len(self.cache) > 256:
            self.cache.clear()
        self.cache[key] = (kernel.run, kernel.function, kernel.packed_metadata,
                           tuple(values[len(args):]))
        return kernel


def direct_context(tensors):
    """``(device, stream)`` for ``Prepared.launch`` when direct launches may be used now and
    every tensor in ``tensors`` (None entries are skipped) is 16-byte aligned; else None."""
    if not _DIRECT or _hooks_installed():
        return None
    ptrs = 0
    for t in tensors:
        if t is not None:
            ptrs |= t.data_ptr()
    if ptrs & 15:
        return None
    device = _driver.active.get_current_device()
    return device, _driver.active.get_current_stream(device)


class Prepared:
    """A launch of ``launcher``'s kernel on a fixed grid with fixed constexprs, for a caller
    whose arguments keep their specialization from call to call: the same ints and floats,
    each tensor argument the same dtype (and None stays None), each host tensor descriptor the
    same shape, strides and block; only the tensors' data (and descriptors' bases) change.

    ``prepared(*args)`` launches through the ``Launcher`` (which keys every argument and
    compiles if needed) and, the first time every tensor is 16-byte aligned, remembers the
    compiled kernel. ``prepared.launch(context, *args)``, with ``context`` from
    ``direct_context`` over the tensors that change between calls, then calls that kernel's
    launcher directly; without a context or a remembered kernel it is ``prepared(*args)``.
    """

    __slots__ = ("launcher", "grid", "meta", "entry")

    def __init__(self, launcher, grid, meta):
        self.launcher, self.meta = launcher, meta
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.entry = None  # (kernel, device, run, function, packed, tail)

    def __call__(self, *args):
        self.launcher(self.grid, *args, **self.meta)
        if self.entry is None and _DIRECT:
            self.entry = self._lookup(args)

    def launch(self, context, *args):
        entry = self.entry
        if context is None or entry is None or entry[1] != context[0]:
            return self(*args)
        fn, _, run, function, packed, tail = entry
        launcher = self.launcher
        if getattr(launcher.module, launcher.name) is not fn:  # replaced (a test's stand-in)
            return self(*args)
        g = self.grid
        run(g[0], g[1], g[2], context[1], function, packed, None, _RUNTIME.launch_enter_hook,
            _RUNTIME.launch_exit_hook, *args, *tail)
        return None

    def _lookup(self, args):
        """The Launcher's cache entry for these arguments, when every tensor is aligned (the
        ones that never change, such as look-up tables, are checked only here)."""
        if any(a.data_ptr() % 16 for a in args if isinstance(a, torch.Tensor)):
            return None
        launcher = self.launcher
        fn = getattr(launcher.module, launcher.name)
        device = _driver.active.get_current_device()
        hit = launcher.cache.get(launcher._key(fn, device, args, self.meta))
        return None if hit is None else (fn, device) + hit
