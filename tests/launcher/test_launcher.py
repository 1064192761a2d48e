"""Unit tests of the DeepSpeed launcher plugin (``launcher/``): arguments, config preparation,
clear errors, and model patching (user bing_bert-style classes and transformers models)."""
import argparse
import hashlib
import json
import logging
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")
for p in (ROOT, EXAMPLE):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

from launcher import (LauncherConfigError, add_sparse_attention_arguments,  # noqa: E402
                      prepare_from_config, prepare_sparse_attention)

FIXED_BLOCK = {"mode": "fixed", "block": 16, "different_layout_per_head": True,
               "num_local_blocks": 4, "num_global_blocks": 1, "attention": "bidirectional",
               "horizontal_global_attention": False, "num_different_global_patterns": 4}
BASE = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}


def write_config(tmp_path, block=FIXED_BLOCK, name="ds.json", **extra):
    cfg = dict(BASE, **extra)
    if block is not None:
        cfg["sparse_attention"] = block
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_seq_length", type=int, default=512)
    return add_sparse_attention_arguments(parser).parse_args(argv)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- arguments -------------------------------------------------------------------------------
def test_arguments_added_beside_deepspeed():
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    parser = add_sparse_attention_arguments(parser)
    parser = add_sparse_attention_arguments(parser)  # twice is harmless
    args = parser.parse_args([])
    assert args.deepspeed_sparse_attention is False
    assert args.deepspeed_transformer_kernel is False
    assert args.deepspeed_config is None
    args = parser.parse_args(["--deepspeed_sparse_attention", "--deepspeed_transformer_kernel",
                              "--deepspeed_config", "x.json", "--local_rank=1"])
    assert args.deepspeed_sparse_attention and args.deepspeed_transformer_kernel
    assert args.deepspeed_config == "x.json" and args.local_rank == 1


def test_arguments_alone_add_deepspeed_config_and_keep_user_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_transformer_kernel", action="store_true",
                        help="the user's own flag")
    parser = add_sparse_attention_arguments(parser)
    args = parser.parse_args(["--deepspeed_config", "a.json", "--deepspeed_transformer_kernel"])
    assert args.deepspeed_config == "a.json" and args.deepspeed_transformer_kernel
    assert args.deepspeed_sparse_attention is False


# -- prepare ---------------------------------------------------------------------------------
def test_flag_and_block_build_sparsity_config_and_clean_config(tmp_path):
    from sparse_attn import FixedSparsityConfig

    path = write_config(tmp_path)
    before = digest(path)
    args = parse(["--deepspeed_sparse_attention", "--deepspeed_config", path])
    run = prepare_sparse_attention(args, num_heads=4, max_seq_length=512,
                                   max_position_embeddings=512)
    assert run.enabled
    sc = run.sparsity_config
    assert isinstance(sc, FixedSparsityConfig)
    assert (sc.num_heads, sc.block, sc.num_different_global_patterns) == (4, 16, 4)
    assert "sparse_attention" not in run.ds_config
    assert args.deepspeed_config != path and args.deepspeed_config_user == path
    with open(args.deepspeed_config) as f:
        seen = json.load(f)
    assert "sparse_attention" not in seen and seen["optimizer"] == BASE["optimizer"]
    assert digest(path) == before  # the user's file is untouched
    assert run.layout_checksum.startswith("4x32x32:")
    # calling again on the same args reads the user's file again, not the cleaned copy
    run2 = prepare_sparse_attention(args, num_heads=4, max_seq_length=512)
    assert run2.enabled and run2.layout_checksum == run.layout_checksum


def test_user_dict_unchanged():
    cfg = dict(BASE, sparse_attention=dict(FIXED_BLOCK))
    snapshot = json.dumps(cfg, sort_keys=True)
    run = prepare_from_config(cfg, sparse_attention=True, num_heads=2)
    assert json.dumps(cfg, sort_keys=True) == snapshot
    assert "sparse_attention" not in run.ds_config and run.enabled


