"""``launcher.scaled_backward``: the fp16 loss scale applied exactly once, whether or not
DeepSpeed's engine applies it. Engines stand in for DeepSpeed's here (the end-to-end check
is tests/example/test_bing_bert.py::test_fp16_overflow_skips_the_step_and_goes_on)."""
from types import SimpleNamespace

import pytest
import torch

from launcher import scaled_backward, unapplied_loss_scale


class Engine:
    """DeepSpeed's engine at fp16 and ZeRO stage 0, as far as scaled_backward sees it:
    ``backward`` divides by the accumulation steps and multiplies by the scale only when
    ``scales`` (a DeepSpeed with the fix)."""

    def __init__(self, scales, scale=1024.0, steps=2, fp16=True):
        self.scales, self.steps, self.fp16 = scales, steps, fp16
        self.optimizer = SimpleNamespace(
            loss_scale_config=SimpleNamespace(use_grad_scaling=True, cur_scale=scale))

    def fp16_enabled(self):
        return self.fp16

    def gradient_accumulation_steps(self):
        return self.steps

    def backward(self, loss):
        loss = loss / self.steps
        if self.scales:
            loss = loss * self.optimizer.loss_scale_config.cur_scale
        loss.backward()
        return loss


@pytest.mark.parametrize("engine_scales", [False, True], ids=["engine-leaves-it", "engine-scales"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-loss", "fp16-loss"])
def test_scale_applied_once(engine_scales, dtype):
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, dtype=torch.float64)
    engine = Engine(engine_scales)
    scaled_backward(engine, (w.to(dtype) * x.to(dtype)).sum())
    want = x * 1024.0 / 2
    assert torch.allclose(w.grad, want, rtol=2e-3), (w.grad, want)


def test_nothing_to_scale():
    """bf16/fp32 (no fp16), or a scale of 1: engine.backward as it is."""
    for engine in (Engine(False, fp16=False), Engine(False, scale=1.0)):
        w = torch.ones(3, requires_grad=True)
        scaled_backward(engine, (w * 3).sum())
        assert torch.equal(w.grad, torch.full((3,), 1.5))
    assert unapplied_loss_scale(Engine(False, fp16=False)) is None


def test_overflow_reaches_the_gradients():
    """A scale that overflows fp16 makes the gradients inf, as DeepSpeed's own scaled
    backward would, so that its overflow check skips the step."""
    w = torch.ones(3, dtype=torch.float16, requires_grad=True)
    scaled_backward(Engine(False, scale=2.0 ** 32), (w * 100).sum())
    assert not torch.isfinite(w.grad).any()
