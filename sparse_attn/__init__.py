"""Block-sparse attention for DeepSpeed training."""
__version__ = "0.1.0"