def test_deepspeed_rejects_block_and_accepts_cleaned_config(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    path = write_config(tmp_path)
    with open(path) as f:
        raw = json.load(f)
    with pytest.raises(DeepSpeedConfigError, match="sparse_attention"):
        DeepSpeedConfig(raw)
    args = parse(["--deepspeed_sparse_attention", "--deepspeed_config", path])
    prepare_sparse_attention(args, num_heads=4)
    DeepSpeedConfig(args.deepspeed_config)  # what DeepSpeed reads: accepted


def test_flag_without_block_is_an_error(tmp_path):
    path = write_config(tmp_path, block=None)
    args = parse(["--deepspeed_sparse_attention", "--deepspeed_config", path])
    with pytest.raises(LauncherConfigError, match="no \"sparse_attention\" block"):
        prepare_sparse_attention(args, num_heads=4)


def test_block_without_flag_is_ignored_with_a_log_line(tmp_path, caplog):
    path = write_config(tmp_path)
    args = parse(["--deepspeed_config", path])
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        run = prepare_sparse_attention(args, num_heads=4, max_seq_length=512)
    assert not run.enabled and run.sparsity_config is None
    assert "sparse_attention" not in run.ds_config
    assert any("ignored" in r.getMessage() and "--deepspeed_sparse_attention" in r.getMessage()
               for r in caplog.records)
    model = torch.nn.Linear(2, 2)
    assert run.patch_model(model) is model


def test_documented_example_with_every_modes_keys_trains_with_one_warning(tmp_path, caplog):
    """DeepSpeed's config reference lists every mode's keys under "mode": "fixed"; DeepSpeed
    read the chosen mode's keys only, and so does the launcher, with one warning line."""
    block = dict(FIXED_BLOCK, num_random_blocks=0, local_window_blocks=[4],
                 global_block_indices=[0], global_block_end_indices=None,
                 num_sliding_window_blocks=3)
    path = write_config(tmp_path, block=block)
    args = parse(["--deepspeed_sparse_attention", "--deepspeed_config", path])
    with caplog.at_level(logging.WARNING, logger="sparse_attn.launcher"):
        run = prepare_sparse_attention(args, num_heads=4, max_seq_length=512)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "num_sliding_window_blocks" in warned[0], warned
    want = prepare_sparse_attention(parse(["--deepspeed_sparse_attention", "--deepspeed_config",
                                           write_config(tmp_path, name="plain.json")]),
                                    num_heads=4, max_seq_length=512)
    assert run.layout_checksum == want.layout_checksum


def test_block_without_flag_is_still_validated(tmp_path):
    path = write_config(tmp_path, block={"mode": "fixed", "block": 24})
    with pytest.raises(LauncherConfigError, match="sparse_attention.block"):
        prepare_sparse_attention(parse(["--deepspeed_config", path]), num_heads=4)


def test_transformer_kernel_turned_off_with_warning(tmp_path, caplog):
    path = write_config(tmp_path)
    args = parse(["--deepspeed_sparse_attention", "--deepspeed_transformer_kernel",
                  "--deepspeed_config", path])
    with caplog.at_level(logging.WARNING, logger="sparse_attn.launcher"):
        run = prepare_sparse_attention(args, num_heads=4)
    assert run.transformer_kernel_disabled and args.deepspeed_transformer_kernel is False
    assert any(r.levelno == logging.WARNING and "transformer" in r.getMessage()
               for r in caplog.records)
    # dense runs keep the kernel flag
    args = parse(["--deepspeed_transformer_kernel", "--deepspeed_config", path])
    run = prepare_sparse_attention(args, num_heads=4)
    assert args.deepspeed_transformer_kernel is True and not run.transformer_kernel_disabled


@pytest.mark.parametrize("argv, match", [
    ([], "no DeepSpeed config"),
    (["--deepspeed_config", "/nonexistent/ds.json"], "does not exist"),
])
def test_missing_config(argv, match):
    with pytest.raises(LauncherConfigError, match=match):
        prepare_sparse_attention(parse(["--deepspeed_sparse_attention"] + argv), num_heads=4)


def test_malformed_config_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 2,\n  "sparse_attention": {"mode": "fixed",}\n}\n')
    with pytest.raises(LauncherConfigError) as err:
        prepare_sparse_attention(parse(["--deepspeed_sparse_attention", "--deepspeed_config",
                                        str(path)]), num_heads=4)
    assert "bad.json" in str(err.value) and "line 3" in str(err.value)


