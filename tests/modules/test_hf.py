"""transformers 5.x models with block-sparse attention: equivalence, layouts, position
extension, task heads (train / save / load), padding utilities, user-defined BERTs."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from reference import assert_rel_close, reference_attention  # noqa: E402

import sparse_attn.hf as sahf  # noqa: E402
from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention  # noqa: E402
from sparse_attn.sparse_attention_utils import SparseAttentionUtils  # noqa: E402
from sparse_attn.sparsity_config import (  # noqa: E402
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
)

HEADS, BLOCK, HIDDEN = 4, 16, 32
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = {
    "bert": (transformers.BertConfig, "Bert", 0, 128),
    "roberta": (transformers.RobertaConfig, "Roberta", 1, 130),
    "xlm-roberta": (transformers.XLMRobertaConfig, "XLMRoberta", 1, 130),
    "electra": (transformers.ElectraConfig, "Electra", 0, 128),
    "camembert": (transformers.CamembertConfig, "Camembert", 1, 130),
}


def make(family, head="Model", layers=2, max_pos=None, hidden=HIDDEN, heads=HEADS, **extra):
    config_cls, prefix, pad, default_pos = FAMILIES[family]
    kwargs = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                  intermediate_size=2 * hidden, vocab_size=120, pad_token_id=pad,
                  max_position_embeddings=max_pos or default_pos, **extra)
    if family == "electra":
        kwargs["embedding_size"] = hidden
    torch.manual_seed(0)
    return getattr(transformers, prefix + head)(config_cls(**kwargs))


def batch(family, seq=37, n=3, seed=1):
    """input ids with padding: sequence b has its last 6 * b tokens padded."""
    pad = FAMILIES[family][2]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    for b in range(n):
        if b:
            ids[b, seq - 6 * b:] = pad
            mask[b, seq - 6 * b:] = 0
    return ids, mask


# -- dense layouts give the unpatched model's outputs -----------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("seq", [37, 64])
def test_dense_layout_matches_unpatched_model(family, seq):
    model = make(family).eval()
    sparse = copy.deepcopy(model)
    max_position = 128
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        sparse, max_position, DenseSparsityConfig(HEADS, BLOCK))
    assert sahf.is_sparse(sparse) and not sahf.is_sparse(model)
    ids, mask = batch(family, seq)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        out = sparse(ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (3, seq, HIDDEN)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state,
                               atol=2e-5, rtol=1e-5)
    if getattr(ref, "pooler_output", None) is not None:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=2e-5, rtol=1e-5)
    # without a mask too
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).last_hidden_state, model(ids).last_hidden_state,
                                   atol=2e-5, rtol=1e-5)


# -- sparse layouts match the dense reference restricted to the layout --------------------------
def _reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """float64 oracle with the same padding and layout corner as sparse_attention_forward."""
    settings = sahf._settings(module.config)
    ssa = settings.attention
    b, h, seq, d = query.shape
    pad = (-seq) % BLOCK
    kpm = torch.zeros(b, seq + pad, dtype=torch.float64)
    if attention_mask is not None:
        kpm[:, :seq] = attention_mask.reshape(b, seq).double()
    kpm[:, seq:] = float("-inf")
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    out = reference_attention(q, k, v, ssa.get_layout(seq + pad), BLOCK, scale=scaling,
                              key_padding_mask=kpm)[:, :, :seq]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("sparse_reference", _reference_forward)
transformers.masking_utils.AttentionMaskInterface.register("sparse_reference", sahf._sparse_mask)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("layout", ["bigbird", "fixed", "bslongformer"])
def test_sparse_layout_matches_reference(family, layout):
    cfg = {
        "bigbird": BigBirdSparsityConfig(HEADS, BLOCK, different_layout_per_head=True,
                                         num_random_blocks=1, seed=5),
        "fixed": FixedSparsityConfig(HEADS, BLOCK, num_local_blocks=2),
        "bslongformer": BSLongformerSparsityConfig(HEADS, BLOCK, num_sliding_window_blocks=1,
                                                   global_block_indices=[2]),
    }[layout]
    model = make(family).eval()
    dense = copy.deepcopy(model)
    sahf.enable_sparse_attention(model, cfg)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("sparse_reference")
    ids, mask = batch(family, seq=93)

    # one layer: the self-attention output against the oracle computed from its own q/k/v
    attn = model.encoder.layer[0].attention.self
    seen = {}
    attn.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", kw.get("hidden_states", a[0] if a else None)),
        with_kwargs=True)
    attn.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        ref = ref_model(ids, attention_mask=mask).last_hidden_state
        full = dense(ids, attention_mask=mask).last_hidden_state
    x = seen["x"]

    def heads(lin):
        return lin(x).view(3, 93, HEADS, HIDDEN // HEADS).transpose(1, 2).double()

    kpm = torch.zeros(3, 96, dtype=torch.float64)
    kpm[:, :93][mask == 0] = float("-inf")
    kpm[:, 93:] = float("-inf")
    q, k, v = (F.pad(heads(lin), (0, 0, 0, 3)) for lin in (attn.query, attn.key, attn.value))
    layer_ref = reference_attention(q, k, v, cfg.make_layout(128)[:, :6, :6], BLOCK,
                                    key_padding_mask=kpm)[:, :, :93]
    layer_ref = layer_ref.transpose(1, 2).reshape(3, 93, HIDDEN)
    assert_rel_close(seen["out"], layer_ref, torch.float32)
    # the whole model against the oracle model
    assert_rel_close(out, ref, torch.float32)
    # and the layout matters: the dense model differs
    assert (out - full).abs().max() > 1e-3


def test_attention_through_block_sparse_op(monkeypatch):
    """The HF path goes through block_sparse_attention (so CUDA picks the Triton kernels)."""
    import sparse_attn.sparse_self_attention as ssa_mod

    calls = []
    real = ssa_mod.block_sparse_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssa_mod, "block_sparse_attention", spy)
    model = make("bert", layers=2).eval()
    sahf.enable_sparse_attention(model, FixedSparsityConfig(HEADS, BLOCK))
    model(*batch("bert"))
    assert calls == ["auto", "auto"]


# -- position extension --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_extend_position_embedding_512_to_4096(family):
    model = make(family, "ForSequenceClassification", layers=1, hidden=16, heads=2,
                 max_pos=512 if family == "bert" else 514).eval()
    emb = model.base_model.embeddings
    old = emb.position_embeddings.weight.detach().clone()
    offset = 0 if family == "bert" else 2
    SparseAttentionUtils.extend_position_embedding(model, 4096)
    new = emb.position_embeddings.weight
    assert new.shape == (4096 + offset, 16)
    assert model.config.max_position_embeddings == 4096 + offset
    assert torch.equal(new[:512 + offset], old)  # trained rows (and RoBERTa's offset) kept
    for start in range(512, 4096, 512):  # filled by repeating the trained table
        assert torch.equal(new[offset + start:offset + start + 512], old[offset:])
    if offset:
        assert emb.position_embeddings.padding_idx == 1
    assert torch.equal(emb.position_ids, torch.arange(4096 + offset)[None])
    assert emb.token_type_ids.shape == (1, 4096 + offset) and not emb.token_type_ids.any()
    assert new.requires_grad

    # runs at 4096, dense and sparse, and at a length that is not a multiple of the block
    ids = torch.randint(3, 120, (1, 4096))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 2)
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, 4096, BigBirdSparsityConfig(2, BLOCK, num_random_blocks=1))
    assert model.config.sparse_attention["max_seq_length"] == 4096
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        assert torch.isfinite(model(ids[:, :4001]).logits).all()


def test_extend_errors_and_noop():
    model = make("bert", layers=1)
    with pytest.raises(ValueError, match="only extends"):
        SparseAttentionUtils.extend_position_embedding(model, 64)
    w = model.embeddings.position_embeddings.weight
    SparseAttentionUtils.extend_position_embedding(model, 128)
    assert model.embeddings.position_embeddings.weight is w


def test_replace_extends_when_needed():
    model = make("roberta", layers=1).eval()
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, 256, FixedSparsityConfig(HEADS, BLOCK))
    assert model.config.max_position_embeddings == 258
    assert model.embeddings.position_embeddings.num_embeddings == 258
    model(torch.randint(3, 120, (1, 250)))


def test_update_tokenizer_model_max_length(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512,
                                                pad_token="[PAD]", unk_token="[UNK]")
    assert SparseAttentionUtils.update_tokenizer_model_max_length(fast, 4096) is fast
    assert fast.model_max_length == 4096
    fast.save_pretrained(tmp_path)
    assert transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path).model_max_length == 4096


# -- task heads: train, save, load -------------------------------------------------------------
HEADS_CASES = [
    ("bert", "ForMaskedLM"), ("bert", "ForPreTraining"), ("bert", "ForSequenceClassification"),
    ("bert", "ForQuestionAnswering"), ("bert", "ForTokenClassification"),
    ("bert", "ForMultipleChoice"),
    ("roberta", "ForMaskedLM"), ("roberta", "ForSequenceClassification"),
    ("xlm-roberta", "ForSequenceClassification"), ("electra", "ForPreTraining"),
]


def _labels(head, ids):
    n, seq = ids.shape
    if head == "ForMaskedLM":
        return dict(labels=ids.clone())
    if head == "ForPreTraining":
        return dict(labels=ids.clone(), next_sentence_label=torch.tensor([0, 1, 0][:n]))
    if head in ("ForSequenceClassification", "ForMultipleChoice"):
        return dict(labels=torch.tensor([0, 1, 1][:n]))
    if head == "ForQuestionAnswering":
        return dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([4, 5, 6]))
    if head == "ForTokenClassification":
        return dict(labels=torch.randint(0, 2, (n, seq)))
    raise AssertionError(head)


@pytest.mark.parametrize("family,head", HEADS_CASES)
def test_task_head_trains_saves_loads(family, head, tmp_path):
    model = make(family, head)
    cfg = BigBirdSparsityConfig(HEADS, BLOCK, different_layout_per_head=True,
                                num_random_blocks=1, seed=11)
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(model, 128, cfg)
    ids, mask = batch(family, seq=45)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head == "ForMultipleChoice":
        inputs = {k: v[:, None].expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
    labels = _labels(head, ids)
    if family == "electra" and head == "ForPreTraining":
        labels = dict(labels=(ids % 2))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = model.base_model.encoder.layer[0].attention.self.query.weight
    before = q.detach().clone()
    out = model(**inputs, **labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, q.detach())

    model.eval()
    with torch.no_grad():
        logits = model(**inputs)[0]
    assert logits.shape[:2] == inputs["input_ids"].shape[:2] or logits.shape[0] == ids.shape[0]
    model.save_pretrained(tmp_path)
    cls = type(model)
    for loaded in (sahf.from_pretrained(cls, tmp_path), cls.from_pretrained(tmp_path)):
        loaded.eval()
        assert sahf.is_sparse(loaded)
        assert torch.equal(sahf.get_sparsity_config(loaded).make_layout(128), cfg.make_layout(128))
        with torch.no_grad():
            again = loaded(**inputs)[0]
        if family == "electra":
            # transformers' own dense ELECTRA does not reload bit for bit on CPU either
            # (differences near 5e-10 from the reloaded weights' memory); compare closely
            torch.testing.assert_close(again, logits, atol=1e-6, rtol=0)
        else:
            assert torch.equal(again, logits)
    # and saving the loaded model keeps it sparse
    loaded.save_pretrained(tmp_path / "again")
    assert sahf.is_sparse(cls.from_pretrained(tmp_path / "again"))


def test_from_pretrained_dense_and_disable(tmp_path):
    model = make("bert", "ForSequenceClassification")
    model.save_pretrained(tmp_path / "dense")
    loaded = sahf.from_pretrained(type(model), tmp_path / "dense")
    assert not sahf.is_sparse(loaded)
    sahf.enable_sparse_attention(model, FixedSparsityConfig(HEADS, BLOCK))
    sahf.disable_sparse_attention(model)
    assert not sahf.is_sparse(model) and model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path / "back")
    assert not sahf.is_sparse(type(model).from_pretrained(tmp_path / "back"))


def test_layer_subset():
    model = make("bert", layers=2).eval()
    dense = copy.deepcopy(model)
    cfg = BigBirdSparsityConfig(HEADS, BLOCK, num_random_blocks=1, seed=2)
    SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
        model.config, [model.encoder.layer[1]], cfg)
    assert model.config.sparse_attention["layers"] == [1]
    outs = {}
    for name, m in (("sparse", model), ("dense", dense)):
        m.encoder.layer[0].register_forward_hook(lambda mod, a, o, n=name: outs.__setitem__(n, o))
    ids, mask = batch("bert", seq=70)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        b = dense(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(outs["sparse"], outs["dense"], atol=2e-5, rtol=1e-5)
    assert (a - b).abs().max() > 1e-3


def test_padding_mask_float32_and_bf16_dense_layer_finite():
    """The mask builder gives float32 whatever the model's dtype (the sparse kernels read it
    so: no cast in every layer); a layer left dense clamps it into its own dtype, so that a
    fully padded sequence gives finite outputs in bf16 on both kinds of layer."""
    keep = torch.tensor([[1] * 8, [1] * 4 + [0] * 4, [0] * 8])
    m = sahf._sparse_mask(3, 8, 8, attention_mask=keep, dtype=torch.bfloat16)
    assert m.dtype == torch.float32 and m.shape == (3, 1, 1, 8)
    assert (m[:, 0, 0] == 0).eq(keep.bool()).all()
    model = make("bert", layers=2).to(torch.bfloat16).eval()
    cfg = BigBirdSparsityConfig(HEADS, BLOCK, num_random_blocks=1, seed=2)
    SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
        model.config, [model.encoder.layer[1]], cfg)
    ids, mask = batch("bert", seq=70)
    mask[2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_rejections():
    cfg = FixedSparsityConfig(HEADS, BLOCK)
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=HIDDEN, n_heads=HEADS, n_layers=1, hidden_dim=64, vocab_size=50))
    with pytest.raises(ValueError, match="supports the model types"):
        sahf.enable_sparse_attention(distil, cfg)
    with pytest.raises(ValueError, match="supports the model types"):
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
            distil, 128, cfg)
    decoder = make("bert", "LMHeadModel", is_decoder=True)
    with pytest.raises(ValueError, match="decoder"):
        sahf.enable_sparse_attention(decoder, cfg)
    with pytest.raises(ValueError, match="num_heads=2 .* num_attention_heads=4"):
        sahf.enable_sparse_attention(make("bert"), FixedSparsityConfig(2, BLOCK))
    short = sahf.enable_sparse_attention(make("bert"), cfg, max_seq_length=64)
    with pytest.raises(ValueError, match="padded to 80.*exceeds .*max_seq_length=64"):
        short(torch.randint(3, 120, (1, 70)))
    with pytest.raises(ValueError, match="not a supported model"):
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
            nn.Linear(2, 2), 128, cfg)


def test_sparsity_config_round_trip():
    for cfg in (BigBirdSparsityConfig(HEADS, 32, num_random_blocks=2, seed=9),
                BSLongformerSparsityConfig(HEADS, global_block_indices=[0, 4],
                                           global_block_end_indices=[2, 6]),
                FixedSparsityConfig(HEADS, different_layout_per_head=True,
                                    num_different_global_patterns=4)):
        back = sahf.sparsity_config_from_dict(sahf.sparsity_config_to_dict(cfg))
        assert type(back) is type(cfg)
        assert torch.equal(back.make_layout(512), cfg.make_layout(512))


# -- padding utilities and a user-defined BERT ---------------------------------------------------
def test_pad_to_block_size_and_unpad():
    emb = nn.Module()
    emb.word_embeddings = nn.Embedding(10, 4, padding_idx=0)
    ids = torch.randint(1, 10, (2, 21))
    keep = torch.ones(2, 21, dtype=torch.long)
    ext = torch.zeros(2, 1, 1, 21)
    tt = torch.ones(2, 21, dtype=torch.long)
    pos = torch.arange(21)[None].expand(2, -1)
    pad_len, ids2, keep2, tt2, pos2, e2 = SparseAttentionUtils.pad_to_block_size(
        16, ids, keep, tt, pos, None, 0, emb)
    assert pad_len == 11 and ids2.shape == (2, 32) and (ids2[:, 21:] == 0).all()
    assert (keep2[:, 21:] == 0).all() and (keep2[:, :21] == 1).all()
    assert (tt2[:, 21:] == 0).all() and (pos2[:, 21:] == 0).all() and e2 is None
    # BERT's additive extended mask: the padding is dropped with a large negative value
    _, _, ext2, *_ = SparseAttentionUtils.pad_to_block_size(16, ids, ext, None, None, None, 0, emb)
    assert ext2.shape == (2, 1, 1, 32) and (ext2[..., 21:] < -1e30).all() and (ext2[..., :21] == 0).all()
    # no mask given: one is made so that the padding is masked
    _, _, made, *_ = SparseAttentionUtils.pad_to_block_size(16, ids, None, None, None, None, 0, emb)
    assert made.tolist() == [[1] * 21 + [0] * 11] * 2
    # bool masks
    _, _, b2, *_ = SparseAttentionUtils.pad_to_block_size(16, ids, keep.bool(), None, None, None, 0, emb)
    assert b2.dtype == torch.bool and not b2[:, 21:].any()
    # inputs_embeds padded with the pad token's word embedding
    x = torch.randn(2, 21, 4)
    pad_len, none_ids, _, _, _, x2 = SparseAttentionUtils.pad_to_block_size(
        16, None, keep, None, None, x, 0, emb)
    assert none_ids is None and x2.shape == (2, 32, 4)
    assert torch.equal(x2[:, 21:], emb.word_embeddings(torch.zeros(2, 11, dtype=torch.long)))
    # nothing to pad
    out = SparseAttentionUtils.pad_to_block_size(16, ids[:, :16], keep[:, :16], None, None, None, 0, emb)
    assert out[0] == 0 and out[1] is not None and out[1].shape == (2, 16)
    y = torch.randn(2, 32, 5)
    assert torch.equal(SparseAttentionUtils.unpad_sequence_output(11, y), y[:, :21])
    assert SparseAttentionUtils.unpad_sequence_output(0, y) is y


class _SelfAttention(nn.Module):
    """A bing_bert style dense self-attention: forward(hidden, extended_mask) -> context."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x, mask):
        b, s, h = x.shape
        split = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5 + mask
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)


