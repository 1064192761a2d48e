"""Block-sparse operators: autograd functions over Triton kernels (CUDA, or CPU tensors under
TRITON_INTERPRET=1) and a pure-PyTorch block-sparse backend for every other device."""
