"""The Triton kernels (fused attention in every constexpr variant, MatMul and Softmax for every
dtype and block) compile for an H100 (sm_90) on a machine without a GPU (see
tests/sm90_compile.py), and the direct launch path hands Triton's launcher exactly what
``kernel[grid]`` would. CI otherwise runs them only through the interpreter, which never
compiles them. The fused cases also check that a plan's prepared launches (launch.Prepared)
skip the per-call keying, and that a misaligned tensor never reuses an aligned binary."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")
DRIVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "sm90_compile.py")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, DRIVER], env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "compiled for sm_90" in out
    ok = [line for line in out.splitlines() if line.startswith("ok ")]
    assert len(ok) == 2 * 12 + 5, out[-4000:]  # fused cases (pointers, TMA), then MatMul/Softmax
    # each case also launched through launch.Launcher's direct path, identically
    assert all(line.endswith("direct launches match") for line in ok), out[-4000:]
