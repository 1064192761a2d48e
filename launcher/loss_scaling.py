"""fp16 loss scaling where DeepSpeed's engine leaves it undone.

With fp16 and ZeRO stage 0, DeepSpeed 0.19 wraps the optimizer in ``FP16_Optimizer`` or
``FP16_UnfusedOptimizer``, whose ``step`` divides the gradients by the current loss scale;
but ``engine.backward`` multiplies the loss by that scale only for ZeRO optimizers (and torch
autocast). So the gradients reach the weights divided by the scale (2**16 by default) and
never overflow: training all but stops, and dynamic loss scaling never skips a step
(DeepSpeed pull request 8393, open). ``scaled_backward`` applies the scale where the engine
does not, and leaves the gradient alone where it does, so it stays right once DeepSpeed is
fixed.

    loss = engine(batch)
    scaled_backward(engine, loss)        # instead of engine.backward(loss)
    engine.step()
"""
from __future__ import annotations

import torch

__all__ = ["scaled_backward", "unapplied_loss_scale"]


def unapplied_loss_scale(engine):
    """The loss-scale state (``cur_scale``) of an fp16 optimizer whose ``step`` unscales
    the gradients while ``engine.backward`` may not scale the loss; None where the engine's
    own path scales it (ZeRO optimizers, torch autocast) or nothing is scaled (bf16, fp32)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    state = getattr(opt, "loss_scale_config", None)
    if state is None or not getattr(state, "use_grad_scaling", False):
        return None
    try:
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
    except ImportError:  # another DeepSpeed layout: left to its own engine.backward
        return None
    if isinstance(opt, ZeROOptimizer) or getattr(engine, "torch_autocast_z0_gradscaler", None):
        return None
    return state


def scaled_backward(engine, loss: torch.Tensor):
    """``engine.backward(loss)`` with the fp16 loss scale applied: a hook on ``loss`` (a
    scalar tensor of the autograd graph) multiplies the gradient that reaches it by the
    optimizer's current scale when that gradient is ``1 / gradient_accumulation_steps`` (the
    engine did not scale), and passes it on unchanged when it is ``scale / steps`` (it did).
    Returns what ``engine.backward`` returns."""
    state = unapplied_loss_scale(engine)
    scale = float(state.cur_scale) if state is not None else 1.0
    if scale == 1.0 or not loss.requires_grad:
        return engine.backward(loss)
    steps = engine.gradient_accumulation_steps()

    def apply_scale(grad):
        undone = (grad.float() * steps - 1.0).abs() < 1e-3
        return torch.where(undone, grad * scale, grad)

    handle = loss.register_hook(apply_scale)
    try:
        return engine.backward(loss)
    finally:
        handle.remove()
