"""The bing_bert example's masked-LM cross-entropy (``cross_entropy``): the loss and the
logits' gradient against the float64 oracle, labels out of range as errors, and the model's
losses and gradients with it against ``F.cross_entropy``. Without a GPU the kernels run in
Triton's interpreter on CPU tensors."""
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")

pytest.importorskip("triton")
import cross_entropy as ce  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, classes", [(1, 5), (37, 1000), (9, 8192 + 3), (5, 30522)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row_stride"])
def test_loss_and_gradient_match_the_float64_oracle(dtype, rows, classes, strided):
    g = torch.Generator().manual_seed(rows * 7 + classes)
    # strided: a view whose rows are longer than the classes
    full = (4 * torch.randn(rows, classes + (16 if strided else 0), generator=g)).to(
        DEVICE, dtype).requires_grad_()
    scores = full[:, :classes]
    labels = torch.randint(0, classes, (rows,), generator=g).to(DEVICE)
    labels[0] = classes - 1  # the last class, in the last step of the row's loop
    upstream = torch.tensor(0.75, device=DEVICE)

    loss = ce.fused_cross_entropy(scores, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (loss * upstream).backward()
    grad = full.grad[:, :classes]
    assert grad.dtype == dtype

    ref_scores = scores.detach().double().requires_grad_()
    ref = ce.reference(ref_scores, labels)
    (ref * upstream.double()).backward()
    assert abs(loss.item() - ref.item()) <= TOL[dtype] * max(1.0, abs(ref.item()))
    err = (grad.double() - ref_scores.grad).abs().max().item()
    assert err <= TOL[dtype] * ref_scores.grad.abs().max().item() + 1e-7, err
    assert not full.grad[:, classes:].any()


@pytest.mark.parametrize("bad", [-1, 1000])
def test_labels_out_of_range_are_an_error(bad):
    scores = torch.randn(4, 1000, device=DEVICE)
    labels = torch.tensor([1, 2, bad, 3], device=DEVICE)
    with pytest.raises(RuntimeError, match="class indices"):
        ce.fused_cross_entropy(scores, labels)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()


def test_bad_shapes_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"\[rows, classes\]"):
        ce.fused_cross_entropy(torch.randn(2, 3, 4, device=DEVICE),
                               torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="zero masked tokens"):
        ce.fused_cross_entropy(torch.randn(0, 4, device=DEVICE),
                               torch.zeros(0, dtype=torch.long, device=DEVICE))


def test_plain_loss_runs_where_the_kernels_do_not():
    scores, labels = torch.randn(6, 50), torch.randint(0, 50, (6,))
    got = ce.masked_lm_cross_entropy(scores, labels)  # CPU tensors: F.cross_entropy itself
    assert torch.equal(got, torch.nn.functional.cross_entropy(scores, labels))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_model_losses_and_gradients_with_the_fused_loss(monkeypatch, sparse):
    from test_residual_norm import assert_same, batch_of, run, tiny_model

    monkeypatch.setattr(ce, "FUSED_DEVICES", ("cuda", "cpu"))
    calls = []
    original = ce.fused_cross_entropy
    monkeypatch.setattr(ce, "fused_cross_entropy",
                        lambda *a: calls.append(1) or original(*a))
    model = tiny_model(sparse, 0.0).set_fused(norm=False, loss=True)
    batch = batch_of(model.config.vocab_size)
    fused = run(model, batch)
    assert calls, "the fused loss did not run"
    plain = run(model.set_fused(norm=False, loss=False), batch)
    assert len(calls) == 1
    assert_same(fused, plain, 2e-5)