class _Layer(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(hidden, heads)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, mask):
        return torch.tanh(self.out(self.attention.self(x, mask))) + x


class _MyBert(nn.Module):
    class config:
        hidden_size, num_attention_heads, max_position_embeddings, pad_token_id = 32, 4, 64, 0

    def __init__(self):
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Module()
        self.bert.embeddings.word_embeddings = nn.Embedding(50, 32, padding_idx=0)
        self.bert.embeddings.position_embeddings = nn.Embedding(64, 32)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList([_Layer(32, 4) for _ in range(2)])

    def forward(self, ids, keep, block=None):
        pad_len = 0
        ext = (1.0 - keep[:, None, None, :].float()) * -10000.0
        if block:
            pad_len, ids, ext, _, _, _ = SparseAttentionUtils.pad_to_block_size(
                block, ids, ext, None, None, None, 0, self.bert.embeddings)
        e = self.bert.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1]))
        for layer in self.bert.encoder.layer:
            x = layer(x, ext)
        return SparseAttentionUtils.unpad_sequence_output(pad_len, x)


def test_user_defined_bert_replacement():
    torch.manual_seed(0)
    model = _MyBert()
    sparse = copy.deepcopy(model)
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        sparse, 64, DenseSparsityConfig(4, BLOCK))
    for layer, old in zip(sparse.bert.encoder.layer, model.bert.encoder.layer):
        assert isinstance(layer.attention.self, BertSparseSelfAttention)
        assert torch.equal(layer.attention.self.query.weight, old.attention.self.query.weight)
        assert torch.equal(layer.attention.self.value.bias, old.attention.self.value.bias)
        assert layer.attention.self.sparse_self_attention.max_seq_length == 64
    ids = torch.randint(1, 50, (2, 27))
    keep = torch.ones(2, 27)
    keep[1, 20:] = 0
    with torch.no_grad():
        ref = model(ids, keep)
        out = sparse(ids, keep, block=BLOCK)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        sparse(ids, keep)


