"""The float64 dense oracle every backend is compared against.

Never shipped as a backend: it materialises the full [batch, heads, seq, seq] score matrix.
"""
import pytest
import torch


def layout_to_token_mask(layout: torch.Tensor, block: int) -> torch.Tensor:
    """[heads, nb, nb] 0/1 block layout -> [heads, nb*block, nb*block] bool token mask."""
    return layout.bool().repeat_interleave(block, 1).repeat_interleave(block, 2)


def reference_attention(q, k, v, layout, block, scale=None, causal=False,
                        key_padding_mask=None, rpe=None, attn_mask=None):
    """Dense masked attention in float64.

    q, k, v: [batch, heads, seq, head_dim]; layout: [heads, nb, nb] with nb * block == seq.
    key_padding_mask: additive [batch, seq] (0 keeps, -inf drops, other values are added).
    rpe: [batch or 1, heads or 1, seq, seq] added to the scaled scores.
    attn_mask: additive [seq, seq].
    causal: drop keys after the query (used with unidirectional layouts).
    A row with no visible key gives zeros. Returns float64 [batch, heads, seq, head_dim].
    """
    q, k, v = (t.detach().double() if not t.requires_grad else t.double() for t in (q, k, v))
    seq, d = q.shape[-2], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if rpe is not None:
        s = s + rpe.double()
    if key_padding_mask is not None:
        s = s + key_padding_mask.double()[:, None, None, :]
    if attn_mask is not None:
        s = s + attn_mask.double()
    keep = layout_to_token_mask(layout.to(q.device), block)[None]
    if causal:
        keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v)


# Relative Frobenius-norm error bounds (see the device library's METHOD.md): float32 on the
# matrix units (tf32) lands near 3e-4, bf16/fp16 operands between 1e-3 and 1e-2.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_error(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output holds NaN or inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel_close(out, ref, dtype, factor=1.0):
    err = rel_error(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} ({dtype})"


def kernel_cases(blocks, full):
    """pytest params (dtype, block, head_dim, causal, padded) of a kernel test matrix: the
    full cross when ``full`` (on a GPU), else one head_dim per (dtype, block, causal, padded)
    case, rotating so that every head_dim meets every dtype, block, causal and padding
    setting (the interpreter is slow)."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        for block in blocks:
            for causal in (False, True):
                for padded in (False, True):
                    for d in (32, 64, 128):
                        rot = block // 16 + causal + 2 * padded + (dtype == torch.bfloat16)
                        if full or d == (32, 64, 128)[rot % 3]:
                            cases.append(pytest.param(
                                dtype, block, d, causal, padded,
                                id=f"{str(dtype)[6:]}-b{block}-d{d}-"
                                   f"{'causal' if causal else 'bidir'}-"
                                   f"{'kpm' if padded else 'nokpm'}"))
    return cases
