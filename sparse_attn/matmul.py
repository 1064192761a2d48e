"""``deepspeed.ops.sparse_attention.matmul`` maps here: ``from sparse_attn.matmul import
MatMul``. The op lives in ``sparse_attn.ops.matmul``."""
from .ops.matmul import MatMul

__all__ = ["MatMul"]