# -- the CPU fine-tuning script, at small sizes --------------------------------------------------
def test_finetune_script_small(tmp_path):
    script = os.path.join(ROOT, "scripts", "finetune_roberta_cpu.py")
    proc = subprocess.run(
        [sys.executable, script, "--max-position", "1024", "--train-length", "1000",
         "--steps", "2", "--hidden", "32", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical logits" in proc.stdout


def test_dense_layout_gradients_and_bf16_match_unpatched():
    model = make("roberta", "ForSequenceClassification").eval()
    sparse = copy.deepcopy(model)
    sahf.enable_sparse_attention(sparse, DenseSparsityConfig(HEADS, BLOCK))
    ids, mask = batch("roberta", seq=50)
    labels = torch.tensor([0, 1, 1])
    for m in (model, sparse):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(model.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # bf16 models: both within bf16 tolerance of the float32 model
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.double()
        for m in (model, sparse):
            m.to(torch.bfloat16)
        out = sparse(ids, attention_mask=mask).logits
        dense_bf16 = model(ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, ref, torch.bfloat16, factor=2)
    assert_rel_close(dense_bf16, ref, torch.bfloat16, factor=2)


def test_gradient_checkpointing_and_autocast_train_step():
    model = make("bert", "ForMaskedLM")
    sahf.enable_sparse_attention(model, BigBirdSparsityConfig(HEADS, BLOCK, num_random_blocks=1))
    # transformers renamed gradient_checkpointing_enable during 5.x; take whichever is there
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()
    model.train()
    ids, mask = batch("bert", seq=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    q = model.bert.encoder.layer[1].attention.self.query.weight
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_replace_layers_of_user_bert_returns_them():
    model = _MyBert()
    layers = model.bert.encoder.layer
    out = SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
        model.config, layers, FixedSparsityConfig(4, BLOCK))
    assert out is layers
    assert all(isinstance(l.attention.self, BertSparseSelfAttention) for l in layers)
    assert layers[0].attention.self.sparse_self_attention.max_seq_length == 64


def test_extend_after_enable_updates_max_seq_length():
    model = make("bert", layers=1).eval()
    sahf.enable_sparse_attention(model, FixedSparsityConfig(HEADS, BLOCK))
    ids = torch.randint(3, 120, (1, 100))
    model(ids)
    assert model.config.sparse_attention["max_seq_length"] == 128
    SparseAttentionUtils.extend_position_embedding(model, 256)
    assert model.config.sparse_attention["max_seq_length"] == 256
    assert model(torch.randint(3, 120, (1, 250))).last_hidden_state.shape == (1, 250, HIDDEN)


def test_load_and_save_again_without_forward_stays_sparse(tmp_path):
    """transformers drops ``attn_implementation`` from a loaded config's attributes; a model
    saved again before any forward pass must still load sparse (not silently dense)."""
    model = make("bert")
    cfg = BigBirdSparsityConfig(HEADS, BLOCK, num_random_blocks=1, seed=3)
    sahf.enable_sparse_attention(model, cfg, max_seq_length=128)
    model.eval()
    ids, mask = batch("bert", seq=45)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)[0]
    model.save_pretrained(tmp_path / "a")
    cls = type(model)
    cls.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")  # no forward between
    again = cls.from_pretrained(tmp_path / "b").eval()
    assert sahf.is_sparse(again)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask)[0], want)
    # a dense model's config is untouched
    dense = make("bert")
    dense.save_pretrained(tmp_path / "dense")
    assert not sahf.is_sparse(cls.from_pretrained(tmp_path / "dense"))
    assert dense.config.to_dict().get("attn_implementation") != sahf.ATTN_IMPLEMENTATION


