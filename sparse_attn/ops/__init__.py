"""Block-sparse operators: autograd functions over Triton kernels (CUDA, or CPU tensors under
TRITON_INTERPRET=1) and a pure-PyTorch block-sparse backend for every other device."""
from .attention import block_sparse_attention
from .fused import fused_block_sparse_attention, fused_supported
from .matmul import MatMul
from .softmax import Softmax

__all__ = ["block_sparse_attention", "fused_block_sparse_attention", "fused_supported", "MatMul",
           "Softmax"]
