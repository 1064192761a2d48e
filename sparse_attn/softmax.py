"""``deepspeed.ops.sparse_attention.softmax`` maps here: ``from sparse_attn.softmax import
Softmax``. The op lives in ``sparse_attn.ops.softmax``."""
from .ops.softmax import Softmax

__all__ = ["Softmax"]
