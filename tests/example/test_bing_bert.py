"""The bing_bert example end to end on CPU: data preparation, the real ``deepspeed`` launcher
(gloo) with sparse attention, checkpoint resume, two ranks with ZeRO-2, and clear errors."""
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")
TINY_DS_CONFIG = os.path.join(ROOT, "configs", "bing_bert", "ds_sa_bert_tiny_cpu.json")
for p in (ROOT, EXAMPLE):
    if p not in sys.path:
        sys.path.insert(0, p)

pytest.importorskip("deepspeed")
pytest.importorskip("tokenizers")
DEEPSPEED = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable),
                                                      "deepspeed")
SEQ = 128


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def env():
    e = dict(os.environ)
    e["DS_ACCELERATOR"] = "cpu"
    e.setdefault("OMP_NUM_THREADS", "2")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def launch(args, num_ranks=1, timeout=300):
    cmd = [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
           os.path.join(EXAMPLE, "deepspeed_train.py")] + args
    proc = subprocess.run(cmd, cwd=EXAMPLE, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "built successfully" not in out  # no DeepSpeed C++ op JIT-built on CPU
    return out


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import prepare_data

    out = tmp_path_factory.mktemp("bing_bert_data")
    assert prepare_data.main(["--output_dir", str(out), "--max_seq_length", str(SEQ),
                              "--limit_files", "40", "--vocab_size", "1000",
                              "--dupe_factor", "3"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def test_config(tmp_path_factory):
    """The tiny CPU config with gradient accumulation 2 (micro batch 2) and a short
    schedule; still holding the sparse_attention block."""
    with open(TINY_DS_CONFIG) as f:
        cfg = json.load(f)
    assert "sparse_attention" in cfg
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = 4, 2
    cfg["optimizer"]["params"]["lr"] = 1e-3
    cfg["scheduler"]["params"].update(total_num_steps=40, warmup_num_steps=4,
                                      warmup_max_lr=1e-3)
    cfg["tensorboard"]["enabled"] = False
    path = tmp_path_factory.mktemp("bing_bert_cfg") / "ds_tiny_test.json"
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def common(data_dir, config, out):
    return ["--deepspeed_sparse_attention", "--deepspeed_config", config,
            "--bert_config", os.path.join(EXAMPLE, "bert_config_tiny.json"),
            "--data_dir", data_dir, "--output_dir", out, "--max_seq_length", str(SEQ),
            "--log_every", "1", "--eval_batches", "8", "--no_progress_bar"]


def test_prepare_data_shards(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    shard = torch.load(os.path.join(data_dir, meta["train_shards"][0]))
    n = meta["train_instances"]
    assert shard["input_ids"].shape == (n, SEQ) and n > 100
    specials = meta["special_tokens"]
    ids, labels, lengths = shard["input_ids"].long(), shard["masked_lm_labels"].long(), \
        shard["lengths"].long()
    assert int(lengths.max()) <= SEQ
    assert (ids[:, 0] == specials["[CLS]"]).all()
    masked = labels != -100
    assert masked.any(1).all()  # every sequence has predictions
    assert int(masked.sum(1).max()) <= meta["max_predictions_per_seq"]
    assert not (labels[masked] == specials["[CLS]"]).any()
    assert not (labels[masked] == specials["[SEP]"]).any()
    assert (ids[masked] == specials["[MASK]"]).float().mean() > 0.6
    positions = torch.arange(SEQ)[None, :]
    assert not masked[positions >= lengths[:, None]].any()
    nsp = shard["next_sentence_label"].float().mean()
    assert 0.2 < float(nsp) < 0.8
    assert os.path.getsize(os.path.join(data_dir, "vocab.txt")) > 0


def test_prepare_data_from_text_and_vocab(tmp_path, data_dir):
    import prepare_data

    text = tmp_path / "corpus.txt"
    sents = [f"Sentence number {i} talks about topic {i % 7}. It has a second part." for i in
             range(60)]
    text.write_text("\n\n".join(" ".join(sents[i:i + 6]) for i in range(0, 60, 6)))
    out = tmp_path / "out"
    assert prepare_data.main(["--input", str(text), "--vocab",
                              os.path.join(data_dir, "vocab.txt"), "--output_dir", str(out),
                              "--max_seq_length", "64", "--eval_fraction", "0.2"]) == 0
    with open(out / "meta.json") as f:
        meta = json.load(f)
    assert meta["train_instances"] > 0 and meta["eval_instances"] > 0
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data.main(["--input", str(tmp_path / "missing.txt"), "--output_dir",
                           str(out)])


@pytest.fixture(scope="module")
def first_run(data_dir, test_config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bing_bert_run"))
    before = digest(test_config)
    log = launch(common(data_dir, test_config, out) + [
        "--max_steps", "30", "--save_every", "15", "--eval_every", "15",
        "--deepspeed_transformer_kernel"])
    assert digest(test_config) == before, "the user's DeepSpeed config was modified"
    return out, log


def test_launcher_trains_with_sparse_attention(first_run, test_config):
    out, log = first_run
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    assert info["sparse_attention"] and info["gradient_accumulation"] == 2
    assert info["transformer_kernel"] is False and info["transformer_kernel_disabled"]
    assert "transformer kernel" in log and "turned off" in log
    seen = info["ds_config_seen"]
    assert "sparse_attention" not in seen and seen["train_batch_size"] == 4
    with open(test_config) as f:
        assert "sparse_attention" in json.load(f)  # still in the user's file
    assert info["layout_checksum"] and info["layout_checksum"] in log
    # the monitor wrote its CSV files under <output_dir>/monitor
    monitor = os.path.join(out, "monitor")
    files = [f for _, _, fs in os.walk(monitor) for f in fs]
    assert any("train_loss" in f for f in files), files
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_15"))


def test_checkpoint_resumes_to_the_same_next_step_loss(first_run, data_dir, test_config,
                                                       tmp_path):
    out, _ = first_run
    expected = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    resumed = str(tmp_path / "resumed")
    log = launch(common(data_dir, test_config, resumed) + [
        "--max_steps", "17", "--load_checkpoint_dir", os.path.join(out, "checkpoints"),
        "--load_checkpoint_tag", "step_15"])
    assert "resumed from" in log
    rows = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in rows] == [16, 17]
    for r in rows:
        assert abs(r["loss"] - expected[r["step"]]) < 1e-4, (r, expected[r["step"]])


# fp16 is GPU-only: DeepSpeed's CPU accelerator rejects it ("Type fp16 is not supported")
@pytest.mark.parametrize("stage, precision", [(0, "bf16"), (1, "fp32"), (2, "fp32"), (3, "bf16")],
                         ids=["zero0_bf16", "zero1", "zero2", "zero3_bf16"])
def test_two_ranks_zero_same_layout(data_dir, test_config, tmp_path, stage, precision):
    with open(test_config) as f:
        cfg = json.load(f)
    cfg["zero_optimization"] = {"stage": stage}
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16", "initial_scale_power": 8}
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = 4, 2
    cfg["csv_monitor"]["enabled"] = False
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    out = str(tmp_path / f"zero{stage}")
    log = launch(common(data_dir, str(path), out) + ["--max_steps", "3", "--eval_every", "0",
                                                      "--num_threads", "1"], num_ranks=2)
    # Ranks share one stdout pipe, so match anywhere rather than at line starts.
    found = re.findall(r"rank (\d)/2: sparse attention: .*?layout (\S+?);", log)
    assert {r for r, _ in found} == {"0", "1"}, log[-3000:]
    assert len({s for _, s in found}) == 1, found
    assert "same on all 2 ranks" in log
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(out, "run_info.json")) as f:
        seen = json.load(f)["ds_config_seen"]
    assert seen["zero_optimization"]["stage"] == stage and "sparse_attention" not in seen


# -- clear errors of the training script (in process; they stop before DeepSpeed starts) ----
def run_main(argv, capsys):
    import deepspeed_train

    code = deepspeed_train.main(argv)
    return code, capsys.readouterr().err


def base_argv(data_dir, config, out, bert=None):
    return ["--deepspeed_sparse_attention", "--deepspeed_config", config, "--bert_config",
            bert or os.path.join(EXAMPLE, "bert_config_tiny.json"), "--data_dir", data_dir,
            "--output_dir", out, "--max_seq_length", str(SEQ)]


def test_error_missing_data(tmp_path, test_config, capsys):
    code, err = run_main(base_argv(str(tmp_path / "nodata"), test_config, str(tmp_path)),
                         capsys)
    assert code == 2 and "does not exist" in err and "prepare_data.py" in err
    d = tmp_path / "partial"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"max_seq_length": SEQ, "vocab_size": 100,
                                             "train_shards": ["train_shard_000.pt"],
                                             "eval_shards": ["eval_shard_000.pt"]}))
    code, err = run_main(base_argv(str(d), test_config, str(tmp_path)), capsys)
    assert code == 2 and "train_shard_000.pt is missing" in err


