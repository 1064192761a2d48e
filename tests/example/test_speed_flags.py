"""The bing_bert example's speed and long-sequence flags (``--compile``,
``--activation_checkpointing``, ``--tiled_mlp``, ``--tiled_loss``): the model that
``deepspeed_train.build_model`` makes with a flag gives the losses and gradients of the model
without it (tiny model, fp32, CPU, two optimizer steps, dropout on), dense and sparse; bad
values are errors naming the flag. (Their run through the ``deepspeed`` launcher is in
``test_bing_bert.py``; their effect on memory and speed is measured on the GPU by
``scripts/bench_bing_bert.py``.)"""
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")
TINY_DS_CONFIG = os.path.join(ROOT, "configs", "bing_bert", "ds_sa_bert_tiny_cpu.json")
TINY_BERT = os.path.join(EXAMPLE, "bert_config_tiny.json")

pytest.importorskip("deepspeed")
SEQ, BATCH = 64, 2


def build(flags, sparse, device="cpu", dropout=None):
    """The example's model for ``flags`` (its parser, ``prepare_sparse_attention`` and
    ``build_model``), seeded alike for every ``flags``."""
    import deepspeed_train as dt
    from launcher import prepare_sparse_attention
    from modeling import BertConfig

    argv = ["--bert_config", TINY_BERT, "--deepspeed_config", TINY_DS_CONFIG, "--output_dir",
            "unused", "--max_seq_length", str(SEQ)] + (
        ["--deepspeed_sparse_attention"] if sparse else []) + flags
    args = dt.parse_args(argv)
    config = BertConfig.from_json_file(TINY_BERT)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    run = prepare_sparse_attention(args, num_heads=config.num_attention_heads,
                                   max_seq_length=SEQ,
                                   max_position_embeddings=config.max_position_embeddings)
    torch.manual_seed(0)
    return dt.build_model(args, config, run).to(device)


