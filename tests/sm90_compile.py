"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU.

Run by tests/ops/test_compile_sm90.py in a subprocess without TRITON_INTERPRET. Triton's own
compiler (and the ptxas it ships) builds every kernel of the fused forward and backward pass
for a set of cases that between them take every value of every constexpr: tile shapes of
each head_dim, fine layouts (blocks 16, 32) and coarse ones (64, 128), causal, key padding,
split rows, a sequence that is not a multiple of the tile, the one-loop variant. Then the
MatMul (sdd, dsd, dds, forward and backward, so every transpose) and Softmax (rpe, key
padding and attention masks, forward and backward) kernels for each dtype and block. A
stand-in driver answers Triton's questions about the device and records each launch
instead of running it, so what is checked is that the kernels compile (the interpreter,
which runs them in CI, never compiles them), not their results. For every kernel it
also checks that the direct launch path (sparse_attn/ops/launch.py) hands the launcher the
same binary, grid and arguments as Triton's ``kernel[grid]``, without going through it. Prints one line per case
and exits 1 on the first failure.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import driver as nvidia  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAUNCHES = []


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        assert kernel, f"{name}: empty binary"
        return (object(), name, 64, 0, 1024)  # module, function, registers, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


RECORDS = []  # (kernel name, grid, binary, every argument) per launch, tensors by layout


def _arg(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
    if isinstance(a, TensorDescriptor):
        return ("descriptor", _arg(a.base), tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), a.padding)
    return a


class _RecordingLauncher:
    def __init__(self, src, metadata):
        self.name = src.fn.__name__

    def __call__(self, gx, gy, gz, stream, function, packed, launch_metadata, enter, exit_,
                 *args):
        LAUNCHES.append(self.name)
        RECORDS.append((self.name, (gx, gy, gz), stream, function, packed, enter, exit_,
                        tuple(map(_arg, args))))


class _H100(nvidia.CudaDriver):
    def __init__(self):  # no CUDA library is loaded
        self.utils = _Utils()
        self.launcher_cls = _RecordingLauncher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    @staticmethod
    def is_active():
        return True


# (block, head_dim, seq, key padding, causal, split rows, fwd tile override, how it is called)
# how: "op" calls the custom ops' implementations; "public" the public function and autograd,
# with [B, N, H, D] inputs and gradient and a float16 [B, 1, 1, N] mask (converted per call);
# "misaligned" the public function with an aligned q, then with a q of the same shape 8 bytes
# off 16-byte alignment (its launches must not reuse the binary for aligned pointers);
# "fixed" as "op" on a bidirectional Fixed layout (packed key tiles, contiguous query tiles).
# The causal cases (unidirectional Fixed) run on packed query and key tiles.
CASES = [
    (16, 64, 1024, True, False, True, None, "op"),
    (32, 64, 1024, False, True, False, None, "op"),
    (64, 64, 1024, False, False, True, None, "op"),
    (128, 64, 1024, True, True, False, None, "op"),
    (64, 32, 1024, True, False, False, None, "op"),
    (16, 128, 1024, False, True, True, None, "op"),
    (16, 64, 1008, True, False, False, None, "op"),  # 1008 is not a multiple of the 64-row tile
    (16, 64, 1024, False, False, False, (64, 32, 4, 3, True), "op"),  # one loop
    (64, 128, 1024, False, False, False, None, "negative scale"),  # no FMA-folded max
    (64, 64, 1024, True, False, True, None, "public"),
    (32, 64, 1024, False, False, False, None, "misaligned"),
    (16, 64, 1024, True, False, True, None, "fixed"),  # packed key tiles only (Q, O by TMA)
]


JIT_RUNS = [0]
KEYED_RUNS = [0]  # launches through Launcher.__call__ (which keys every argument)