@pytest.mark.parametrize("block, match", [
    ({"mode": "fixed", "block": 24}, "sparse_attention.block"),
    ({"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 3}, "num_global_blocks"),
    ({"mode": "nope"}, "sparse_attention.mode"),
    ({"mode": "bigbird", "unknown_key": 1}, "unknown_key"),
])
def test_bad_block_clear_error(tmp_path, block, match):
    path = write_config(tmp_path, block=block)
    with pytest.raises(LauncherConfigError, match=match):
        prepare_sparse_attention(parse(["--deepspeed_sparse_attention", "--deepspeed_config",
                                        path]), num_heads=4)


def test_max_seq_length_not_a_multiple_of_the_block_is_padded(tmp_path, caplog):
    """bing_bert padded inputs to the block (pad_to_block_size); the launcher builds the
    layout for the padded length and says so in one line."""
    path = write_config(tmp_path, block=dict(FIXED_BLOCK, block=64))
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        run = prepare_sparse_attention(parse(["--deepspeed_sparse_attention",
                                              "--deepspeed_config", path]),
                                       num_heads=4, max_seq_length=200,
                                       max_position_embeddings=512)
    lines = [r.getMessage() for r in caplog.records if "not a multiple" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "max_seq_length 200" in lines[0] and "block 64" in lines[0] and "256" in lines[0]
    assert run.enabled and run.max_seq_length == 200
    assert run.padded_seq_length == 256 and run.layout_length == 256
    # a multiple of the block: no padding, no line; the same layout as the padded run
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        at_256 = prepare_sparse_attention(parse(["--deepspeed_sparse_attention",
                                                 "--deepspeed_config", path]),
                                          num_heads=4, max_seq_length=256)
    assert not any("not a multiple" in r.getMessage() for r in caplog.records)
    assert at_256.padded_seq_length == 256
    assert run.layout_checksum == at_256.layout_checksum
    assert run.layout_checksum.startswith("4x4x4:")
    # dense runs are not padded
    dense = prepare_sparse_attention(parse(["--deepspeed_config", path]), num_heads=4,
                                     max_seq_length=200)
    assert dense.padded_seq_length == 200 and dense.layout_length is None


def test_padded_length_above_positions_is_a_clear_error(tmp_path):
    path = write_config(tmp_path, block=dict(FIXED_BLOCK, block=64))
    with pytest.raises(LauncherConfigError) as err:
        prepare_sparse_attention(parse(["--deepspeed_sparse_attention", "--deepspeed_config",
                                        path]), num_heads=4, max_seq_length=200,
                                 max_position_embeddings=220)
    text = str(err.value)
    assert "max_seq_length 200" in text and "256" in text and "220" in text
    assert "extend_position_embedding" in text


def test_sequence_above_positions_points_to_extend_position_embedding(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(LauncherConfigError, match="extend_position_embedding"):
        prepare_sparse_attention(parse(["--deepspeed_sparse_attention", "--deepspeed_config",
                                        path]), num_heads=4, max_seq_length=4096,
                                 max_position_embeddings=512)


def test_every_rank_builds_the_same_random_layout(tmp_path):
    block = {"mode": "bigbird", "block": 16, "num_random_blocks": 2,
             "different_layout_per_head": True}
    path = write_config(tmp_path, block=block)
    sums = {prepare_sparse_attention(parse(["--deepspeed_sparse_attention",
                                            "--deepspeed_config", path]),
                                     num_heads=4, max_seq_length=1024).layout_checksum
            for _ in range(3)}
    assert len(sums) == 1


def test_cpu_op_build_avoided(tmp_path):
    import deepspeed.ops

    path = write_config(tmp_path)
    prepare_sparse_attention(parse(["--deepspeed_sparse_attention", "--deepspeed_config",
                                    path]), num_heads=4)
    assert deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm") is False


# -- patching --------------------------------------------------------------------------------
def _dense_run(num_heads):
    block = {"mode": "dense", "block": 16}
    return prepare_from_config(dict(BASE, sparse_attention=block), sparse_attention=True,
                               num_heads=num_heads, max_seq_length=128,
                               max_position_embeddings=128)


def test_patch_user_bert_class_pads_around_encoder():
    """The example's dense BERT (a user class): patching with a dense layout must give the
    same outputs at a length that is not a multiple of the block."""
    from modeling import BertConfig, BertForPreTraining
    from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).eval()
    ids = torch.randint(5, 64, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        ref_scores, ref_nsp = model(ids, None, mask)
    run = _dense_run(2)
    run.patch_model(model)
    assert sum(isinstance(m, BertSparseSelfAttention) for m in model.modules()) == 2
    with torch.no_grad():
        scores, nsp = model(ids, None, mask)
    assert scores.shape == ref_scores.shape
    torch.testing.assert_close(scores[0], ref_scores[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores[1, :30], ref_scores[1, :30], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nsp, ref_nsp, atol=1e-4, rtol=1e-4)
    # training works through the hooks and a second patch is a no-op
    run.patch_model(model)
    model.train()
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    loss, _, _ = model(ids, None, mask, labels, torch.tensor([0, 1]))
    loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_patch_transformers_bert_and_roberta():
    transformers = pytest.importorskip("transformers")
    for cfg_cls, model_cls in ((transformers.BertConfig, transformers.BertForMaskedLM),
                               (transformers.RobertaConfig, transformers.RobertaForMaskedLM)):
        cfg = cfg_cls(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        model = model_cls(cfg).eval()
        ids = torch.randint(5, 100, (2, 45))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        run = _dense_run(2)
        run.patch_model(model)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        assert out.logits.shape == ref.shape and torch.isfinite(out.loss)
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)


def test_sparse_patch_changes_attention():
    """A real sparse layout (Fixed) must differ from dense attention on long inputs."""
    from modeling import BertConfig, BertForPreTraining

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).eval()
    with torch.no_grad():  # peaked attention, so that which keys are seen matters
        for lin in (model.bert.encoder.layer[0].attention.self.query,
                    model.bert.encoder.layer[0].attention.self.key):
            lin.weight.mul_(30)
    ids = torch.randint(5, 64, (1, 128))
    with torch.no_grad():
        ref, _ = model(ids)
    run = prepare_from_config(dict(BASE, sparse_attention=FIXED_BLOCK), sparse_attention=True,
                              num_heads=2, max_seq_length=128)
    run.patch_model(model)
    with torch.no_grad():
        out, _ = model(ids)
    assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-3)


# -- Hugging Face Trainer recipe ---------------------------------------------------------------
def test_hf_trainer_recipe_runs_under_the_deepspeed_launcher(tmp_path):
    """examples/bing_bert/hf_trainer_recipe.py: a Trainer with TrainingArguments(deepspeed=...)
    built from a config holding the block (ZeRO-2, BigBird), under the real launcher."""
    import shutil
    import socket
    import subprocess

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = os.path.join(ROOT, "configs", "bing_bert", "ds_sa_hf_trainer.json")
    before = digest(cfg)
    exe = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [exe, "--num_gpus", "1", "--master_port", str(port),
         os.path.join(EXAMPLE, "hf_trainer_recipe.py"), cfg, "--output_dir",
         str(tmp_path / "out")], cwd=str(tmp_path), env=env, capture_output=True, text=True,
        timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "trainer finished with sparse attention: mode bigbird" in out
    assert "built successfully" not in out  # no DeepSpeed C++ op JIT-built on CPU
    assert digest(cfg) == before


def test_model_layout_checksum_matches_config_layout():
    """The checksum a run reports is that of the layouts the patched layers use."""
    from launcher import model_layout_checksums
    from modeling import BertConfig, BertForPreTraining

    transformers = pytest.importorskip("transformers")
    block = {"mode": "bigbird", "block": 16, "num_random_blocks": 2,
             "different_layout_per_head": True}
    run = prepare_from_config(dict(BASE, sparse_attention=block), sparse_attention=True,
                              num_heads=2, max_seq_length=256, max_position_embeddings=512)
    user = BertForPreTraining(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=512))
    run.patch_model(user)
    assert model_layout_checksums(user) == [run.layout_checksum]
    hf_model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512))
    run.patch_model(hf_model)
    assert model_layout_checksums(hf_model) == [run.layout_checksum]
    before = run.layout_checksum
    run.check_layouts_match(user)  # no process group: compares nothing, keeps the checksum
    assert run.layout_checksum == before


