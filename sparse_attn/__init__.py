"""Block-sparse attention for DeepSpeed training: the maintained successor of DeepSpeed
Sparse Attention. ``from sparse_attn import ...`` replaces ``from
deepspeed.ops.sparse_attention import ...``."""
from .sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
)
from .ops import MatMul, Softmax, block_sparse_attention
from .sparse_self_attention import SparseSelfAttention
from .bert_sparse_self_attention import BertSparseSelfAttention
from .sparse_attention_utils import SparseAttentionUtils
from .sequence_parallel import SequenceParallelSparseAttention

__version__ = "0.1.0"

__all__ = [
    "SparsityConfig", "DenseSparsityConfig", "FixedSparsityConfig", "VariableSparsityConfig",
    "BigBirdSparsityConfig", "BSLongformerSparsityConfig", "LocalSlidingWindowSparsityConfig",
    "MatMul", "Softmax", "block_sparse_attention", "SparseSelfAttention", "BertSparseSelfAttention",
    "SparseAttentionUtils", "SequenceParallelSparseAttention",
]
