import os
import sys

import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. The
# variable is read when a kernel is decorated, so it must be set before any kernel module
# is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
