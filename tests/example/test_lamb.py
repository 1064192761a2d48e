"""The example's PyTorch LAMB (examples/bing_bert/lamb.py) against a per-parameter float64
reference of the same update, over several steps, with and without weight decay and bias
correction, for float32 and bfloat16 parameters."""

import pytest
import torch

from lamb import Lamb  # noqa: E402


def reference_lamb(params, grads_per_step, lr, betas, eps, wd, max_coeff, min_coeff, bc,
                   clip=0.0):
    """Float64 LAMB, parameter by parameter: the values after each step (``clip`` > 0: the
    gradients first scaled by min(1, clip / (their global 2-norm + 1e-6)))."""
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step, start=1):
        coef = 1.0
        if clip > 0:
            norm = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5
            coef = min(1.0, clip / (norm + 1e-6))
        for i, g in enumerate(grads):
            g = g.double() * coef
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            mh = m[i] / (1 - betas[0] ** t) if bc else m[i]
            vh = v[i] / (1 - betas[1] ** t) if bc else v[i]
            u = mh / (vh.sqrt() + eps) + wd * p[i]
            wn, un = p[i].norm(), u.norm()
            r = (wn / un).item() if wn > 0 and un > 0 else 1.0
            p[i] = p[i] - lr * min(max(r, min_coeff), max_coeff) * u
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd,bc,clip", [(0.0, True, 0.0), (0.01, True, 0.0), (0.01, False, 0.0),
                                        (0.01, True, 0.5), (0.01, True, 1e3)])