@pytest.mark.parametrize("kind", ["additive4d", "keep2d", "bool2d", "none", "kwargs"])
def test_encoder_padding_hooks_mask_kinds(kind):
    """add_encoder_padding pads hidden states and any mask convention, and cuts back."""
    from launcher import add_encoder_padding

    seen = {}

    class Encoder(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, output_all=True):
            seen["hidden"], seen["mask"] = hidden_states.shape, attention_mask
            return [hidden_states * 2, hidden_states + 1]

    enc = add_encoder_padding(Encoder(), block=16)
    add_encoder_padding(enc, block=16)  # idempotent
    h = torch.randn(2, 20, 8)
    keep = torch.ones(2, 20)
    keep[1, 15:] = 0
    masks = {"additive4d": ((1 - keep) * -10000.0)[:, None, None, :], "keep2d": keep.long(),
             "bool2d": keep.bool(), "none": None, "kwargs": keep.long()}
    if kind == "kwargs":
        out = enc(hidden_states=h, attention_mask=masks[kind])
    else:
        out = enc(h, masks[kind])
    assert seen["hidden"] == (2, 32, 8)
    assert [tuple(o.shape) for o in out] == [(2, 20, 8), (2, 20, 8)]
    torch.testing.assert_close(out[0], h * 2)
    m = seen["mask"]
    assert m.shape[-1] == 32
    if kind == "additive4d" or kind == "none":
        assert bool((m[..., 20:] < -1000).all()) and bool((m[0, ..., :20] == 0).all())
    elif kind == "bool2d":
        assert not m[:, 20:].any() and m[0, :20].all()
    else:
        assert int(m[:, 20:].sum()) == 0 and int(m[0, :20].sum()) == 20
    h2 = torch.randn(2, 32, 8)  # already a multiple: untouched
    out = enc(h2, None)
    assert seen["hidden"] == (2, 32, 8) and seen["mask"] is None
