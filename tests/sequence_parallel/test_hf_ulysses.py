"""transformers models with block-sparse attention under DeepSpeed's Ulysses
(``sparse_attn.hf.enable_sequence_parallel``: DeepSpeed's ``register_with_transformers`` with
our attention as the core, ``UlyssesSPDataLoaderAdapter`` for the data) on 2 and 4 gloo ranks
(CPU), against the single-process model: logits, loss and gradients of a tiny
BertForMaskedLM (and one RoBERTa case) for Fixed, BigBird and a unidirectional layout, with
and without padding; the losses of training steps through ``deepspeed.initialize``; errors.

Each world runs once (``hf_ulysses_worker.py``, one process per rank, started as
``test_ulysses.py`` starts them); the tests compare what the ranks recorded with the same
model run here in one process.
"""
import functools
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

import hf_ulysses_cases as hc  # noqa: E402
from test_ulysses import run_world  # noqa: E402 (one way to start the rank processes)

import sparse_attn.hf as sahf  # noqa: E402
from sparse_attn.hf_attention import (  # noqa: E402
    SEQUENCE_PARALLEL_KWARG, SequenceParallelForward, sparse_attention_forward)
from sparse_attn.hf_sequence_parallel import _FullBatches  # noqa: E402

ROUND_OFF = 1e-5  # relative, fp32: the sharded and one-process runs differ by round-off


