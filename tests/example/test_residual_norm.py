"""The bing_bert example's fused residual add + dropout + LayerNorm (``residual_norm``):
forward and gradients against the float64 oracle with the kernels' own keep mask, the mask's
statistics and its replay, and the model with the fused path against the plain modules.
Without a GPU the kernels run in Triton's interpreter on CPU tensors."""
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")

pytest.importorskip("triton")
import residual_norm as rn  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture
def fused_here(monkeypatch):
    """The fused path on this machine's tensors (CPU ones through the interpreter)."""
    monkeypatch.setattr(rn, "FUSED_DEVICES", ("cuda", "cpu"))


def _close(got, want, dtype, what):
    scale = want.abs().max().item() + 1e-6
    err = (got.double() - want).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.2e} relative to {scale:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 128, 768])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("norm, upstream", [(True, "both"), (True, "s"), (True, "normed"),
                                             (False, "s")])
def test_forward_and_gradients_match_the_float64_oracle(dtype, n, p, norm, upstream):
    """``upstream``: which outputs the loss uses (s alone: LayerNorm gets no gradient)."""
    g = torch.Generator().manual_seed(n + int(p * 10))
    shape = (2, 37, n)  # 74 rows: not a whole number of tiles
    leaves = [torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
              for _ in range(2)]
    weight = (1 + 0.3 * torch.randn(n, generator=g)).to(DEVICE, dtype).requires_grad_()
    bias = (0.3 * torch.randn(n, generator=g)).to(DEVICE, dtype).requires_grad_()
    ds, dy = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    seed, call = 20261208, 12
    s, y = rn.fused_add_dropout_norm(*leaves, p, weight if norm else None,
                                     bias if norm else None, 1e-5, seed, call)
    assert (y is None) == (not norm) and s.dtype == dtype and s.shape == shape

    keep = rn.keep_mask(74, n, p, seed, call, DEVICE).view(shape)
    ref_leaves = [t.detach().double().requires_grad_() for t in (*leaves, weight, bias)]
    ref_s, ref_y = rn.reference(*ref_leaves[:2], keep, p, *(ref_leaves[2:] if norm else ()),
                                eps=1e-5)
    _close(s, ref_s, dtype, "s")
    if norm:
        _close(y, ref_y, dtype, "normed")

    outs = {"both": [(s, ds), (y, dy)], "s": [(s, ds)], "normed": [(y, dy)]}[upstream]
    ref_outs = {"both": [(ref_s, ds), (ref_y, dy)], "s": [(ref_s, ds)],
                "normed": [(ref_y, dy)]}[upstream]
    sum((o.float() * u.float()).sum() for o, u in outs).backward()
    sum((o * u.double()).sum() for o, u in ref_outs).backward()
    names = ["residual", "h", "weight", "bias"] if upstream != "s" else ["residual", "h"]
    for name, got, want in zip(names, (*leaves, weight, bias), ref_leaves):
        assert got.grad is not None, name
        _close(got.grad, want.grad, dtype, f"grad {name}")
    if upstream == "s":
        assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keeps_one_minus_p_and_changes_with_the_call(p):
    keep = rn.keep_mask(256, 768, p, seed=7, call=0, device=DEVICE).float()
    assert abs(keep.mean().item() - (1 - p)) < 0.01
    # the four words of a draw fill neighbouring columns: they must not agree more than chance
    for k in range(1, 4):
        agree = (keep[:, :-k] == keep[:, k:]).float().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    assert torch.equal(keep, rn.keep_mask(256, 768, p, 7, 0, DEVICE).float())
    other = rn.keep_mask(256, 768, p, 7, 4, DEVICE).float()
    assert (other != keep).float().mean().item() > p * (1 - p)


def test_dropout_draws_from_the_generator_and_replays_after_a_reseed(fused_here):
    x, h = (torch.randn(3, 20, 128, device=DEVICE) for _ in range(2))
    drop, norm = torch.nn.Dropout(0.3), torch.nn.LayerNorm(128).to(DEVICE)
    torch.manual_seed(1)
    a = rn.add_dropout_norm(x, h, drop, norm)
    b = rn.add_dropout_norm(x, h, drop, norm)
    torch.manual_seed(1)
    c = rn.add_dropout_norm(x, h, drop, norm)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    drop.eval()  # no dropout: the plain sum
    s, _ = rn.add_dropout_norm(x, h, drop, norm)
    torch.testing.assert_close(s, x + h)