def test_torch_compile_fullgraph_fused(monkeypatch):
    """A sparse BERT compiles into one graph (fullgraph=True: no graph break) on the fused
    path, matches eager forward and gradients, and builds its look-up tables once.

    On CPU the fused kernels run under TRITON_INTERPRET=1; ``auto`` would pick the torch
    backend there, so the fused one is forced. ``aot_eager`` traces the same graph Inductor
    would get without needing a compiler."""
    from sparse_attn.ops import attention as dispatch
    from sparse_attn.ops import fused
    from sparse_attn.ops.fused import lut as fused_lut

    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setattr(dispatch, "select_backend", lambda *a, **kw: "fused")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    builds = []
    make_lut = fused_lut.make_lut
    monkeypatch.setattr(fused_lut, "make_lut", lambda *a: builds.append(1) or make_lut(*a))
    fused.clear_caches()
    model = make("bert", layers=2, hidden=128, heads=2, max_pos=256,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    sahf.enable_sparse_attention(model, BigBirdSparsityConfig(2, 64, num_random_blocks=1,
                                                              num_sliding_window_blocks=1),
                                 max_seq_length=256)
    model.to(device, torch.bfloat16)
    ids = torch.randint(5, 100, (1, 256), generator=torch.Generator().manual_seed(0)).to(device)

    def run(m):
        out = m(input_ids=ids)[0]
        out.float().square().sum().backward()
        grad = model.encoder.layer[0].attention.self.query.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        return out.detach(), grad

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = [run(compiled) for _ in range(2)]  # compiled first: nothing was built eagerly
    want, want_grad = run(model)
    for out, grad in got:
        assert torch.equal(out, want)
        torch.testing.assert_close(grad, want_grad, rtol=2e-2, atol=1e-3)
    assert len(builds) == 2  # one row LUT, one column LUT: no rebuild per call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_torch_compile_reduce_overhead_training():
    """torch.compile(mode="reduce-overhead") (Inductor + CUDA-graph trees) trains a sparse BERT:
    compiled first, so the look-up tables are built inside the graph's warm-up (they must not
    land in the graph's private memory pool), then three steps whose forward output and
    gradients match eager."""
    from sparse_attn.ops import fused

    fused.clear_caches()
    torch.manual_seed(0)
    model = make("bert", layers=2, hidden=128, heads=2, max_pos=512,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    sahf.enable_sparse_attention(model, BigBirdSparsityConfig(2, 64, num_random_blocks=1,
                                                              num_sliding_window_blocks=3),
                                 max_seq_length=512)
    model.to("cuda", torch.bfloat16)
    ids = torch.randint(5, 100, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()

    def run(m, mark):
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        out = m(input_ids=ids)[0]
        out.float().square().sum().backward()
        grad = model.encoder.layer[0].attention.self.query.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        return out.detach().clone(), grad

    compiled = torch.compile(model, mode="reduce-overhead")
    got = [run(compiled, True) for _ in range(4)]  # warm-up, record, replays
    want, want_grad = run(model, False)
    for out, grad in got:
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad, want_grad, rtol=5e-2, atol=5e-3)


def test_enable_checks_layers_block_and_length():
    """Layer indices outside the model or given twice, and a max_seq_length above the
    position table, are errors naming the model's numbers; a "sparse_attention" JSON block
    (dict) is taken, validated as in a DeepSpeed config, for the model's heads."""
    model = make("bert", layers=2, max_pos=128)
    cfg = FixedSparsityConfig(HEADS, 16)
    for layers, match in (([5], "5 is not a layer of this model; it has 2 layers"),
                          ([-1], "-1 is not a layer"), ([0, 0], r"\[0\] given more than once"),
                          (["1"], "'1' is not a layer")):
        with pytest.raises(ValueError, match=match):
            sahf.enable_sparse_attention(model, cfg, layers=layers)
        assert not sahf.is_sparse(model)
    with pytest.raises(ValueError, match="max_seq_length 256 is above the model's 128 "
                                         "positions.*extend_position_embedding"):
        sahf.enable_sparse_attention(model, cfg, max_seq_length=256)
    with pytest.raises(ValueError, match="sparse_attention.num_local_block: unknown key"):
        sahf.enable_sparse_attention(model, {"mode": "fixed", "num_local_block": 2})
    sahf.enable_sparse_attention(model, {"mode": "bigbird", "block": 16, "num_random_blocks": 1},
                                 layers=[1])
    assert sahf.is_sparse(model)
    ids = torch.randint(5, 100, (1, 128), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids)[0]).all()


def test_output_attentions_on_a_sparse_model_says_so():
    """Sparse layers never form the probabilities: output_attentions=True gets one warning
    saying their attentions are missing, instead of a silent empty tuple."""
    from sparse_attn import hf_attention

    hf_attention._told_about_attentions = False
    model = make("bert", layers=1, max_pos=64).eval()
    sahf.enable_sparse_attention(model, FixedSparsityConfig(HEADS, 16))
    ids = torch.randint(5, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="output_attentions=True: block-sparse layers never"):
        out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == 0
