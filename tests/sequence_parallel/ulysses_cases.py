"""The cases the Ulysses tests run, shared by the rank processes (ulysses_worker.py) and the
pytest side that computes the single-process references: layouts, shapes, data."""
import torch

from sparse_attn.sparsity_config import (
    BigBirdSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
)

HEADS, BLOCK, SEQ, HEAD_DIM, BATCH = 4, 16, 256, 16, 2
MAX_SEQ = 512  # the layout is built here; SEQ uses its top-left corner

# Per-head layouts (different_layout_per_head=True) so that a rank on the wrong heads fails.
CONFIGS = {
    "fixed_perhead": lambda: FixedSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_local_blocks=4,
        num_different_global_patterns=4),
    "bigbird_perhead": lambda: BigBirdSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_random_blocks=2, seed=5),
    "fixed_causal_perhead": lambda: FixedSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_local_blocks=4,
        num_different_global_patterns=4, attention="unidirectional"),
    "local_causal": lambda: LocalSlidingWindowSparsityConfig(
        HEADS, BLOCK, num_sliding_window_blocks=3, attention="unidirectional"),
}

# name -> (config name, key padding mask mode)
CASES = {
    "fixed_perhead": ("fixed_perhead", "add"),
    "bigbird_perhead": ("bigbird_perhead", "add"),
    "fixed_causal_perhead": ("fixed_causal_perhead", "add"),
    "local_causal_mul": ("local_causal", "mul"),
}
# Cases that also pass an attn_mask ([SEQ, SEQ], 0/1 keep mask in the default "mul" mode).
WITH_ATTN_MASK = {"bigbird_perhead"}


def make_attn_mask(case: str, seed: int):
    """``[SEQ, SEQ]`` float 0/1 keep mask (about 1 in 5 pairs dropped, the diagonal kept) for
    the cases of ``WITH_ATTN_MASK``, else None."""
    if case not in WITH_ATTN_MASK:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    keep = (torch.rand(SEQ, SEQ, generator=g) > 0.2) | torch.eye(SEQ, dtype=torch.bool)
    return keep.float()


def make_data(case: str, seed: int):
    """Full-sequence fp32 ``q, k, v, grad_out`` ``[BATCH, HEADS, SEQ, HEAD_DIM]`` and the
    key padding mask ``[BATCH, SEQ]`` of ``case`` (sequence b drops its last 13 * b + 5
    tokens): additive float for mode "add", BERT's extended ``[BATCH, 1, 1, SEQ]`` 0/1 keep
    mask for mode "mul". The attention mask is ``make_attn_mask``'s."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=g) for _ in range(4))
    keep = torch.ones(BATCH, SEQ)
    for b in range(BATCH):
        keep[b, SEQ - 13 * b - 5:] = 0
    mode = CASES[case][1]
    if mode == "add":
        mask = torch.zeros(BATCH, SEQ).masked_fill(keep == 0, float("-inf"))
    else:
        mask = keep[:, None, None, :]
    return q, k, v, grad, mask


def additive(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The additive form (what the float64 reference takes) of a key padding mask (``[BATCH,
    SEQ]`` from either form) or of an attention mask ``[SEQ, SEQ]``, given in ``mode``."""
    mask = mask.reshape(mask.shape[0], mask.shape[-1])
    if mode == "add":
        return mask
    return torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))