def test_bad_inputs_name_what_is_wrong():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="one shape and dtype"):
        rn.fused_add_dropout_norm(x, x.double(), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rn.fused_add_dropout_norm(x, x, 1.0)
    with pytest.raises(ValueError, match=r"weight and bias must both be \[64\]"):
        rn.fused_add_dropout_norm(x, x, 0.1, torch.ones(32, device=DEVICE),
                                  torch.zeros(32, device=DEVICE))


def test_plain_modules_run_where_the_kernels_do_not():
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    norm = torch.nn.LayerNorm(32)
    # CPU tensors without the fixture: the modules themselves, bit for bit
    s, y = rn.add_dropout_norm(x, h, torch.nn.Dropout(0.0), norm)
    assert torch.equal(s, x + h) and torch.equal(y, norm(x + h))


# -- the example's model ---------------------------------------------------------------------
SEQ, BATCH = 64, 2


def tiny_model(sparse, dropout, **memory):
    from modeling import BertConfig, BertForPreTraining

    config = BertConfig.from_json_file(os.path.join(EXAMPLE, "bert_config_tiny.json"))
    config.hidden_dropout_prob, config.attention_probs_dropout_prob = dropout, 0.0
    layout = None
    if sparse:
        from sparse_attn import BigBirdSparsityConfig

        layout = BigBirdSparsityConfig(num_heads=config.num_attention_heads, block=16,
                                       num_random_blocks=1)
    torch.manual_seed(0)
    model = BertForPreTraining(config, sparsity_config=layout).to(DEVICE)
    return model.set_memory_options(**memory)


def batch_of(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (BATCH, SEQ), generator=g)
    labels = torch.full((BATCH, SEQ), -100, dtype=torch.long)
    labels[:, ::5] = ids[:, ::5]
    return {k: v.to(DEVICE) for k, v in dict(
        input_ids=ids, token_type_ids=torch.zeros_like(ids), masked_lm_labels=labels,
        next_sentence_label=torch.tensor([0, 1])).items()}


def run(model, batch, seed=5):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(**batch)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_same(a, b, tol):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("memory", [{}, {"tiled_mlp": 2}], ids=["plain", "tiled_mlp"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_fused_layers_give_the_plain_modules_losses_and_gradients(fused_here, sparse, memory):
    """Without dropout the fused layers compute what the plain modules compute (float32)."""
    model = tiny_model(sparse, 0.0, **memory)
    batch = batch_of(model.config.vocab_size)
    fused = run(model, batch)
    plain = run(model.set_fused(norm=False), batch)
    assert_same(fused, plain, 2e-5)
    states = model.set_fused(norm=True).bert.encoder(
        model.bert.embeddings(batch["input_ids"]), None, output_all_encoded_layers=True)
    want = model.set_fused(norm=False).bert.encoder(
        model.bert.embeddings(batch["input_ids"]), None, output_all_encoded_layers=True)
    assert len(states) == len(want) == model.config.num_hidden_layers
    for got, ref in zip(states, want):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)


def test_checkpointed_layers_replay_the_fused_dropout(fused_here):
    """With dropout, a checkpointed layer recomputed in the backward draws the same masks:
    the gradients are those of the run without checkpointing (same seed)."""
    model = tiny_model(False, 0.2)
    batch = batch_of(model.config.vocab_size)
    straight = run(model, batch)
    again = run(model, batch)
    assert not torch.equal(straight[0], run(model, batch, seed=6)[0])  # dropout is on
    assert_same(straight, again, 0)
    checkpointed = run(model.set_memory_options(activation_checkpointing=True), batch)
    assert_same(straight, checkpointed, 2e-5)


def test_no_fused_flags_turn_the_kernels_off():
    pytest.importorskip("deepspeed")
    import deepspeed_train as dt
    from launcher import prepare_sparse_attention
    from modeling import BertConfig

    config_path = os.path.join(EXAMPLE, "bert_config_tiny.json")
    for flags, norm, loss in (([], True, True), (["--no_fused_norm"], False, True),
                              (["--no_fused_loss"], True, False)):
        args = dt.parse_args(["--bert_config", config_path, "--deepspeed_config",
                              os.path.join(ROOT, "configs", "bing_bert",
                                           "ds_sa_bert_tiny_cpu.json"),
                              "--output_dir", "unused", "--max_seq_length", "64"] + flags)
        config = BertConfig.from_json_file(config_path)
        run_ = prepare_sparse_attention(args, num_heads=config.num_attention_heads,
                                        max_seq_length=64,
                                        max_position_embeddings=config.max_position_embeddings)
        model = dt.build_model(args, config, run_)
        assert [layer.fused_norm for layer in model.bert.encoder.layer] == \
            [norm] * config.num_hidden_layers
        assert model.fused_loss == loss


def test_compiled_encoder_runs_the_plain_modules(fused_here, monkeypatch):
    """Under torch.compile the plain modules run (inductor fuses them itself): the kernels are
    never traced, and the compiled model's losses are the eager fused model's."""
    calls = []
    original = rn.fused_add_dropout_norm
    monkeypatch.setattr(rn, "fused_add_dropout_norm", lambda *a, **k: calls.append(1) or
                        original(*a, **k))
    model = tiny_model(False, 0.0)
    batch = batch_of(model.config.vocab_size)
    eager = run(model, batch)
    assert calls  # the eager model took the kernels
    calls.clear()
    model.bert.encoder.compile(backend="eager")
    compiled = run(model, batch)
    assert not calls
    assert_same(eager, compiled, 2e-5)


def test_hidden_sizes_past_one_tile_take_the_plain_modules(fused_here, monkeypatch):
    calls = []
    monkeypatch.setattr(rn, "fused_add_dropout_norm", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(rn, "MAX_HIDDEN", 64)
    x = torch.randn(2, 3, 128, device=DEVICE)
    norm = torch.nn.LayerNorm(128).to(DEVICE)
    s, y = rn.add_dropout_norm(x, x, torch.nn.Dropout(0.0), norm)
    assert not calls and torch.equal(s, x + x) and torch.equal(y, norm(x + x))


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
def test_gradients_arriving_with_other_strides(norm):
    """Upstream gradients that are not row-major (here through a transpose) give the same
    gradients as row-major ones."""
    g = torch.Generator().manual_seed(11)
    leaves = [torch.randn(6, 128, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    weight = torch.randn(128, generator=g).to(DEVICE).requires_grad_() if norm else None
    bias = torch.randn(128, generator=g).to(DEVICE).requires_grad_() if norm else None
    up = torch.randn(128, 6, generator=g).to(DEVICE)
    grads = []
    for transposed in (True, False):
        s, y = rn.fused_add_dropout_norm(*leaves, 0.3, weight, bias, 1e-5, seed=5, call=8)
        out = y if norm else s
        loss = (out.t() * up).sum() if transposed else (out * up.t().contiguous()).sum()
        params = [*leaves] + ([weight, bias] if norm else [])
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