# (world size, sequence_parallel_size): one group of 2, one of 4, two groups of 2 side by side
# (data parallel). DeepSpeed creates its groups once per process: one world per split.
SPLITS = [(2, 2), (4, 4), (4, 2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_ulysses"))
    return lambda world, p: run_world(world, root, "hf_ulysses_worker.py", (p,))


def _groups(world, p):
    return [list(range(g * p, (g + 1) * p)) for g in range(world // p)]


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


@functools.lru_cache(maxsize=None)
def _single_process(family, layout, padded):
    """The same model and batch in one process, plain "block_sparse": logits, its own
    masked-LM loss and the gradients."""
    model = hc.make_model(layout, family=family)
    model.train()
    ids, mask, labels = hc.make_batch(seed=10 + padded, padded=padded,
                                      pad_id=hc.FAMILIES[family][1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.item(), {
        n: t.grad for n, t in model.named_parameters() if t.grad is not None}


@pytest.mark.parametrize("case", hc.CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world,p", SPLITS)
def test_forward_and_gradients_match_single_process(ranks, world, p, case):
    records = ranks(world, p)
    logits, loss, grads = _single_process(*case)
    for members in _groups(world, p):  # every group ran the same batch
        _check_group([records[r]["cases"][case] for r in members], logits, loss, grads)


@pytest.mark.parametrize("world,p", SPLITS)
def test_gradient_checkpointing_replays_the_gathered_mask(ranks, world, p):
    records = ranks(world, p)
    logits, loss, grads = _single_process(*hc.CHECKPOINTED_CASE)
    for members in _groups(world, p):
        _check_group([records[r]["checkpointed"] for r in members], logits, loss, grads)


def _check_group(parts, logits, loss, grads):
    # Logits: the shards in rank order are the whole sequence's.
    got = torch.cat([part["logits"] for part in parts], dim=1)
    assert got.shape == logits.shape
    assert _rel(got, logits) <= ROUND_OFF
    # Loss: the parts add up to the model's own (one-process) loss.
    total = sum(part["loss_part"] for part in parts)
    assert abs(total - loss) <= ROUND_OFF * abs(loss)
    # Gradients: each rank's are parts (DeepSpeed sums them over the group).
    assert set(parts[0]["grads"]) == set(grads)
    flat_want = torch.cat([g.flatten() for g in grads.values()])
    flat_got = torch.cat([sum(part["grads"][n] for part in parts).flatten() for n in grads])
    assert _rel(flat_got, flat_want) <= ROUND_OFF
    scale = flat_want.norm()
    for name, want in grads.items():
        got = sum(part["grads"][name] for part in parts)
        # per tensor, relative to itself or (for the ~0 key biases) to the whole gradient
        assert (got - want).norm() <= ROUND_OFF * max(want.norm(), 1e-3 * scale), name


@pytest.mark.parametrize("world,p", SPLITS)
def test_padding_is_masked_not_attended(ranks, world, p):
    """Against a silent wrong result: with the key padding mask dropped (as DeepSpeed's
    wrapper drops attention_mask) the logits would differ by far more than round-off."""
    records = ranks(world, p)[:p]
    case = ("bert", "fixed", True)
    got = torch.cat([rec["cases"][case]["logits"] for rec in records], dim=1)
    model = hc.make_model("fixed")
    ids, _, _ = hc.make_batch(seed=11, padded=True)
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    assert _rel(got, unmasked) > 100 * ROUND_OFF


@pytest.mark.parametrize("world,p", SPLITS)
def test_training_steps_match_single_process(ranks, world, p):
    """Steps of deepspeed.initialize's engine (ZeRO 0, fp32, gradient clipping at the global
    norm) fed by sequence_parallel_dataloader: the sequence losses of the one-process run,
    where each step's gradient is the mean over the data-parallel groups' batches; and a fresh
    engine resumed from the checkpoint saved after SAVE_AFTER steps continues them."""
    records = ranks(world, p)
    groups = _groups(world, p)
    model = hc.make_model(hc.TRAIN_LAYOUT)
    optimizer = hc.make_optimizer(model.parameters())
    want = []  # per step, the loss of each group's batch
    for source, round_ in hc.train_order(p):
        losses = [model(**hc.train_batch(members[source], round_)).loss for members in groups]
        (sum(losses) / len(losses)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hc.GRAD_CLIP)  # as DeepSpeed does
        optimizer.step()
        optimizer.zero_grad()
        want.append([loss.item() for loss in losses])
    assert sum(want[-1]) < sum(want[0])
    padded = -(-hc.TRAIN_SEQ // (p * hc.BLOCK)) * p * hc.BLOCK
    for rank, rec in enumerate(records):
        train = rec["train"]
        assert train["engine_sp"] == p
        assert len(train["losses"]) == hc.TRAIN_STEPS
        assert len(train["resumed"]) == hc.TRAIN_STEPS - hc.SAVE_AFTER
        for step, (got, ref) in enumerate(zip(train["losses"], want)):
            ref = ref[rank // p]
            assert abs(got - ref) <= ROUND_OFF * ref, (rank, step, got, ref)
        # resumed from the checkpoint: the same steps again (weights and momentum restored)
        for got, ref in zip(train["resumed"], train["losses"][hc.SAVE_AFTER:]):
            assert abs(got - ref) <= ROUND_OFF * ref, (rank, got, ref)
        # the loader padded the 100-token sequences to a multiple of P * block and cut them
        for shapes in train["shapes"]:
            assert shapes == {k: (hc.BATCH, padded // p)
                              for k in ("input_ids", "attention_mask", "position_ids")}


@pytest.mark.parametrize("world,p", SPLITS)
def test_plain_block_sparse_model_is_not_wrapped(ranks, world, p):
    """A "block_sparse" model in a process that registered Ulysses runs as in one process."""
    model = hc.make_model("fixed")
    ids, mask, _ = hc.make_batch(seed=11, padded=True)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    for rec in ranks(world, p):
        assert torch.equal(rec["plain_logits"], want)


@pytest.mark.parametrize("world,p", SPLITS)
def test_errors_that_need_a_group(ranks, world, p):
    block = hc.BLOCK
    for rec in ranks(world, p):
        errors = rec["errors"]
        assert errors["seq_multiple"] == ("ValueError", (
            f"the full sequence of {8 * p} tokens ({p} shards of 8) is not a multiple of "
            f"sequence_parallel_size * block = {p} * {block} = {p * block}: pad it to "
            f"{p * block} tokens (attention_mask 0 on the padding) before sharding; "
            f"sequence_parallel_dataloader does"))
        kind, text = errors["no_position_ids"]
        assert kind == "ValueError" and "BertModel needs position_ids" in text
        assert f"[{hc.BATCH}, {hc.SEQ // p}]" in text
        kind, text = errors["labels"]
        assert kind == "ValueError" and "sequence_parallel_loss_part" in text
        kind, text = errors["batch_size"]
        assert kind == "ValueError" and "micro_batch_size=2" in text
        kind, text = errors["other_sizes"]
        assert kind == "ValueError" and "'micro_batch_size': 3" in text
        assert errors["no_group_of_p"] == ("ValueError", (
            f"sequence_parallel_size {2 * world} needs process groups of {2 * world} ranks, "
            f"but the world of {world} ranks cannot be cut into them; launch a multiple of "
            f"{2 * world} ranks"))
        kind, text = errors["layout_mismatch"]
        assert kind == "RuntimeError" and "different sparse attention layouts" in text


# -- without a process group ------------------------------------------------------------------
@pytest.mark.parametrize("heads,p", [(4, 3), (4, 8)])
def test_heads_not_divisible(heads, p):
    with pytest.raises(ValueError, match=rf"num_attention_heads {heads} is not divisible by "
                                         rf"sequence_parallel_size {p}"):
        sahf.enable_sequence_parallel(hc.make_model("fixed"), p, hc.BATCH)


@pytest.mark.parametrize("seq_length,p,good", [(48, 2, 64), (96, 4, 128), (100, 2, 128)])
def test_seq_length_not_multiple_of_p_block(seq_length, p, good):
    with pytest.raises(ValueError, match=rf"seq_length {seq_length} is not a multiple of "
                                         rf"sequence_parallel_size \* block = {p} \* 16 = "
                                         rf"{p * 16}: pad the sequences to {good} tokens"):
        sahf.enable_sequence_parallel(hc.make_model("fixed"), p, hc.BATCH, seq_length)


def test_no_process_group():
    with pytest.raises(ValueError, match=r"sequence_parallel_size 2 needs a process group of 2 "
                                         r"ranks, but torch.distributed is not initialised"):
        sahf.enable_sequence_parallel(hc.make_model("fixed"), 2, hc.BATCH, 128)


@pytest.mark.parametrize("bad", [0, -2, 1.0, True, "2"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="sequence_parallel_size must be an integer >= 1"):
        sahf.enable_sequence_parallel(hc.make_model("fixed"), bad, hc.BATCH)
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1"):
        sahf.enable_sequence_parallel(hc.make_model("fixed"), 2, bad)


def test_p1_changes_nothing():
    model = hc.make_model("fixed")
    hooks = len(model.bert._forward_pre_hooks)
    assert sahf.enable_sequence_parallel(model, 1, hc.BATCH) is None
    assert model.config._attn_implementation == sahf.ATTN_IMPLEMENTATION
    assert len(model.bert._forward_pre_hooks) == hooks


def test_needs_sparse_model_and_token_level_head():
    import transformers

    dense = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=hc.VOCAB, hidden_size=hc.HIDDEN, num_hidden_layers=1,
        num_attention_heads=hc.HEADS, intermediate_size=64))
    with pytest.raises(ValueError, match="call sparse_attn.hf.enable_sparse_attention"):
        sahf.enable_sequence_parallel(dense, 2, hc.BATCH)
    classifier = transformers.BertForSequenceClassification(dense.config)
    sahf.enable_sparse_attention(classifier, hc.LAYOUTS["fixed"](), max_seq_length=hc.MAX_SEQ)
    with pytest.raises(ValueError, match=r"BertForSequenceClassification reads the sequence's "
                                         r"first token \(\[CLS\]\)"):
        sahf.enable_sequence_parallel(classifier, 2, hc.BATCH)


def _attention_call(heads, sp=None):
    model = hc.make_model("fixed")
    module = sahf.self_attention_modules(model)[0]
    q = torch.randn(hc.BATCH, heads, 64, hc.HIDDEN // hc.HEADS)
    kwargs = {} if sp is None else {SEQUENCE_PARALLEL_KWARG: sp}
    return sparse_attention_forward(module, q, q, q, None, **kwargs)


def test_attention_cannot_tell_its_heads_without_a_group():
    """DeepSpeed's register_with_transformers alone (no enable_sequence_parallel) hands the
    function heads / P heads and nothing that says which."""
    with pytest.raises(ValueError, match=r"the attention got 2 heads but the layout has 4, and "
                                         r"no sequence-parallel group says which heads"):
        _attention_call(2)
    with pytest.raises(ValueError, match=r"the attention got 2 heads but the layout has 4 "
                                         r"heads, and 2 \* 4 != 4"):
        _attention_call(2, SequenceParallelForward(rank=0, size=4))


def test_attention_takes_the_rank_s_head_rows():
    """With rank r of P the function attends as heads [r H / P, (r + 1) H / P) of the whole."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(hc.BATCH, hc.HEADS, 64, 16) for _ in range(3))
    model = hc.make_model("fixed")
    module = sahf.self_attention_modules(model)[0]
    whole, _ = sparse_attention_forward(module, q, k, v, None)
    for p in (2, 4):
        h = hc.HEADS // p
        for r in range(p):
            part, _ = sparse_attention_forward(
                module, q[:, r * h:(r + 1) * h], k[:, r * h:(r + 1) * h],
                v[:, r * h:(r + 1) * h], None,
                **{SEQUENCE_PARALLEL_KWARG: SequenceParallelForward(rank=r, size=p)})
            assert torch.allclose(part, whole[:, :, r * h:(r + 1) * h], rtol=1e-6, atol=1e-6)


def test_saved_under_sequence_parallel_loads_sparse(tmp_path):
    import transformers

    model = hc.make_model("fixed")
    model.set_attn_implementation(sahf.SEQUENCE_PARALLEL_ATTN_IMPLEMENTATION)
    assert sahf.is_sparse(model)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["attn_implementation"] == sahf.ATTN_IMPLEMENTATION
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == sahf.ATTN_IMPLEMENTATION


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sequence_position_ids_are_the_model_s_own(family):
    model = hc.make_model("fixed", family=family)
    pad = hc.FAMILIES[family][1]
    ids, _, _ = hc.make_batch(seed=3, padded=True, pad_id=pad)
    got = sahf.sequence_position_ids(model, ids)
    seen = {}

    def keep(module, args, out):  # the ids the model looks up (returns None: output kept)
        seen["ids"] = args[0]

    handle = model.base_model.embeddings.position_embeddings.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    assert torch.equal(got, seen["ids"].expand_as(got))


def test_loader_pads_adds_positions_and_keeps_labels():
    model = hc.make_model("fixed", family="roberta")
    full = _FullBatches([], model, multiple=64)
    ids, _, labels = hc.make_batch(seed=4, seq=100, padded=False, pad_id=1)
    batch = full.prepare({"input_ids": ids, "labels": labels, "token_type_ids":
                          torch.zeros_like(ids), "note": "kept"})
    assert batch["input_ids"].shape == (hc.BATCH, 128)
    assert torch.equal(batch["input_ids"][:, :100], ids)
    assert (batch["input_ids"][:, 100:] == 1).all()
    assert (batch["attention_mask"][:, :100] == 1).all()
    assert (batch["attention_mask"][:, 100:] == 0).all()
    assert (batch["labels"][:, 100:] == -100).all()
    assert torch.equal(batch[_FullBatches.LABELS], batch["labels"])
    assert torch.equal(batch["position_ids"], sahf.sequence_position_ids(model, batch["input_ids"]))
    assert batch["note"] == "kept"
    with pytest.raises(ValueError, match=r"batch\['extra'\] has no known padding value"):
        full.prepare({"input_ids": ids, "extra": ids})
    with pytest.raises(ValueError, match=r"batch\['labels'\] has shape \(2,\); DeepSpeed's "
                                         r"adapter cuts every tensor"):
        full.prepare({"input_ids": ids, "labels": torch.zeros(2, dtype=torch.long)})
