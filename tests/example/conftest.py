"""The bing_bert example's tests import its files (``modeling``, ``deepspeed_train``,
``residual_norm``, ...) and the benchmark scripts as top-level modules, as the example and the
scripts import each other: the repository root, the example's folder and ``scripts/`` go on
the path before any test module is imported."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.join(ROOT, "examples", "bing_bert"), os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)
