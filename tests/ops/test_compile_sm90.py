"""The fused-attention kernels compile for an H100 (sm_90) in every constexpr variant, on a
machine without a GPU (see tests/ops/sm90_compile.py). CI otherwise runs them only through
the interpreter, which never compiles them."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_fused_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "compiled for sm_90" in out
    assert out.count("\nok ") + out.startswith("ok ") == 8, out[-4000:]
