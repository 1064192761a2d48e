"""The bing_bert example's ``masked_positions``: batches carry the flat positions of their
masked tokens, found on the host, so that the model's forward makes no device-to-host sync.
With them the losses and gradients are those the model gets by finding the positions itself
(dense and sparse, with the tiled loss too); positions that are not exactly those of the
labels are an error, never a silently different loss; the example's ``make_batch`` makes
them, and a sequence-parallel shard drops them."""
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")
TINY_DS_CONFIG = os.path.join(ROOT, "configs", "bing_bert", "ds_sa_bert_tiny_cpu.json")
TINY_BERT = os.path.join(EXAMPLE, "bert_config_tiny.json")

pytest.importorskip("deepspeed")
SEQ, BATCH = 64, 3


def build(sparse, flags=()):
    """The example's tiny model (its parser and ``build_model``), seeded, dropout off."""
    import deepspeed_train as dt
    from launcher import prepare_sparse_attention
    from modeling import BertConfig

    argv = ["--bert_config", TINY_BERT, "--deepspeed_config", TINY_DS_CONFIG, "--output_dir",
            "unused", "--max_seq_length", str(SEQ)] + (
        ["--deepspeed_sparse_attention"] if sparse else []) + list(flags)
    args = dt.parse_args(argv)
    config = BertConfig.from_json_file(TINY_BERT)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    run = prepare_sparse_attention(args, num_heads=config.num_attention_heads,
                                   max_seq_length=SEQ,
                                   max_position_embeddings=config.max_position_embeddings)
    torch.manual_seed(0)
    return dt.build_model(args, config, run).double()


def inputs(seed, vocab):
    """``[BATCH, SEQ]`` inputs: a random share of masked tokens per row (row 2: none), the
    second row padded after 40 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 40:] = 0
    labels = torch.full((BATCH, SEQ), -100, dtype=torch.long)
    for row, count in ((0, 11), (1, 5)):
        pos = torch.randperm(40, generator=g)[:count]
        labels[row, pos] = torch.randint(5, vocab, (count,), generator=g)
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask,
                masked_lm_labels=labels,
                next_sentence_label=torch.randint(0, 2, (BATCH,), generator=g))


def losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    losses = model(**batch)
    losses[0].backward()
    return ([x.detach() for x in losses],
            {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None})


@pytest.mark.parametrize("tiled_loss", [1, 3], ids=["loss", "tiled_loss"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_positions_keep_losses_and_gradients(sparse, tiled_loss):
    from modeling import masked_positions

    model = build(sparse, ["--tiled_loss", str(tiled_loss)] if tiled_loss > 1 else [])
    for seed in range(2):
        batch = inputs(seed, model.config.vocab_size)
        want_losses, want_grads = losses_and_grads(model, batch)
        positions = masked_positions(batch["masked_lm_labels"])
        assert positions.tolist() == [
            i for i, x in enumerate(batch["masked_lm_labels"].reshape(-1).tolist())
            if x != -100]
        got_losses, got_grads = losses_and_grads(model, dict(batch, masked_positions=positions))
        for got, want in zip(got_losses, want_losses):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0, msg=name)


def _dropped(p):
    return p[1:]


def _repeated(p):
    return torch.cat([p[:1], p[:-1]])


def _reversed(p):
    return p.flip(0)


def _shifted(p):
    return p + 1


def _extra(p):
    return torch.cat([p, p[-1:] + 1])


@pytest.mark.parametrize("corrupt", [_dropped, _repeated, _reversed, _shifted, _extra],
                         ids=["dropped", "repeated", "reversed", "shifted", "extra"])
def test_wrong_positions_are_an_error(corrupt):
    from modeling import masked_positions

    model = build(True)
    batch = inputs(0, model.config.vocab_size)
    wrong = corrupt(masked_positions(batch["masked_lm_labels"]))
    with pytest.raises(RuntimeError, match="masked_positions are not the positions"):
        model(**batch, masked_positions=wrong)


@pytest.mark.parametrize("bad, text", [
    (lambda p: p.int(), "torch.int32"),
    (lambda p: p[None], r"\[1, 16\]"),
], ids=["int32", "2d"])
def test_bad_position_tensor_names_what_is_allowed(bad, text):
    from modeling import masked_positions

    model = build(False)
    batch = inputs(0, model.config.vocab_size)
    with pytest.raises(ValueError, match=r"masked_positions must be an int64 \[n\] tensor.*"
                       + text):
        model(**batch, masked_positions=bad(masked_positions(batch["masked_lm_labels"])))


def test_make_batch_carries_positions_and_a_shard_drops_them():
    import deepspeed_train as dt
    from bert_sequence_parallel import SequenceShard, shard_batch
    from modeling import masked_positions

    labels = torch.full((3, 10), -100)
    labels[0, 2], labels[1, 5], labels[1, 6], labels[2, 9] = 7, 8, 9, 10
    data = {"input_ids": torch.arange(30).reshape(3, 10), "lengths": torch.tensor([4, 7, 10]),
            "token_type_ids": torch.zeros(3, 10), "masked_lm_labels": labels,
            "next_sentence_label": torch.tensor([0, 1, 0])}
    batch, _ = dt.make_batch(data, [1, 0], "cpu")  # cut to 7 tokens: rows 1, 0
    assert batch["masked_lm_labels"].shape == (2, 7)
    assert batch["masked_positions"].tolist() == [5, 6, 9]  # row 1 at 5, 6; row 0 at 7 + 2
    assert torch.equal(batch["masked_positions"], masked_positions(batch["masked_lm_labels"]))
    shard = SequenceShard(size=2, rank=1, group=None, dp_size=1, dp_rank=0)
    part = shard_batch(batch, shard, block=2,
                       pad_token_id=0, ignore_index=-100)
    assert "masked_positions" not in part and part["masked_lm_labels"].shape == (2, 4)
