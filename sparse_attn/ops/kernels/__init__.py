"""Triton kernels. Nothing here knows about modules or configs; autograd wrappers live one
level up in ``sparse_attn.ops``."""
