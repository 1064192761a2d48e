"""LAMB in plain PyTorch, used when DeepSpeed's fused LAMB (a CUDA extension built on first
use) cannot be built on the machine. Same hyper-parameters as DeepSpeed's ``"Lamb"``
optimizer config: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``max_coeff``, ``min_coeff``.

Per parameter: Adam moments with bias correction, ``update = m / (sqrt(v) + eps) + wd * p``,
trust ratio ``||p|| / ||update||`` clipped to ``[min_coeff, max_coeff]`` (1 where a norm is 0),
``p -= lr * ratio * update``.

``master_weights=True`` keeps a float32 copy of every lower-precision parameter in the
optimizer state (saved with it) and steps that copy, writing it back rounded: bf16 weights
train as they would under DeepSpeed's bf16 optimizer wrapper, without its per-parameter
overflow test (a host sync per parameter).

``max_grad_norm > 0`` first scales the gradients of every group by
``min(1, max_grad_norm / (||g|| + 1e-6))`` (``||g||``: the 2-norm over all of them), as
DeepSpeed's ``"gradient_clipping"`` does, in a few multi-tensor ops instead of four per
parameter; the norm before clipping is kept as ``_global_grad_norm`` (a tensor), which
DeepSpeed's engine reports.
"""
from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 max_coeff=10.0, min_coeff=0.01, bias_correction=True, master_weights=False,
                 max_grad_norm=0.0, **unused):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_coeff=max_coeff, min_coeff=min_coeff,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.max_grad_norm = float(max_grad_norm)
        self._global_grad_norm = None

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer``'s, but the float32 state (moments, master weights)
        stays float32: the base class casts a state tensor to its parameter's dtype, which
        for a bf16 parameter would round the master weights."""
        super().load_state_dict(state_dict)
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if torch.is_tensor(value) and value.dtype == torch.float32 and key != "step":
                        self.state[p][key] = value.to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, [p for p in group["params"] if p.grad is not None])
                for group in self.param_groups]
        work = [(group, params, [p.grad.float() for p in params]) for group, params in work
                if params]
        if self.max_grad_norm > 0 and work:
            grads = [g for _, _, gs in work for g in gs]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self._global_grad_norm = norm
            torch._foreach_mul_(grads, (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
        for group, params, grads in work:
            self._update(group, params, grads)
        return loss

    def _update(self, group, params, grads):
        """One LAMB step over a group's parameters (``grads``: their gradients in float32)
        with ``torch._foreach_*`` kernels (a few launches per group, not a dozen per
        parameter) and no host sync."""
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if self.master_weights and p.dtype != torch.float32:
                    state["master"] = p.detach().float()
            state["step"] += 1
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        steps = [self.state[p]["step"] for p in params]
        if group["bias_correction"]:
            m_hat = torch._foreach_div(m, [1 - beta1 ** s for s in steps])
            denom = torch._foreach_div(v, [1 - beta2 ** s for s in steps])
        else:
            m_hat, denom = m, torch._foreach_mul(v, 1.0)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(m_hat, denom)
        # the master copy, else the parameter itself where it is float32, else a float32 copy
        p32 = [self.state[p].get("master", p) for p in params]
        p32 = [q if q.dtype == torch.float32 else q.float() for q in p32]
        if group["weight_decay"]:
            torch._foreach_add_(update, p32, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(p32))
        u_norm = torch.stack(torch._foreach_norm(update))
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp_min(1e-38),
                            torch.ones_like(w_norm))
        scale = ratio.clamp(group["min_coeff"], group["max_coeff"]) * -group["lr"]
        torch._foreach_mul_(update, list(scale.unbind()))
        torch._foreach_add_(p32, update)
        narrow = [(p, q) for p, q in zip(params, p32) if p is not q]
        if narrow:
            torch._foreach_copy_([p for p, _ in narrow], [q for _, q in narrow])


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
