"""LAMB in plain PyTorch, used when DeepSpeed's fused LAMB (a CUDA extension built on first
use) cannot be built on the machine. Same hyper-parameters as DeepSpeed's ``"Lamb"``
optimizer config: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``max_coeff``, ``min_coeff``.

Per parameter: Adam moments with bias correction, ``update = m / (sqrt(v) + eps) + wd * p``,
trust ratio ``||p|| / ||update||`` clipped to ``[min_coeff, max_coeff]`` (1 where a norm is 0),
``p -= lr * ratio * update``.
"""
from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 max_coeff=10.0, min_coeff=0.01, bias_correction=True, **unused):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_coeff=max_coeff, min_coeff=min_coeff,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat = m / (1 - beta1 ** state["step"])
                    v_hat = v / (1 - beta2 ** state["step"])
                else:
                    m_hat, v_hat = m, v
                p32 = p.float()
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p32, alpha=group["weight_decay"])
                w_norm, u_norm = p32.norm(), update.norm()
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                    torch.ones_like(w_norm))
                ratio = ratio.clamp(group["min_coeff"], group["max_coeff"])
                p.copy_((p32 - group["lr"] * ratio * update).to(p.dtype))
        return loss


def fused_lamb_available() -> bool:
    """Whether DeepSpeed's fused LAMB can be loaded (builds it on first call; CUDA only)."""
    if not torch.cuda.is_available():
        return False
    try:
        from deepspeed.ops.op_builder import FusedLambBuilder

        builder = FusedLambBuilder()
        if not builder.is_compatible():
            return False
        builder.load()
        return True
    except Exception:
        return False