def test_error_bad_configs(tmp_path, data_dir, test_config, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,\n "sparse_attention": {"block": 16,,}}')
    code, err = run_main(base_argv(data_dir, str(bad), str(tmp_path)), capsys)
    assert code == 2 and "bad.json" in err and "line 2" in err
    code, err = run_main(base_argv(data_dir, str(tmp_path / "none.json"), str(tmp_path)),
                         capsys)
    assert code == 2 and "does not exist" in err
    with open(test_config) as f:
        cfg = json.load(f)
    cfg["sparse_attention"]["block"] = 64
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(cfg))
    code, err = run_main(base_argv(data_dir, str(odd), str(tmp_path)) + ["--max_seq_length",
                                                                        "160"], capsys)
    assert code == 2 and "does not divide max_seq_length 160" in err
    big = tmp_path / "bert_small_positions.json"
    with open(os.path.join(EXAMPLE, "bert_config_tiny.json")) as f:
        bert = json.load(f)
    bert["max_position_embeddings"] = 64
    big.write_text(json.dumps(bert))
    code, err = run_main(base_argv(data_dir, test_config, str(tmp_path), bert=str(big)), capsys)
    assert code == 2 and "extend_position_embedding" in err
    bert_bad = tmp_path / "bert_bad.json"
    bert_bad.write_text('{"hidden_size": 128,\n"num_heads": 2}')
    code, err = run_main(base_argv(data_dir, test_config, str(tmp_path), bert=str(bert_bad)),
                         capsys)
    assert code == 2 and "unknown keys ['num_heads']" in err
    no_block = tmp_path / "no_block.json"
    cfg.pop("sparse_attention")
    no_block.write_text(json.dumps(cfg))
    code, err = run_main(base_argv(data_dir, str(no_block), str(tmp_path)), capsys)
    assert code == 2 and "no \"sparse_attention\" block" in err