def test_lamb_matches_reference(dtype, wd, bc, clip):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    params.append(torch.zeros(4, dtype=dtype))  # a zero weight: trust ratio 1
    start = [p.clone() for p in params]
    grads = [[torch.randn(p.shape, dtype=dtype) for p in params] for _ in range(4)]
    grads[2][1] = None  # a parameter without a gradient this step keeps its value and moments
    kw = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, max_coeff=10.0,
              min_coeff=0.01, bias_correction=bc)
    opt = Lamb([torch.nn.Parameter(p) for p in params], max_grad_norm=clip, **kw)
    norms = []
    for step in grads:
        for prm, g in zip(opt.param_groups[0]["params"], step):
            prm.grad = None if g is None else g.clone()
        opt.step()
        norms.append(opt._global_grad_norm)
    if clip:
        want = [sum(float(g.double().pow(2).sum()) for g in s if g is not None) ** 0.5
                for s in grads]
        torch.testing.assert_close(torch.stack(norms).double(), torch.tensor(want).double(),
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
        assert (clip < min(want)) == (clip == 0.5)  # 0.5 clips every step, 1e3 none
    else:
        assert norms == [None] * len(grads)
    # the reference steps parameter 1 only three times, skipping the third step (clipping:
    # its global norm leaves parameter 1 out that step, so it runs over all parameters)
    ref_grads = [[g if g is not None else torch.zeros(p.shape) for g, p in zip(s, params)]
                 for s in grads]
    ref = reference_lamb(start, ref_grads, kw["lr"], kw["betas"], kw["eps"], wd, 10.0, 0.01,
                         bc, clip)
    solo = [s[1] * _coef(s, clip) for s in grads if s[1] is not None]
    ref[1] = reference_lamb([start[1]], [[g] for g in solo], kw["lr"], kw["betas"], kw["eps"],
                            wd, 10.0, 0.01, bc)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(opt.param_groups[0]["params"], ref):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert opt.state[opt.param_groups[0]["params"][1]]["step"] == 3


def _coef(grads, clip):
    """The clipping scale of one step's gradients (None: no gradient)."""
    if not clip:
        return 1.0
    norm = sum(float(g.double().pow(2).sum()) for g in grads if g is not None) ** 0.5
    return min(1.0, clip / (norm + 1e-6))


def _lamb_config(bf16, stage):
    return {"optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage}}


@pytest.mark.parametrize("bf16,stage,fused_builds,want", [
    (True, 0, True, "master"),   # DeepSpeed would step the fused kernel on bf16 params, and
    (True, 0, False, "master"),  # its bf16 wrapper syncs per parameter: the LAMB keeps masters
    (False, 0, True, "fused"),
    (True, 1, True, "fused"),    # ZeRO keeps fp32 partitions for the optimizer
    (False, 0, False, "torch"),  # the CUDA extension does not build (no GPU)
])
def test_lamb_auto_choice(monkeypatch, bf16, stage, fused_builds, want):
    """``--lamb auto`` takes ``master`` under bf16 at ZeRO stage 0 (the LAMB keeps the
    float32 master weights, the model is cast to bf16, DeepSpeed's bf16 is off), else
    DeepSpeed's fused LAMB only where it builds and has a kernel for the parameters DeepSpeed
    will give it; ``--lamb fused`` on bf16 parameters is a clear error, not a crash in the
    first step."""
    import lamb
    pytest.importorskip("deepspeed")
    import deepspeed_train

    monkeypatch.setattr(lamb, "fused_lamb_available", lambda: fused_builds)
    model = torch.nn.Linear(4, 4)
    cfg = _lamb_config(bf16, stage)
    got = deepspeed_train.configure_lamb(cfg, model, "auto")
    if want == "fused":
        assert got is None and cfg["optimizer"]["type"] == "Lamb"
    else:
        assert isinstance(got, Lamb) and "optimizer" not in cfg
        assert got.param_groups[0]["lr"] == 1e-3
        assert got.master_weights == (want == "master")
        assert cfg["bf16"]["enabled"] == (bf16 and want != "master")
        assert model.weight.dtype == (torch.bfloat16 if want == "master" else torch.float32)
    model = torch.nn.Linear(4, 4)
    cfg = _lamb_config(bf16, stage)
    if bf16 and stage == 0:
        with pytest.raises(ValueError, match="no bf16 kernel.*--lamb torch"):
            deepspeed_train.configure_lamb(cfg, model, "fused")
    else:
        assert deepspeed_train.configure_lamb(cfg, model, "fused") is None
    assert isinstance(deepspeed_train.configure_lamb(_lamb_config(bf16, stage), model,
                                                     "torch"), Lamb)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_master_weights_follow_the_float64_reference(wd):
    """bf16 parameters with ``master_weights``: the float32 master copy follows the float64
    reference to float32 accuracy (updates far below bf16's resolution are kept), the
    parameter is the master rounded to bf16, and a state_dict round trip (as a checkpoint
    resume does) keeps the master and the moments float32."""
    torch.manual_seed(0)
    start = [torch.randn(s).bfloat16() for s in [(6, 5), (5,), (3, 4)]]
    grads = [[torch.randn(p.shape) for p in start] for _ in range(5)]
    kw = dict(lr=1e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, max_coeff=10.0,
              min_coeff=0.01, bias_correction=True)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = Lamb(params, master_weights=True, **kw)
    for i, step in enumerate(grads):
        for prm, g in zip(params, step):
            prm.grad = g.bfloat16()
        opt.step()
        if i == 1:  # resume into a fresh optimizer from the saved state
            saved = opt.state_dict()
            opt = Lamb(params, master_weights=True, **kw)
            opt.load_state_dict(saved)
    ref = reference_lamb([p.float() for p in start],
                         [[g.bfloat16().float() for g in s] for s in grads],
                         kw["lr"], kw["betas"], kw["eps"], wd, 10.0, 0.01, True)
    for prm, want in zip(params, ref):
        master = opt.state[prm]["master"]
        assert master.dtype == torch.float32 and opt.state[prm]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(master.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(prm.data, master.bfloat16())
    # the plain bf16 path loses these updates (lr 1e-4 is below bf16's resolution)
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt = Lamb(plain, **kw)
    for step in grads:
        for prm, g in zip(plain, step):
            prm.grad = g.bfloat16()
        opt.step()
    err = max((a.double() - w).abs().max() for a, w in zip(plain, ref))
    assert err > 5e-5


def test_lamb_master_configures_bf16_weights_without_deepspeed_bf16():
    pytest.importorskip("deepspeed")
    import deepspeed_train

    model = torch.nn.Linear(4, 4)
    cfg = {**_lamb_config(True, 0), "gradient_clipping": 1.0}
    got = deepspeed_train.configure_lamb(cfg, model, "master")
    assert isinstance(got, Lamb) and got.master_weights and "optimizer" not in cfg
    assert cfg["bf16"]["enabled"] is False and model.weight.dtype == torch.bfloat16
    assert got.max_grad_norm == 1.0 and cfg["gradient_clipping"] == 0.0  # the LAMB clips
    for bf16, stage in ((False, 0), (True, 1)):
        with pytest.raises(ValueError, match="--lamb master is for"):
            deepspeed_train.configure_lamb(_lamb_config(bf16, stage), torch.nn.Linear(4, 4),
                                           "master")
