"""The JSON block: defaults, validation errors that name the key, the schema file, the CLI."""
import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from sparse_attn import sparsity_config as sc
from sparse_attn.__main__ import main as cli
from sparse_attn.config import (
    SparseAttentionConfigError,
    json_schema,
    parse_sparse_attention,
    resolved,
    split_deepspeed_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"), recursive=True))
DS_CONFIGS = [p for p in CONFIGS if not p.endswith(".schema.json")]


def test_configs_exist_for_every_mode():
    modes = set()
    for path in DS_CONFIGS:
        model, _ = split_deepspeed_config(path)
        if model is not None:
            modes.add(model.mode)
    assert modes >= {"dense", "fixed", "variable", "bigbird", "bslongformer",
                     "local_sliding_window"}


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_config_validates_and_builds(path):
    model, rest = split_deepspeed_config(path)
    assert "sparse_attention" not in rest
    if model is not None:
        layout = model.build(4).make_layout(model.block * 8)
        assert layout.shape == (4, 8, 8)


def test_schema_file_in_sync():
    with open(os.path.join(ROOT, "configs", "sparse_attention.schema.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json_schema(), (
        "regenerate: python -m sparse_attn schema > configs/sparse_attention.schema.json")


DEEPSPEED_DEFAULTS = {
    "block": 16, "different_layout_per_head": False, "num_local_blocks": 4,
    "num_global_blocks": 1, "attention": "bidirectional",
    "horizontal_global_attention": False, "num_different_global_patterns": 1,
}


def test_block_without_mode_is_fixed_with_deepspeed_defaults():
    model = parse_sparse_attention({})
    assert model.mode == "fixed"
    assert {k: v for k, v in resolved(model).items() if k != "mode"} == DEEPSPEED_DEFAULTS
    cfg = model.build(12)
    assert isinstance(cfg, sc.FixedSparsityConfig) and cfg.num_heads == 12


@pytest.mark.parametrize("mode,expected", [
    ("bigbird", {"num_random_blocks": 0, "num_sliding_window_blocks": 3,
                 "num_global_blocks": 1, "attention": "bidirectional"}),
    ("variable", {"num_random_blocks": 0, "local_window_blocks": [4],
                  "global_block_indices": [0], "global_block_end_indices": None,
                  "attention": "bidirectional", "horizontal_global_attention": False}),
    ("bslongformer", {"num_sliding_window_blocks": 3, "global_block_indices": [0],
                      "global_block_end_indices": None, "attention": "bidirectional"}),
    ("local_sliding_window", {"num_sliding_window_blocks": 3, "attention": "unidirectional"}),
    ("dense", {}),
])
def test_mode_defaults(mode, expected):
    got = resolved(parse_sparse_attention({"mode": mode}))
    assert got["block"] == 16 and got["different_layout_per_head"] is False
    for k, v in expected.items():
        assert got[k] == v, k


def test_bigbird_json_default_differs_from_class_default():
    assert parse_sparse_attention({"mode": "bigbird"}).build(2).num_random_blocks == 0
    assert sc.BigBirdSparsityConfig(2).num_random_blocks == 1


@pytest.mark.parametrize("block", [
    {"mode": "fixed", "block": 32, "different_layout_per_head": True, "num_local_blocks": 8,
     "num_global_blocks": 2, "attention": "unidirectional", "num_different_global_patterns": 4},
    {"mode": "variable", "num_random_blocks": 1, "local_window_blocks": [2, 4],
     "global_block_indices": [0, 8], "global_block_end_indices": [2, 10], "seed": 5},
    {"mode": "bigbird", "block": 64, "num_random_blocks": 3, "different_layout_per_head": True},
    {"mode": "bslongformer", "block": 128, "global_block_indices": [0, 3]},
])
def test_build_matches_class(block):
    model = parse_sparse_attention(block)
    kwargs = {k: v for k, v in block.items() if k != "mode"}
    cls = type(model.build(4))
    assert torch.equal(model.build(4).make_layout(2048), cls(4, **kwargs).make_layout(2048))


INVALID = [
    ({"block": 24}, "sparse_attention.block"),
    ({"block": "16"}, "sparse_attention.block"),
    ({"block": 16.0}, "sparse_attention.block"),
    ({"block": True}, "sparse_attention.block"),
    ({"block": 0}, "sparse_attention.block"),
    ({"block": 256}, "sparse_attention.block"),
    ({"mode": "strided"}, "sparse_attention.mode"),
    ({"mode": 3}, "sparse_attention.mode"),
    ({"mode": None}, "sparse_attention.mode"),
    ({"blocks": 16}, "sparse_attention.blocks: unknown key"),
    ({"mode": "dense", "num_local_blockz": 4}, "sparse_attention.num_local_blockz: unknown key"),
    ({"mode": "bigbird", "num_locals": 4}, "sparse_attention.num_locals"),
    ({"num_local_blocks": 0}, "sparse_attention.num_local_blocks"),
    ({"num_local_blocks": -4}, "sparse_attention.num_local_blocks"),
    ({"num_global_blocks": 0}, "sparse_attention.num_global_blocks"),
    ({"num_local_blocks": 4, "num_global_blocks": 3}, "sparse_attention.num_local_blocks"),
    ({"num_different_global_patterns": 4},
     "sparse_attention.num_different_global_patterns: 4 needs different_layout_per_head: true"),
    ({"different_layout_per_head": True, "num_different_global_patterns": 5},
     "sparse_attention.num_different_global_patterns"),
    ({"attention": "causal"}, "sparse_attention.attention"),
    ({"attention": "unidirectional", "horizontal_global_attention": True},
     "sparse_attention.horizontal_global_attention"),
    ({"different_layout_per_head": "yes"}, "sparse_attention.different_layout_per_head"),
    ({"horizontal_global_attention": 1}, "sparse_attention.horizontal_global_attention"),
    ({"mode": "variable", "local_window_blocks": []}, "sparse_attention.local_window_blocks"),
    ({"mode": "variable", "local_window_blocks": [4, 0]},
     "sparse_attention.local_window_blocks.1"),
    ({"mode": "variable", "local_window_blocks": 4}, "sparse_attention.local_window_blocks"),
    ({"mode": "variable", "global_block_indices": [0, 2], "global_block_end_indices": [1]},
     "sparse_attention.global_block_end_indices"),
    ({"mode": "variable", "global_block_indices": [4], "global_block_end_indices": [2]},
     "sparse_attention.global_block_end_indices[0]"),
    ({"mode": "variable", "global_block_indices": [-1]},
     "sparse_attention.global_block_indices.0"),
    ({"mode": "variable", "num_random_blocks": -1}, "sparse_attention.num_random_blocks"),
    ({"mode": "variable", "attention": "unidirectional", "horizontal_global_attention": True},
     "sparse_attention.horizontal_global_attention"),
    ({"mode": "bigbird", "num_sliding_window_blocks": 0},
     "sparse_attention.num_sliding_window_blocks"),
    ({"mode": "bigbird", "num_random_blocks": 1.5}, "sparse_attention.num_random_blocks"),
    ({"mode": "bigbird", "seed": "abc"}, "sparse_attention.seed"),
    ({"mode": "bslongformer", "global_block_indices": [1], "global_block_end_indices": [1]},
     "sparse_attention.global_block_end_indices[0]"),
    ({"mode": "bslongformer", "global_block_indices": "0"},
     "sparse_attention.global_block_indices"),
    ({"mode": "local_sliding_window", "different_layout_per_head": True},
     "sparse_attention.different_layout_per_head"),
    ({"mode": "local_sliding_window", "num_sliding_window_blocks": -3},
     "sparse_attention.num_sliding_window_blocks"),
    ([{"mode": "fixed"}], "sparse_attention must be a JSON object"),
    ("fixed", "sparse_attention must be a JSON object"),
    (None, "sparse_attention must be a JSON object"),
]


@pytest.mark.parametrize("block,message", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_blocks_name_the_key(block, message):
    with pytest.raises(ValueError) as info:
        parse_sparse_attention(block)
    assert isinstance(info.value, SparseAttentionConfigError)
    assert message in str(info.value), str(info.value)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "sparse_attention": {"mode": "fixed",}\n}\n')
    with pytest.raises(ValueError, match=r"ds\.json: malformed JSON at line 3"):
        split_deepspeed_config(str(path))


def test_missing_file():
    with pytest.raises(ValueError, match="cannot read DeepSpeed config"):
        split_deepspeed_config("/nonexistent/ds.json")


def test_config_not_an_object(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        split_deepspeed_config(str(path))


def test_split_never_modifies_the_users_file_or_dict(tmp_path):
    cfg = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "sparse_attention": {"mode": "bigbird", "block": 32}}
    before = copy.deepcopy(cfg)
    model, rest = split_deepspeed_config(cfg)
    assert cfg == before
    assert model.mode == "bigbird" and "sparse_attention" not in rest
    rest["optimizer"]["params"]["lr"] = 1.0
    assert cfg == before, "the returned dict must not share state with the user's"
    path = tmp_path / "ds.json"
    text = json.dumps(before, indent=3)
    path.write_text(text)
    split_deepspeed_config(str(path))
    assert path.read_text() == text


def test_split_without_block():
    model, rest = split_deepspeed_config({"train_batch_size": 4})
    assert model is None and rest == {"train_batch_size": 4}


# ---- command line ----

def test_cli_validate(capsys):
    path = os.path.join(ROOT, "configs", "modes", "ds_config_sparse_fixed.json")
    assert cli(["validate", path, "--num-heads", "12"]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and '"num_different_global_patterns": 4' in out
    assert "FixedSparsityConfig(num_heads=12" in out


def test_cli_validate_reports_errors(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"sparse_attention": {"mode": "fixed", "block": 20}}))
    assert cli(["validate", str(path)]) == 2
    assert "sparse_attention.block" in capsys.readouterr().err


def test_cli_show_writes_png(tmp_path):
    path = os.path.join(ROOT, "configs", "modes", "ds_config_sparse_fixed.json")
    png = tmp_path / "layout.png"
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_attn", "show", path, "--num-heads", "12",
         "--seq-len", "1024", "--png", str(png)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "head  11" in proc.stdout and "density" in proc.stdout
    assert "4 distinct head layouts" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# DeepSpeed's config reference (docs/_pages/config-json.md) shows every mode's keys under
# "mode": "fixed" (with null for its Python None); users copied it verbatim.
DOCUMENTED_EXAMPLE = {
    "mode": "fixed", "block": 16, "different_layout_per_head": True, "num_local_blocks": 4,
    "num_global_blocks": 1, "attention": "bidirectional", "horizontal_global_attention": False,
    "num_different_global_patterns": 4, "num_random_blocks": 0, "local_window_blocks": [4],
    "global_block_indices": [0], "global_block_end_indices": None,
    "num_sliding_window_blocks": 3,
}


def test_documented_example_validates_with_one_warning():
    with pytest.warns(UserWarning) as record:
        model = parse_sparse_attention(DOCUMENTED_EXAMPLE)
    assert len(record) == 1
    message = str(record[0].message)
    for key in ("num_random_blocks", "local_window_blocks", "global_block_indices",
                "global_block_end_indices", "num_sliding_window_blocks"):
        assert key in message
    assert "ignored" in message and '"fixed"' in message
    assert model.num_different_global_patterns == 4 and model.different_layout_per_head
    want = sc.FixedSparsityConfig(4, 16, different_layout_per_head=True,
                                  num_different_global_patterns=4).make_layout(256)
    assert torch.equal(model.build(4).make_layout(256), want)


def test_documented_example_through_a_file_and_the_cli(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "sparse_attention": DOCUMENTED_EXAMPLE}))
    with pytest.warns(UserWarning, match="ignored for mode"):
        model, rest = split_deepspeed_config(str(path))
    assert model.mode == "fixed" and rest == {"train_batch_size": 8}
    capsys.readouterr()
    assert cli(["validate", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: sparse_attention: num_random_blocks")


@pytest.mark.parametrize("block, ignored", [
    ({"mode": "dense", "num_local_blocks": 4}, "num_local_blocks"),
    ({"mode": "bigbird", "num_local_blocks": 4, "seed": 1}, "num_local_blocks"),
    ({"num_sliding_window_blocks": 5, "seed": 2}, "num_sliding_window_blocks, seed"),
])
def test_keys_of_other_modes_are_ignored_with_a_warning(block, ignored):
    with pytest.warns(UserWarning, match=f"{ignored} belong to other modes"):
        model = parse_sparse_attention(block)
    mode = block.get("mode", "fixed")
    assert model == parse_sparse_attention(
        {k: v for k, v in block.items() if k in type(model).model_fields} | {"mode": mode})


@pytest.mark.parametrize("key, near", [("num_local_block", "num_local_blocks"),
                                       ("num_random_block", "num_random_blocks"),
                                       ("globl_block_indices", "global_block_indices"),
                                       ("blocksize", "block"), ("zzz", None)])
def test_key_of_no_mode_is_refused_with_a_suggestion(key, near):
    with pytest.raises(SparseAttentionConfigError, match=f"sparse_attention.{key}: unknown key") \
            as err:
        parse_sparse_attention({"mode": "bigbird", key: 1})
    if near:
        assert f"did you mean {near}?" in str(err.value)
    else:
        assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("text, key", [
    ('{"sparse_attention": {"mode": "fixed", "block": 16, "block": 32}}', "block"),
    ('{"sparse_attention": {"mode": "fixed"}, "sparse_attention": {"mode": "bigbird"}}',
     "sparse_attention"),
    ('{"train_batch_size": 8, "optimizer": {"type": "Adam", "type": "AdamW"}}', "type"),
])
def test_duplicate_json_keys_are_refused(tmp_path, text, key):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(SparseAttentionConfigError, match=f"duplicate key '{key}'") as err:
        split_deepspeed_config(str(path))
    assert str(path) in str(err.value)


# What validate decides about the keys of a block, against what the schema says: blocks that
# name another mode's keys, no mode, unknown keys, wrong types, unknown modes. (Not 16.0 for
# 16: JSON Schema counts a number with no fraction as an integer; validate refuses it.)
SCHEMA_CORPUS = [
    {}, {"block": 32}, {"num_random_blocks": 2}, {"mode": "fixed", "seed": 3},
    {"mode": "bigbird", "num_local_blocks": 4, "num_random_blocks": 1},
    {"mode": "variable", "num_sliding_window_blocks": 3}, {"mode": "dense", "attention": "x"},
    {"mode": "bslongformer", "num_global_blocks": 2}, {"mode": "local_sliding_window"},
    {"mode": "fixed", "block": 24}, {"mode": "fixed", "block": "16"}, {"mode": "sparse"},
    {"mode": "fixed", "num_local_block": 4}, {"extra": 1}, {"mode": 3},
    {"mode": "bigbird", "num_random_blocks": -1}, {"attention": "both"},
    {"mode": "variable", "local_window_blocks": []}, DOCUMENTED_EXAMPLE,
]


@pytest.mark.parametrize("block", SCHEMA_CORPUS, ids=lambda b: json.dumps(b)[:60])
def test_schema_agrees_with_validate(block):
    jsonschema = pytest.importorskip("jsonschema")
    try:
        with pytest.warns(UserWarning) if _names_other_modes(block) else _no_warning():
            parse_sparse_attention(block)
        accepted = True
    except SparseAttentionConfigError:
        accepted = False
    errors = list(jsonschema.Draft202012Validator(json_schema()).iter_errors(block))
    assert accepted == (not errors), (accepted, [e.message for e in errors][:3])


def _names_other_modes(block):
    from sparse_attn.config import ALL_KEYS, _MODELS
    mode = block.get("mode", "fixed")
    if mode not in _MODELS:
        return False
    own = _MODELS[mode].model_fields
    return any(k in ALL_KEYS and k not in own for k in block) and \
        all(k in ALL_KEYS for k in block)


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_show_png_into_a_missing_folder_is_one_line(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"sparse_attention": {"mode": "fixed"}}))
    png = tmp_path / "no" / "such" / "layout.png"
    assert cli(["show", str(path), "--num-heads", "2", "--seq-len", "256", "--png", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and str(png.parent) in err[0]