def batch(step, vocab, device="cpu"):
    """Step ``step``'s inputs: ``[BATCH, SEQ]`` token ids with 15% masked labels; the
    second row padded after 50 tokens (so the masks are exercised)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 50:] = 0
    labels = torch.full((BATCH, SEQ), -100, dtype=torch.long)
    for row, length in enumerate((SEQ, 50)):
        pos = torch.randperm(length, generator=g)[:int(0.15 * length)]
        labels[row, pos] = torch.randint(5, vocab, (len(pos),), generator=g)
    types = torch.zeros_like(ids)
    types[:, SEQ // 2:] = 1
    out = dict(input_ids=ids, token_type_ids=types, attention_mask=mask,
               masked_lm_labels=labels,
               next_sentence_label=torch.randint(0, 2, (BATCH,), generator=g))
    return {k: v.to(device) for k, v in out.items()}


def train(model, steps=2, device="cpu"):
    """Losses ``(loss, mlm, nsp)`` and gradients of ``steps`` SGD steps (dropout seeded per
    step, as the example seeds it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for step in range(steps):
        torch.manual_seed(1000 + step)
        losses = model(**batch(step, model.config.vocab_size, device))
        losses[0].backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        history.append(([float(x.detach()) for x in losses], grads))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history


FLAGS = {
    "checkpointing": ["--activation_checkpointing"],
    "tiled_mlp": ["--tiled_mlp", "3"],
    "tiled_loss": ["--tiled_loss", "4"],
    "compile": ["--compile", "--compile_backend", "aot_eager"],
    "all": ["--activation_checkpointing", "--tiled_mlp", "2", "--tiled_loss", "3"],
}


@pytest.fixture(scope="module")
def reference():
    """The runs without flags, dense and sparse (computed once)."""
    return {sparse: train(build([], sparse)) for sparse in (False, True)}


CASES = [(name, sparse) for name in FLAGS for sparse in (False, True)
         if not (name == "compile" and not sparse)]  # build_model compiles both alike


@pytest.mark.parametrize("name, sparse", CASES,
                         ids=[f"{n}-{'sparse' if s else 'dense'}" for n, s in CASES])
def test_flag_keeps_losses_and_gradients(reference, name, sparse):
    model = build(FLAGS[name], sparse)
    if name == "checkpointing" or name == "all":
        assert model.bert.encoder.checkpoint_layers
    if name in ("tiled_mlp", "all"):
        assert all(layer.mlp_shards > 1 for layer in model.bert.encoder.layer)
    if name in ("tiled_loss", "all"):
        assert model.mlm_loss_shards > 1
    got = train(model)
    for (want_losses, want_grads), (got_losses, got_grads) in zip(reference[sparse], got):
        assert got_losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
        for n, g in want_grads.items():
            torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_local_tiling_without_deepspeeds_module(reference, sparse, monkeypatch):
    """Where DeepSpeed's ulysses_sp cannot be imported (e.g. no einops), tiling.py's own
    functions give the same losses and gradients."""
    import tiling

    monkeypatch.setattr(tiling, "USE_DEEPSPEED", False)
    got = train(build(["--tiled_mlp", "3", "--tiled_loss", "4"], sparse))
    for (want_losses, want_grads), (got_losses, got_grads) in zip(reference[sparse], got):
        assert got_losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
        for n, g in want_grads.items():
            torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_compile_keeps_state_dict_keys():
    """``--compile`` compiles the encoder in place: checkpoints keep their keys."""
    eager = build([], True)
    compiled = build(["--compile", "--compile_backend", "aot_eager"], True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not compiled.cudagraph_steps
    assert build(["--compile", "reduce-overhead"], True).cudagraph_steps


def test_compiled_runs_get_full_length_batches():
    """Under --compile every batch keeps the data's whole length (one shape, one graph)."""
    import deepspeed_train as dt

    data = {"input_ids": torch.arange(30).reshape(3, 10), "lengths": torch.tensor([4, 7, 10]),
            "token_type_ids": torch.zeros(3, 10), "masked_lm_labels": torch.full((3, 10), -100),
            "next_sentence_label": torch.tensor([0, 1, 0])}
    cut, tokens = dt.make_batch(data, [0, 1], "cpu")
    full, tokens_full = dt.make_batch(data, [0, 1], "cpu", full_length=True)
    assert cut["input_ids"].shape == (2, 7) and full["input_ids"].shape == (2, 10)
    assert full["attention_mask"].sum(1).tolist() == [4, 7] and tokens == tokens_full == 11


def test_tiled_loss_with_more_shards_than_masked_tokens():
    import tiling

    head = build([], False).cls
    hidden = torch.randn(3, head.transform.in_features, requires_grad=True)
    labels = torch.tensor([7, 8, 9])
    want = torch.nn.functional.cross_entropy(head.prediction_scores(hidden).float(), labels,
                                             reduction="sum")
    (gw,) = torch.autograd.grad(want, hidden)
    got = tiling.tiled_masked_lm_loss_sum(head, hidden, labels, shards=5)
    (gg,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gg, gw)


@pytest.mark.parametrize("flags, message", [
    (["--tiled_mlp", "0"], "--tiled_mlp 0"),
    (["--tiled_loss", "-2"], "--tiled_loss -2"),
    (["--compile", "reduce-overhead", "--compile_backend", "aot_eager"],
     "--compile reduce-overhead is a mode of the inductor backend"),
    (["--compile_backend", "aot_eager"], "--compile_backend aot_eager has no effect without"),
])
def test_bad_flag_values_are_errors_naming_the_flag(flags, message, capsys, tmp_path):
    import deepspeed_train as dt

    code = dt.main(["--bert_config", TINY_BERT, "--deepspeed_config", TINY_DS_CONFIG,
                    "--output_dir", str(tmp_path), "--data_dir", str(tmp_path / "none")]
                   + flags)
    assert code == 2
    assert message in capsys.readouterr().err


def test_set_memory_options_rejects_bad_counts():
    model = build([], False)
    with pytest.raises(ValueError, match="--tiled_loss 1.5"):
        model.set_memory_options(tiled_loss=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU: torch.compile (inductor) "
                    "against eager in bf16, sparse on the fused kernel")
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_compile_matches_eager_on_gpu(sparse):
    """Inductor draws other dropout masks than eager: dropout 0 here."""
    want = train(build([], sparse, "cuda", dropout=0.0).to(torch.bfloat16), device="cuda")
    got = train(build(["--compile"], sparse, "cuda", dropout=0.0).to(torch.bfloat16),
                device="cuda")
    for (wl, _), (gl, _) in zip(want, got):
        assert gl == pytest.approx(wl, rel=2e-2)