def both_ways(run_case, prepared=False):
    """Run ``run_case`` through Triton's kernel[grid], then through the direct path
    (launch.py) once to fill its cache and once from it. Returns None when the two recorded
    the same launches, argument for argument, and the last never entered JITFunction.run
    (with ``prepared``: nor Launcher.__call__, i.e. every launch was a Prepared one);
    else what differs."""
    from sparse_attn.ops import launch

    def recorded():
        LAUNCHES.clear()
        RECORDS.clear()
        JIT_RUNS[0] = KEYED_RUNS[0] = 0
        run_case()
        return list(RECORDS)

    launch.set_direct_launch(False)
    through_jit = recorded()
    launch.set_direct_launch(True)
    recorded()
    direct = recorded()
    if JIT_RUNS[0] or direct != through_jit:
        return (f"direct launches differ from kernel[grid] ({JIT_RUNS[0]} went through "
                f"JITFunction.run):\n{through_jit}\n{direct}")
    if prepared and KEYED_RUNS[0]:
        return f"{KEYED_RUNS[0]} launches went through Launcher.__call__, not a Prepared launch"
    return None


def _count_jit_runs():
    from sparse_attn.ops import launch

    run = triton.runtime.jit.JITFunction.run

    def counted(self, *args, **kwargs):
        JIT_RUNS[0] += 1
        return run(self, *args, **kwargs)
    triton.runtime.jit.JITFunction.run = counted
    keyed = launch.Launcher.__call__

    def counted_keyed(self, *args, **kwargs):
        KEYED_RUNS[0] += 1
        return keyed(self, *args, **kwargs)
    launch.Launcher.__call__ = counted_keyed


def main() -> int:
    triton.runtime.driver.set_active(_H100())
    _count_jit_runs()
    from sparse_attn import BigBirdSparsityConfig, FixedSparsityConfig
    from sparse_attn.ops import common, fused
    from sparse_attn.ops.fused import lut as fused_lut
    from sparse_attn.ops.fused import op as fused_op
    from sparse_attn.ops.fused.grouping import tiles_and_groups

    common._INTERPRET = True  # the checks let CPU tensors through; nothing runs on them
    common.needs_upcast = lambda t: False  # the GPU variant of every kernel
    for (block, d, seq, kpm, causal, split, tiles, how), tma in (
            (case, tma) for case in CASES for tma in (False, True)):
        fused.set_fused_config()
        fused.set_fused_config(tma=tma)  # TMA descriptors (the H100 default) or pointers
        if tiles is not None:
            fused.set_fused_config(d, None, fwd=tiles)
        chunk = 4 if split else 1 << 30  # tiles per work item: split every row, or none
        fused_lut.split_chunk = lambda total, device, chunk=chunk: chunk
        fused.clear_caches()
        if causal:
            sc = FixedSparsityConfig(2, block, attention="unidirectional", num_local_blocks=4)
        elif how == "fixed":
            sc = FixedSparsityConfig(2, block, num_local_blocks=4)
        else:
            sc = BigBirdSparsityConfig(2, block, different_layout_per_head=True,
                                       num_random_blocks=1)
        layout = sc.make_layout(seq)
        if how in ("op", "negative scale", "fixed"):
            q, k, v, do = (torch.randn(2, 2, seq, d).to(torch.bfloat16) for _ in range(4))
            mask = torch.zeros(2, seq) if kpm else None
        else:
            q, k, v, do = (torch.randn(2, seq, 2, d).to(torch.bfloat16).transpose(1, 2)
                           for _ in range(4))
            mask = torch.zeros(2, 1, 1, seq, dtype=torch.float16) if kpm else None
        # the same shape and strides as q (so the same plan), 8 bytes off alignment
        q_off = torch.randn(q.numel() + 4).to(torch.bfloat16)[4:].as_strided(q.shape, q.stride())
        assert q_off.data_ptr() % 16
        q, k, v, q_off = (t.requires_grad_() for t in (q, k, v, q_off))

        scale = -(d ** -0.5) if how == "negative scale" else d ** -0.5

        def run_case():
            if how in ("op", "negative scale", "fixed"):
                out, lse = fused_op._fwd_op(q, k, v, layout, mask, block, scale, causal)
                fused_op._bwd_op(do, q, k, v, out, lse, layout, mask, block, scale, causal)
                return
            for q_ in (q, q_off) if how == "misaligned" else (q,):
                out = fused.fused_block_sparse_attention(q_, k, v, layout, block, causal=causal,
                                                         key_padding_mask=mask)
                torch.autograd.grad(out, (q_, k, v), do)

        try:
            differs = both_ways(run_case, prepared=how != "misaligned")
        except Exception as err:
            print(f"FAIL block {block} head_dim {d} seq {seq} kpm {kpm} causal {causal} "
                  f"split {split}: {type(err).__name__}: {err}")
            return 1
        if differs:
            print(f"FAIL block {block} head_dim {d}: {differs}")
            return 1
        want = (5 if split else 3) * (2 if how == "misaligned" else 1)
        if len(LAUNCHES) != want:
            print(f"FAIL: {len(LAUNCHES)} launches, expected {want}: {LAUNCHES}")
            return 1
        descriptors = sum(isinstance(a, tuple) and a[:1] == ("descriptor",)
                          for r in RECORDS for a in r[-1])
        _, groups = tiles_and_groups(layout, block, seq, q.device, d)
        packed_both = groups.qmap is not None and groups.kmap is not None
        if (tma and not packed_both) != (descriptors > 0):  # gathered tiles take pointers
            print(f"FAIL: tma {tma} (packed tiles {groups.qmap is not None}, "
                  f"{groups.kmap is not None}) but {descriptors} descriptors were passed")
            return 1
        print(f"ok block {block:3d} head_dim {d:3d} seq {seq} kpm {kpm!s:5} causal "
              f"{causal!s:5} split {split!s:5} {how:10} tma {tma!s:5}: {', '.join(LAUNCHES)}; "
              f"direct launches match")
    if not compile_matmul_softmax():
        return 1
    print(f"compiled for sm_90 with triton {triton.__version__}")
    return 0


# (dtype, block): every dtype and every block at least once
BLOCK_CASES = [(torch.float32, 16), (torch.float16, 32), (torch.bfloat16, 64),
               (torch.float32, 128), (torch.bfloat16, 16)]


def compile_matmul_softmax() -> bool:
    from sparse_attn.ops import MatMul, Softmax

    # main() has set common._INTERPRET (the Triton backend for CPU tensors; nothing runs)
    # and common.needs_upcast (the GPU variant of every kernel)
    for dtype, block in BLOCK_CASES:
        seq, d, heads = 4 * block, 64, 2
        layout = (torch.rand(heads, 4, 4, generator=torch.Generator().manual_seed(block))
                  < 0.6).long()
        layout[:, 0, 0] = 1
        q, k = (torch.randn(2, heads, seq, d).to(dtype).requires_grad_() for _ in range(2))
        rpe = torch.randn(1, heads, seq, seq).to(dtype)

        def run_case():
            sdd = MatMul(layout, block, "sdd", trans_b=True, backend="triton")
            dsd = MatMul(layout, block, "dsd", backend="triton")
            dds = MatMul(layout, block, "dds", backend="triton")
            softmax = Softmax(layout, block, backend="triton")
            scores = sdd(q, k)
            probs = softmax(scores, scale=0.125, rpe=rpe, key_padding_mask=torch.zeros(2, seq),
                            attn_mask=torch.ones(seq, seq))
            out = dsd(probs, k) + dds(q.transpose(-1, -2).contiguous(), probs).transpose(-1, -2)
            out.float().sum().backward()

        try:
            differs = both_ways(run_case)
        except Exception as err:
            print(f"FAIL MatMul/Softmax {dtype} block {block}: {type(err).__name__}: {err}")
            return False
        if differs:
            print(f"FAIL MatMul/Softmax {dtype} block {block}: {differs}")
            return False
        print(f"ok MatMul/Softmax {str(dtype)[6:]:8} block {block:3d}: {len(LAUNCHES)} launches "
              f"of {len(set(LAUNCHES))} kernels; direct launches match")
    return True


if __name__ == "__main__":
    sys.exit(main())
