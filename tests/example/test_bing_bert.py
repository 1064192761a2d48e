"""The bing_bert example end to end on CPU: data preparation, the real ``deepspeed`` launcher
(gloo) with sparse attention, checkpoint resume, two ranks with ZeRO-2, clear errors, and
resume rules and faults (another layout, a missing tag, a kill during a save, fp16 overflow,
a NaN loss)."""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "bing_bert")
TINY_DS_CONFIG = os.path.join(ROOT, "configs", "bing_bert", "ds_sa_bert_tiny_cpu.json")

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


def run_launcher(args, num_ranks=1, timeout=300, extra_env=None):
    """The real ``deepspeed`` launcher on CPU; returns (exit status, output). It runs in a
    process group of its own, so that a SIGKILL to the group (launcher and ranks) leaves
    pytest alone."""
    cmd = [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
           os.path.join(EXAMPLE, "deepspeed_train.py")] + args
    e = env()
    e.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=EXAMPLE, env=e, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert "built successfully" not in out  # no DeepSpeed C++ op JIT-built on CPU
    return proc.returncode, out


def launch(args, num_ranks=1, timeout=300, extra_env=None):
    code, out = run_launcher(args, num_ranks, timeout, extra_env)
    assert code == 0, out[-6000:]
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


def test_trained_vocab_is_byte_pair_merges_and_the_same_on_every_run():
    """The vocab: specials, every character (word-initial and ``##``), then merged pieces,
    most frequent pair first with ties to the smaller pair; the same under any hash seed."""
    import collections

    import prepare_data

    counts = collections.Counter({"low": 5, "lower": 2, "newest": 6, "widest": 3, "x": 1})
    vocab = prepare_data.wordpiece_vocab(counts, 30)
    chars = sorted({w[0] for w in counts} | {"##" + c for w in counts for c in w[1:]})
    assert vocab[:5] == prepare_data.SPECIALS and vocab[5:5 + len(chars)] == chars
    # ("##e", "##s") and ("##s", "##t") both occur 9 times: the smaller pair goes first;
    # then ("##o", "##w") before ("l", "##o") (7 each), and so on
    assert vocab[5 + len(chars):] == ["##es", "##est", "##ow", "low", "##ew", "##ewest",
                                      "newest", "##dest", "##idest", "widest", "##er", "lower"]
    assert len(vocab) == len(set(vocab)) == 29  # every pair merged: nothing more to learn
    assert all(len(prepare_data.wordpiece_vocab(counts, n)) == n for n in (20, 25))
    assert prepare_data.wordpiece_vocab(counts, 40, min_frequency=3) == vocab[:-2]
    code = ("import collections, prepare_data; print(prepare_data.wordpiece_vocab("
            "prepare_data.word_counts(['%s']), 300))" % " ".join(
                f"word{i % 37} piece{i % 11}s token{i % 5}ing" for i in range(400)))
    runs = {subprocess.run([sys.executable, "-c", code], cwd=EXAMPLE, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONHASHSEED=str(seed)),
                           check=True).stdout for seed in (1, 2, 3)}
    assert len(runs) == 1 and "token" in runs.pop()


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


def test_speed_flags_through_the_launcher_keep_the_losses(first_run, data_dir, test_config,
                                                          tmp_path):
    """--activation_checkpointing, --tiled_mlp and --tiled_loss through the real launcher:
    the same losses as the run without them (data order and dropout are functions of the step;
    checkpointing replays dropout). --compile: test_speed_flags.py."""
    out, _ = first_run
    expected = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    flagged = str(tmp_path / "flags")
    launch(common(data_dir, test_config, flagged) + [
        "--max_steps", "2", "--eval_every", "0", "--activation_checkpointing",
        "--tiled_mlp", "2", "--tiled_loss", "3"])
    rows = [r for r in metrics(flagged) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert abs(r["loss"] - expected[r["step"]]) < 1e-4, (r, expected[r["step"]])
    with open(os.path.join(flagged, "run_info.json")) as f:
        info = json.load(f)
    assert info["activation_checkpointing"] and info["tiled_mlp"] == 2
    assert info["tiled_loss"] == 3 and info["compile"] is None


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
                                                      "--num_threads", "1", "--save_every",
                                                      "3"], num_ranks=2)
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
    # the checkpoint is marked complete after both ranks wrote their files: the marker lists
    # every file of the folder, the ZeRO shards of both ranks among them
    tag = os.path.join(out, "checkpoints", "step_3")
    with open(os.path.join(tag, "checkpoint_complete.json")) as f:
        files = json.load(f)["files"]
    present = {os.path.relpath(os.path.join(r, n), tag) for r, _, ns in os.walk(tag) for n in ns}
    assert set(files) == present - {"checkpoint_complete.json"}
    if stage > 0:
        assert len([n for n in files if n.endswith("optim_states.pt")]) == 2, files


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
    with open(os.path.join(EXAMPLE, "bert_config_tiny.json")) as f:
        bert = json.load(f)
    bert["max_position_embeddings"] = 160
    pos160 = tmp_path / "bert_160_positions.json"
    pos160.write_text(json.dumps(bert))
    # 160 is not a multiple of block 64: padded to 192, above the model's 160 positions
    code, err = run_main(base_argv(data_dir, str(odd), str(tmp_path), bert=str(pos160))
                         + ["--max_seq_length", "160"], capsys)
    assert code == 2 and "max_seq_length 160" in err and "192" in err
    assert "extend_position_embedding" in err
    big = tmp_path / "bert_small_positions.json"
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


# -- DeepSpeedExamples' bing_bert command line ----------------------------------------------
BB_SCRIPT = os.path.join(EXAMPLE, "ds_sa_train_bert_bsz64k_seq128.sh")
TINY_CF = os.path.join(EXAMPLE, "bert_tiny_lamb.json")
# bing_bert flags this example does not support: each must give exactly one line
IGNORED_FLAGS = [("--refresh_bucket_size", ["1"]), ("--use_nvidia_dataset", []),
                 ("--max_predictions_per_seq", ["20"]), ("--fp16", []),
                 ("--ckpt_to_save", ["1", "2"]), ("--progressive_layer_drop", []),
                 ("--attention_dropout_checkpoint", [])]
ODD_SEQ = 120  # not a multiple of the tiny config's block 16: padded to 128


@pytest.fixture(scope="module")
def bing_bert_data(data_dir, tmp_path_factory):
    """bing_bert's --data_path_prefix layouts: the prepared data at the prefix itself (the
    module's seq-128 data) and at <prefix>/seq120."""
    import prepare_data

    root = tmp_path_factory.mktemp("bing_bert_prefix")
    assert prepare_data.main(["--output_dir", str(root / f"seq{ODD_SEQ}"), "--max_seq_length",
                              str(ODD_SEQ), "--limit_files", "40", "--vocab_size", "1000",
                              "--dupe_factor", "2"]) == 0
    return {SEQ: data_dir, ODD_SEQ: str(root)}


def tiny_cf_with(tmp_path, seq, **training):
    """The shipped tiny --cf file plus a mixed_seq_training entry for ``seq``."""
    with open(TINY_CF) as f:
        cf = json.load(f)
    cf["mixed_seq_training"][str(seq)] = dict(cf["mixed_seq_training"]["128"], **training)
    path = tmp_path / f"bert_tiny_lamb_{seq}.json"
    path.write_text(json.dumps(cf, indent=2))
    return str(path)


@pytest.mark.parametrize("seq", [SEQ, ODD_SEQ], ids=["seq128", "seq120_padded"])
def test_bing_bert_command_runs_through_the_launcher(seq, bing_bert_data, test_config,
                                                     tmp_path):
    """ds_sa_train_bert_bsz64k_seq128.sh (bing_bert's command: --cf, --deepspeed,
    --print_steps, --lr_schedule EE, --lr_offset, --data_path_prefix, ...) for a few steps of
    the tiny model on CPU through the real launcher, with bing_bert flags this example
    ignores; at 120 tokens (not a multiple of the block) the inputs are padded to 128."""
    import bing_bert_compat as bb

    steps = 4
    if seq == SEQ:
        cf = TINY_CF  # the shipped file as it is
    else:
        cf = tiny_cf_with(tmp_path, seq, learning_rate=1e-3, warmup_proportion=0.25,
                          decay_rate=0.5, decay_step=2, total_training_steps=8)
    out, log_path = tmp_path / "out", tmp_path / "run.log"
    e = env()
    e.update(TINY_CPU="1", CF=cf, DS_CONFIG=test_config, DATA_PATH_PREFIX=bing_bert_data[seq],
             OUTPUT_DIR=str(out), LOG=str(log_path), MAX_SEQ_LENGTH=str(seq),
             MAX_STEPS=str(steps), PRINT_STEPS="1", NUM_GPUS="1", MASTER_PORT=str(free_port()),
             PATH=os.path.dirname(DEEPSPEED) + os.pathsep + e.get("PATH", ""))
    extra = ["--eval_every", "0", "--no_progress_bar"]
    for flag, values in IGNORED_FLAGS:
        extra += [flag] + values
    proc = subprocess.run(["bash", BB_SCRIPT] + extra, cwd=str(tmp_path), env=e,
                          capture_output=True, text=True, timeout=240)
    log = log_path.read_text() if log_path.exists() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + log[-6000:]
    assert "unrecognized arguments" not in log and "built successfully" not in log

    rows = [r for r in metrics(str(out)) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # --print_steps 1
    assert all(math.isfinite(r["loss"]) for r in rows)
    # bing_bert's EE schedule + offset, from --cf's mixed_seq_training["<seq>"]
    with open(cf) as f:
        training = json.load(f)["mixed_seq_training"][str(seq)]
    plan = bb.BingBertLR("EE", training, 10e-4)
    for r in rows:  # the LR of optimizer step k is the schedule at k - 1 steps done
        assert r["lr"] == pytest.approx(plan(r["step"] - 1), rel=1e-6), r
    assert rows[0]["lr"] == pytest.approx(1e-3)  # warmup starts at 0: the offset alone

    for flag, _ in IGNORED_FLAGS:
        assert log.count(f"bing_bert flag {flag}") == 1, (flag, log[-4000:])
    assert log.count("replaces the DeepSpeed config's scheduler (WarmupDecayLR)") == 1
    assert log.count("bert_model_file 'google/bert_uncased_L-2_H-128_A-2' not loaded") == 1
    padding = [line for line in log.splitlines() if "is not a multiple of" in line]
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    assert info["max_seq_length"] == seq and info["padded_seq_length"] == 128
    assert info["job_name"] == f"lamb_tiny_seq{seq}" and info["lr_schedule"] == "EE"
    assert info["sparse_attention"] and info["layout_checksum"].startswith("2x8x8:")
    if seq == ODD_SEQ:
        assert len(padding) == 1, padding
        assert "max_seq_length 120" in padding[0] and "padded to 128" in padding[0]
        assert info["data_dir"] == os.path.join(bing_bert_data[seq], f"seq{seq}")
    else:
        assert padding == []
        assert info["data_dir"] == bing_bert_data[seq]


def test_lr_schedules_follow_bing_bert():
    """LE, EE, EP as bing_bert's update_learning_rate computed them (warmup_linear_decay_exp,
    warmup_exp_decay_exp, warmup_exp_decay_poly), plus lr_offset."""
    import bing_bert_compat as bb

    tr = {"learning_rate": 0.01, "warmup_proportion": 0.1, "decay_rate": 0.9,
          "decay_step": 10, "total_training_steps": 200}  # warmup: 20 steps
    le, ee, ep = (bb.BingBertLR(s, tr, 0.001) for s in ("LE", "EE", "EP"))
    assert le(0) == pytest.approx(0.001) and ee(0) == pytest.approx(0.001)
    assert le(5) == pytest.approx(0.01 * 5 / 20 + 0.001)
    assert ee(5) == pytest.approx(0.01 * (5 / 20) ** 2 + 0.001)
    assert ep(5) == pytest.approx(0.01 * (5 / 20) ** 1.5 + 0.001)
    for plan in (le, ee):  # after warmup: decay_rate every decay_step steps
        assert plan(20) == pytest.approx(0.011)
        assert plan(40) == pytest.approx(0.01 * 0.9 ** 2 + 0.001)
        assert plan(45) == pytest.approx(0.01 * 0.9 ** 2.5 + 0.001)
    assert ep(20) == pytest.approx(0.01 * 0.9 ** 2 + 0.001)  # (1 - 20/200)^2
    assert ep(100) == pytest.approx(0.01 * 0.25 + 0.001)
    assert ep(200) == pytest.approx(0.001) and ep(400) == pytest.approx(0.001)  # held at 0
    flat = dict(tr, warmup_proportion=0.0)
    assert bb.BingBertLR("EE", flat)(0) == pytest.approx(0.01)
    assert bb.BingBertLR("LE", flat)(150) == pytest.approx(0.01)  # bing_bert: no decay
    rewarm = bb.BingBertLR("EE", tr, 0.0, start_step=100)
    assert rewarm(100) == 0.0 and rewarm(105) == pytest.approx(ee(5) - 0.001)


def test_every_bing_bert_flag_is_accepted_with_one_line():
    """bing_bert's parser (utils.get_argument_parser and its older train.py) parses; each
    flag this example does not have gives one line, DeepSpeed's --deepspeed none."""
    import bing_bert_compat as bb
    import deepspeed_train

    argv = ["--cf", TINY_CF, "--output_dir", "o", "--data_path_prefix", "d", "--deepspeed",
            "--deepspeed_sparse_attention", "--deepspeed_config", "ds.json",
            "--print_steps", "7", "--lr_schedule", "EP", "--lr_offset", "1e-4",
            "--job_name", "j", "--seed", "3", "--max_steps", "9", "--local_rank", "0",
            "--load_training_checkpoint", "ck", "--load_checkpoint_id", "epoch1_step5",
            "--rewarmup", "--validation_data_path_prefix", "v", "--deepscale",
            "--deepspeed_transformer_kernel", "--do_lower_case", "--max_pred", "20",
            "--masked_lm_prob", "0.15", "--use_pretrain", "--refresh_bucket_size", "1",
            "--finetune", "--max_steps_per_epoch", "5", "--ckpt_to_save", "160", "161",
            "--stochastic_mode", "--attention_dropout_checkpoint", "--normalize_invertible",
            "--gelu_checkpoint", "--use_nvidia_dataset", "--progressive_layer_drop",
            "--no_cuda", "False", "--fp16", "True", "--loss_scale", "0",
            "--train_batch_size", "4096", "--gradient_accumulation_steps", "2",
            "--files_location", "blob", "--display_progress_bar", "True"]
    args = deepspeed_train.parse_args(argv)
    assert (args.cf, args.log_every, args.lr_schedule, args.lr_offset) == (TINY_CF, 7, "EP",
                                                                           1e-4)
    assert (args.seed, args.max_steps, args.job_name) == (3, 9, "j")
    assert (args.load_training_checkpoint, args.load_checkpoint_id) == ("ck", "epoch1_step5")
    lines = bb.flag_notes(args)
    named = [line.split(":")[0].split()[2] for line in lines]
    assert len(named) == len(set(named))  # one line per flag
    assert set(named) == {
        "--refresh_bucket_size", "--use_nvidia_dataset", "--finetune", "--use_pretrain",
        "--max_predictions_per_seq", "--masked_lm_prob", "--do_lower_case",
        "--max_steps_per_epoch", "--ckpt_to_save", "--progressive_layer_drop", "--no_cuda",
        "--fp16", "--loss_scale", "--train_batch_size", "--gradient_accumulation_steps",
        "--files_location", "--display_progress_bar", "--stochastic_mode",
        "--attention_dropout_checkpoint", "--normalize_invertible", "--gelu_checkpoint",
        "--deepscale"}
    assert all("not supported" in line or "ignored" in line or "nothing to do" in line
               for line in lines), lines
    # the kernel options reach DeepSpeed's transformer kernel on dense runs
    dense = deepspeed_train.parse_args(["--output_dir", "o", "--deepspeed_transformer_kernel",
                                        "--gelu_checkpoint", "--stochastic_mode", "False"])
    assert bb.kernel_options(dense) == {"gelu_checkpoint": True, "stochastic_mode": False}
    assert any("passed to DeepSpeed's transformer kernel" in line
               for line in bb.flag_notes(dense))
    with pytest.raises(SystemExit):  # a schedule bing_bert did not have: argparse's choices
        deepspeed_train.parse_args(["--output_dir", "o", "--lr_schedule", "XX"])


def bb_argv(data, config, out, cf=TINY_CF, seq=SEQ):
    return ["--cf", cf, "--max_seq_length", str(seq), "--output_dir", out, "--deepspeed",
            "--deepspeed_sparse_attention", "--lr_schedule", "EE", "--lr_offset", "10e-4",
            "--deepspeed_config", config, "--data_path_prefix", data]


@pytest.mark.parametrize("cf_text, match", [
    ('{"name": "x"}', "has no bert_model_config"),
    ('{"bert_model_config": {"hidden_size": 128, "num_hidden_layers": 2, '
     '"num_attention_heads": 2}, "mixed_seq_trainig": {}}',
     "unknown key 'mixed_seq_trainig' (did you mean 'mixed_seq_training'?)"),
    ('{"bert_model_config": {"hidden_size": 128, "num_hidden_layers": 2, '
     '"num_attention_heads": 2, "num_heads": 2}}', "bert_model_config: unknown key 'num_heads'"),
    ('{"bert_model_config": {"vocab_size_or_config_json_file": "bert.json", '
     '"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}}',
     "vocab_size_or_config_json_file: a path to a config file"),
    ('{"bert_model_config": {"hidden_size": "128", "num_hidden_layers": 2, '
     '"num_attention_heads": 2}}', "bert_model_config.hidden_size must be an integer"),
    ('{"bert_model_config": {"hidden_size": 130, "num_hidden_layers": 2, '
     '"num_attention_heads": 4}}', "not a multiple of num_attention_heads"),
    ('{"bert_model_config": {"hidden_size": 128, "num_hidden_layers": 2, '
     '"num_attention_heads": 2, "hidden_act": "swish"}}', "hidden_act 'swish'"),
    ('{"bert_model_config": {"hidden_size": 128, "num_hidden_layers": 2, '
     '"num_attention_heads": 2}, "mixed_seq_training": {"128": {"learning_rate": 0.1, '
     '"warmup_proportoin": 0.1}}}', 'mixed_seq_training["128"]: unknown key '
     "'warmup_proportoin' (did you mean 'warmup_proportion'?)"),
    ('{"bert_model_config": {"hidden_size": 128, "num_hidden_layers": 2, '
     '"num_attention_heads": 2}, "mixed_seq_training": {"128": {"warmup_proportion": 1.5}}}',
     'mixed_seq_training["128"].warmup_proportion must be in [0, 1)'),
    ('{"bert_model_config": {"hidden_size": 128, "num_hidden_layers": 2, '
     '"num_attention_heads": 2}, "mixed_seq_training": {"long": {}}}',
     "mixed_seq_training key 'long' must be a sequence length"),
    ('{"name": "a",\n "name": "b"}', "duplicate key 'name'"),
    ('{"name": "a",\n "bert_model_config": {,}}', "line 2"),
], ids=["no_bert_config", "top_key", "bert_key", "vocab_path", "type", "heads", "act",
        "training_key", "warmup", "seq_key", "duplicate", "malformed"])
def test_cf_errors_name_the_key(tmp_path, data_dir, test_config, capsys, cf_text, match):
    cf = tmp_path / "bing.json"
    cf.write_text(cf_text)
    code, err = run_main(bb_argv(data_dir, test_config, str(tmp_path), cf=str(cf)), capsys)
    assert code == 2 and match in err and "bing.json" in err, err


def test_bing_bert_command_clear_errors(tmp_path, data_dir, test_config, capsys):
    out = str(tmp_path / "out")
    # --cf and --bert_config: exactly one; --data_path_prefix and --data_dir: exactly one
    argv = bb_argv(data_dir, test_config, out)
    code, err = run_main(argv + ["--bert_config", os.path.join(EXAMPLE,
                                                               "bert_config_tiny.json")], capsys)
    assert code == 2 and "exactly one of --bert_config" in err and "not both" in err
    code, err = run_main(argv[2:], capsys)
    assert code == 2 and "exactly one of --bert_config" in err
    code, err = run_main(argv + ["--data_dir", data_dir], capsys)
    assert code == 2 and "exactly one of --data_dir and --data_path_prefix" in err
    # no prepared data at the prefix: bing_bert's format is not read; the prepare command
    code, err = run_main(bb_argv(str(tmp_path / "bert"), test_config, out), capsys)
    assert code == 2 and "bing_bert's own dataset format" in err
    assert f"prepare_data.py --output_dir {tmp_path / 'bert' / 'seq128'} --max_seq_length " \
           f"128" in err
    # --lr_schedule without values for this length, or with some missing
    code, err = run_main(bb_argv(data_dir, test_config, out, seq=136), capsys)
    assert code == 2 and 'no mixed_seq_training["136"]' in err and '"128"' in err
    cf = tiny_cf_with(tmp_path, 136)
    with open(cf) as f:
        text = json.load(f)
    del text["mixed_seq_training"]["136"]["decay_rate"]
    with open(cf, "w") as f:
        json.dump(text, f)
    code, err = run_main(bb_argv(data_dir, test_config, out, cf=cf, seq=136), capsys)
    assert code == 2 and "needs decay_rate" in err and 'mixed_seq_training["136"]' in err
    # --lr_schedule with this example's --bert_config: no values to take
    argv = base_argv(data_dir, test_config, out) + ["--lr_schedule", "EE"]
    code, err = run_main(argv, capsys)
    assert code == 2 and "--lr_schedule EE takes its values" in err and "--cf" in err


def test_bing_bert_resume_flags(first_run, data_dir, test_config, tmp_path):
    """--load_training_checkpoint / --load_checkpoint_id resume this example's checkpoint;
    --rewarmup restarts the --lr_schedule at the resumed step."""
    import bing_bert_compat as bb

    out, _ = first_run  # same architecture as bert_tiny_lamb.json's bert_model_config
    resumed = str(tmp_path / "resumed")
    log = launch(bb_argv(data_dir, test_config, resumed) + [
        "--max_steps", "17", "--print_steps", "1", "--eval_every", "0", "--no_progress_bar",
        "--load_training_checkpoint", os.path.join(out, "checkpoints"),
        "--load_checkpoint_id", "step_15", "--rewarmup"])
    assert "resumed from" in log and "step_15" in log
    assert log.count("bing_bert flag --load_training_checkpoint") == 1
    assert log.count("bing_bert flag --load_checkpoint_id step_15") == 1
    assert log.count("schedule restarts (warmup included) at step 15") == 1
    rows = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in rows] == [16, 17]
    with open(TINY_CF) as f:
        plan = bb.BingBertLR("EE", json.load(f)["mixed_seq_training"]["128"], 10e-4,
                             start_step=15)
    assert rows[0]["lr"] == pytest.approx(1e-3)  # warmup again from 0: the offset alone
    assert rows[1]["lr"] == pytest.approx(plan(16)) and plan(16) > 1e-3
    assert all(math.isfinite(r["loss"]) for r in rows)


# -- resuming: layouts, tags, and faults during training (issue 19) --------------------------
RECORD, COMPLETE = "sparse_attention_layout.json", "checkpoint_complete.json"
KILL_IN_SAVE = "SPARSE_ATTN_TEST_FAULT_KILL_IN_SAVE_AT_STEP"
NAN_LOSS = "SPARSE_ATTN_TEST_FAULT_NAN_LOSS_AT_STEP"


def config_with(test_config, tmp_path, name, **changes):
    """The test config with top-level keys replaced (e.g. sparse_attention=..., bf16=...)."""
    with open(test_config) as f:
        cfg = json.load(f)
    cfg.update(changes)
    cfg["csv_monitor"]["enabled"] = False
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def losses_by_step(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_every_checkpoint_records_its_layout_and_is_marked_complete(first_run):
    """Each checkpoint folder holds its layout record and, written last, the completion
    marker (with every file's size); ``latest`` names the last complete one."""
    out, _ = first_run
    ckpts = os.path.join(out, "checkpoints")
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    for step in (15, 30):
        tag = os.path.join(ckpts, f"step_{step}")
        with open(os.path.join(tag, RECORD)) as f:
            record = json.load(f)
        with open(os.path.join(tag, COMPLETE)) as f:
            marker = json.load(f)
        assert record["step"] == marker["step"] == step and record["tag"] == f"step_{step}"
        layout = marker["layout"]
        assert layout == record["layout"] == info["layout_record"]
        assert layout["sparse_attention"] and layout["mode"] == "fixed" and layout["block"] == 16
        assert layout["layout_checksum"] == info["layout_checksum"]
        assert layout["layout_length"] == SEQ
        assert layout["sparse_attention_block"]["num_local_blocks"] == 4
        assert marker["files"]["mp_rank_00_model_states.pt"] == os.path.getsize(
            os.path.join(tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "step_30"


def test_resume_with_another_layout_is_refused(first_run, data_dir, test_config, tmp_path,
                                               capsys):
    """A Fixed-16 checkpoint resumed with BigBird-32, or with sparse attention off: refused
    before DeepSpeed starts, naming both layouts (today it resumes silently)."""
    out, _ = first_run
    ckpts = os.path.join(out, "checkpoints")
    with open(os.path.join(out, "run_info.json")) as f:
        checksum = json.load(f)["layout_checksum"]
    bigbird = config_with(test_config, tmp_path, "bigbird32.json", sparse_attention={
        "mode": "bigbird", "block": 32, "num_random_blocks": 1})
    resume = ["--load_checkpoint_dir", ckpts, "--load_checkpoint_tag", "step_15"]
    code, err = run_main(base_argv(data_dir, bigbird, str(tmp_path / "a")) + resume, capsys)
    assert code == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, err
    assert "was trained with sparse attention: mode fixed, block 16" in line[0]
    assert checksum in line[0]
    assert "this run has sparse attention: mode bigbird, block 32" in line[0]
    assert "different: mode, block" in line[0] and "--allow_layout_change" in line[0]
    # sparse attention off (the same config without --deepspeed_sparse_attention)
    dense = [a for a in base_argv(data_dir, test_config, str(tmp_path / "b"))
             if a != "--deepspeed_sparse_attention"]
    code, err = run_main(dense + resume, capsys)
    assert code == 2 and "this run has dense attention" in err
    assert "different: sparse or dense" in err
    assert not os.path.exists(os.path.join(str(tmp_path), "a"))  # refused before the run


def test_allow_layout_change_resumes_with_one_line(first_run, data_dir, test_config, tmp_path):
    """--allow_layout_change: the Fixed-16 checkpoint goes on training with BigBird-32; one
    line says so; the new checkpoint records the new layout."""
    out, _ = first_run
    bigbird = config_with(test_config, tmp_path, "bigbird32.json", sparse_attention={
        "mode": "bigbird", "block": 32, "num_random_blocks": 1})
    resumed = str(tmp_path / "resumed")
    log = launch(common(data_dir, bigbird, resumed) + [
        "--max_steps", "16", "--eval_every", "0", "--save_every", "16",
        "--load_checkpoint_dir", os.path.join(out, "checkpoints"), "--load_checkpoint_tag",
        "step_15", "--allow_layout_change"])
    lines = [ln for ln in log.splitlines() if "--allow_layout_change: resuming" in ln]
    assert len(lines) == 1, log[-4000:]
    assert "mode fixed, block 16" in lines[0] and "mode bigbird, block 32" in lines[0]
    assert "resumed from" in log
    assert [r["step"] for r in metrics(resumed) if "loss" in r] == [16]
    with open(os.path.join(resumed, "checkpoints", "step_16", COMPLETE)) as f:
        layout = json.load(f)["layout"]
    assert layout["mode"] == "bigbird" and layout["block"] == 32


def test_missing_checkpoint_tag_or_folder_is_a_clear_error(first_run, data_dir, test_config,
                                                           tmp_path, capsys):
    """A tag that is not there (today an AssertionError from inside DeepSpeed) names the tag
    and the tags present; a missing folder likewise, and the output folder given in place of
    its checkpoints folder points to it."""
    out, _ = first_run
    ckpts = os.path.join(out, "checkpoints")
    argv = base_argv(data_dir, test_config, str(tmp_path / "o"))
    code, err = run_main(argv + ["--load_checkpoint_dir", ckpts, "--load_checkpoint_tag",
                                 "step_16"], capsys)
    assert code == 2, err
    assert f"--load_checkpoint_tag step_16: {ckpts} has no checkpoint step_16" in err
    assert "tags present: step_15 (complete, step 15), step_30 (complete, step 30)" in err
    code, err = run_main(argv + ["--load_checkpoint_dir", str(tmp_path / "nothing")], capsys)
    assert code == 2 and f"--load_checkpoint_dir {tmp_path / 'nothing'} does not exist" in err
    code, err = run_main(argv + ["--load_checkpoint_dir", out], capsys)  # not .../checkpoints
    assert code == 2 and "holds no checkpoint" in err and f"did you mean {ckpts}?" in err


def test_kill_during_checkpoint_save_resumes_from_last_complete(first_run, data_dir,
                                                                test_config, tmp_path):
    """SIGKILL to the launcher's process group while step 8's checkpoint is written (its
    files are there, it is not marked complete): step_8 is never taken as the latest; the
    resume without a tag says it skipped it, goes on from step_4, and repeats the
    uninterrupted run's losses exactly."""
    reference = losses_by_step(metrics(first_run[0]))  # uninterrupted, same config and seed
    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    args = common(data_dir, test_config, out) + ["--max_steps", "8", "--save_every", "4",
                                                 "--eval_every", "0"]
    code, log = run_launcher(args, extra_env={KILL_IN_SAVE: "8"})
    assert code == -signal.SIGKILL, (code, log[-4000:])
    assert "test fault injection: SIGKILL to process group" in log
    killed = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in killed] == list(range(1, 9))
    step8 = os.path.join(ckpts, "step_8")
    assert os.path.isfile(os.path.join(step8, "mp_rank_00_model_states.pt"))  # files written
    assert os.path.isfile(os.path.join(step8, RECORD))
    assert not os.path.exists(os.path.join(step8, COMPLETE))  # ... not marked complete
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "step_4"

    log = launch(args + ["--load_checkpoint_dir", ckpts])  # no tag: the newest complete one
    skipped = [ln for ln in log.splitlines() if "skipped step_8" in ln]
    assert len(skipped) == 1 and "incomplete" in skipped[0], log[-4000:]
    assert "resuming from the newest complete checkpoint, step_4" in skipped[0]
    assert f"resumed from {os.path.join(ckpts, 'step_4')}" in log
    rows = [r for r in metrics(out) if "loss" in r][len(killed):]
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    for r in rows:
        assert r["loss"] == reference[r["step"]], (r, reference[r["step"]])
        assert r["loss"] == killed[r["step"] - 1]["loss"]
    assert os.path.isfile(os.path.join(step8, COMPLETE))  # saved again, completely this time
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "step_8"


def cpu_fp16_supported():
    try:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        return bool(CPU_Accelerator().is_fp16_supported())
    except Exception:
        return False


FP16_GATE = """\
# Written by tests/example/test_bing_bert.py: DeepSpeed's CPU accelerator allows fp16 only on
# CPUs with AVX512-FP16 or AMX-FP16 (a speed gate; torch's CPU fp16 kernels compute correctly).
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
CPU_Accelerator.is_fp16_supported = lambda self: True
"""


def fp16_env(tmp_path):
    """The environment of an fp16 run on this CPU: where DeepSpeed refuses fp16 here
    ("Type fp16 is not supported on your device"), a sitecustomize in every launched process
    lifts that gate, so that DeepSpeed's fp16 optimizer and loss scaling run as on a GPU."""
    if cpu_fp16_supported():
        return {}
    gate = tmp_path / "fp16_gate"
    gate.mkdir()
    (gate / "sitecustomize.py").write_text(FP16_GATE)
    return {"PYTHONPATH": str(gate) + os.pathsep + env()["PYTHONPATH"]}


def test_fp16_overflow_skips_the_step_and_goes_on(data_dir, test_config, tmp_path):
    """DeepSpeed's behaviour, not this example's: with fp16 and dynamic loss scaling, a step
    whose scaled gradients overflow is skipped (weights not updated) and the loss scale is
    halved (hysteresis 1), until the gradients fit; then training goes on. An initial scale of
    2**32 overflows at once (a gradient times 2**32 is far above fp16's 65504). The example
    does not stop on it (it stops on non-finite losses only in bf16/fp32); it says which steps
    were skipped and logs the scale.

    DeepSpeed 0.19's engine leaves the loss unscaled at ZeRO stage 0 while its fp16 optimizer
    unscales the gradients (nothing overflowed and training stalled: every step applied, the
    loss flat); the example's ``launcher.scaled_backward`` applies the scale."""
    cfg = config_with(test_config, tmp_path, "fp16.json", bf16={"enabled": False},
                      fp16={"enabled": True, "loss_scale": 0, "initial_scale_power": 32,
                            "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1})
    out = str(tmp_path / "fp16")
    steps = 40
    log = launch(common(data_dir, cfg, out) + ["--max_steps", str(steps), "--eval_every", "0"],
                 extra_env=fp16_env(tmp_path))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    skipped = [r["step"] for r in rows if r["step_skipped"]]  # engine.was_step_applied()
    k = len(skipped)
    # at least the first 12: this model's largest gradients (about 0.25) times 2**20 are far
    # above fp16's 65504; then it trains, an overflow now and then halving the scale again
    assert skipped[:12] == list(range(1, 13)) and k <= steps // 2, skipped
    seen = 0
    for r in rows:  # halved once per skipped step, no growth within 1000 good steps
        seen += r["step_skipped"]
        assert r["loss_scale"] == 2.0 ** (32 - seen), (r, skipped)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert log.count("skipped by DeepSpeed's fp16 dynamic loss scaling") == k
    last = [r["loss"] for r in rows[-5:]]
    assert sum(last) / len(last) < rows[0]["loss"] - 0.2, last  # the applied steps train


def test_nan_loss_in_bf16_stops_the_run(data_dir, test_config, tmp_path):
    """bf16 has no loss scaling to skip a bad step: a NaN loss at step 5 (test fault
    injection) stops the run before that step's optimizer update, exit status non-zero, one
    line naming the step and the last good checkpoint (step_4); nothing is trained or saved
    after it."""
    cfg = config_with(test_config, tmp_path, "bf16.json", bf16={"enabled": True},
                      fp16={"enabled": False})
    out = str(tmp_path / "bf16")
    ckpts = os.path.join(out, "checkpoints")
    code, log = run_launcher(common(data_dir, cfg, out) + [
        "--max_steps", "8", "--save_every", "2", "--eval_every", "0"],
        extra_env={NAN_LOSS: "5"})
    assert code == 3, (code, log[-4000:])  # the rank's status, passed on by the launcher
    lines = [ln for ln in log.splitlines() if "non-finite loss" in ln]
    assert len(lines) == 1, log[-4000:]
    assert "error: non-finite loss at step 5 (loss nan" in lines[0] and "bf16" in lines[0]
    assert f"the last good checkpoint is {os.path.join(ckpts, 'step_4')}" in lines[0]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert sorted(os.listdir(ckpts)) == ["latest", "step_2", "step_4"]
    assert os.path.isfile(os.path.join(ckpts, "step_4", COMPLETE))


LAMB_CONFIG = {"type": "Lamb", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-6,
                                          "weight_decay": 0.01, "max_coeff": 0.3,
                                          "min_coeff": 0.01}}


def test_lamb_master_trains_as_deepspeed_bf16_and_resumes(data_dir, test_config, tmp_path):
    """--lamb master (the example's LAMB keeps the float32 master weights; no DeepSpeed bf16
    wrapper) gives the losses of --lamb torch under DeepSpeed's bf16 (the same math, rounded
    apart only by where the clipping scale is applied), and a resumed run repeats its own."""
    cfg = config_with(test_config, tmp_path, "bf16_lamb.json", bf16={"enabled": True},
                      fp16={"enabled": False}, optimizer=LAMB_CONFIG)
    runs = {}
    for lamb in ("torch", "master"):
        out = str(tmp_path / lamb)
        log = launch(common(data_dir, cfg, out) + [
            "--max_steps", "8", "--save_every", "4", "--eval_every", "0", "--lamb", lamb])
        runs[lamb] = losses_by_step(metrics(out))
        assert sorted(runs[lamb]) == list(range(1, 9))
    assert "own float32 master weights" in log
    for step, loss in runs["torch"].items():
        assert abs(runs["master"][step] - loss) < 0.02 * abs(loss), (step, runs)
    assert max(abs(runs["master"][s] - runs["torch"][s]) for s in runs["torch"]) > 0
    resumed = str(tmp_path / "resumed")
    launch(common(data_dir, cfg, resumed) + [
        "--max_steps", "8", "--eval_every", "0", "--lamb", "master",
        "--load_checkpoint_dir", str(tmp_path / "master" / "checkpoints"),
        "--load_checkpoint_tag", "step_4"])
    again = losses_by_step(metrics(resumed))
    assert sorted(again) == [5, 6, 7, 8]
    for step, loss in again.items():
        assert abs(loss - runs["master"][step]) < 1e-4, (step, again, runs["master"])
    for lamb, folder in (("torch", "master"), ("master", "torch")):  # the other optimizer's
        code, log = run_launcher(common(data_dir, cfg, str(tmp_path / f"mixed_{lamb}")) + [
            "--max_steps", "5", "--eval_every", "0", "--lamb", lamb,
            "--load_checkpoint_dir", str(tmp_path / folder / "checkpoints"),
            "--load_checkpoint_tag", "step_4"])
        assert code != 0 and "saved with --lamb master" in log, log[-3000:]
        assert "resumes only with it" in log


def test_lamb_master_needs_bf16_at_zero_stage_0(data_dir, test_config, tmp_path):
    cfg = config_with(test_config, tmp_path, "fp32_lamb.json", optimizer=LAMB_CONFIG)
    code, log = run_launcher(common(data_dir, cfg, str(tmp_path / "out")) + [
        "--max_steps", "1", "--lamb", "master"])
    assert code != 0
    assert "--lamb master is for" in log and "--lamb torch" in log


# -- sequence parallelism (DeepSpeed Ulysses) ------------------------------------------------
def test_sequence_parallel_two_ranks_equal_one_rank(data_dir, test_config, tmp_path):
    """--sequence_parallel_size 2 on two ranks (each holds half of every sequence) trains
    exactly as one rank holding whole sequences: same losses at every step, to round-off,
    also after resuming its step-3 checkpoint. Dropout is off so that both runs compute the
    same function."""
    with open(os.path.join(EXAMPLE, "bert_config_tiny.json")) as f:
        bert = json.load(f)
    bert["hidden_dropout_prob"] = bert["attention_probs_dropout_prob"] = 0.0
    bert_path = tmp_path / "bert_tiny_no_dropout.json"
    bert_path.write_text(json.dumps(bert))
    with open(test_config) as f:
        cfg = json.load(f)
    cfg["csv_monitor"]["enabled"] = False
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(cfg))
    flags = ["--log_every", "1", "--eval_every", "3", "--eval_batches", "2", "--max_steps",
             "6", "--num_threads", "1", "--no_progress_bar"]
    sp = ["--sequence_parallel_size", "2"]
    runs, logs = {}, {}
    for name, ranks, extra in (("one", 1, []), ("two", 2, sp + ["--save_every", "3"]),
                               ("resumed", 2, sp + ["--load_checkpoint_dir",
                                                    str(tmp_path / "two" / "checkpoints"),
                                                    "--load_checkpoint_tag", "step_3"])):
        out = str(tmp_path / name)
        logs[name] = launch(base_argv(data_dir, str(config), out, bert=str(bert_path)) + flags
                            + extra, num_ranks=ranks)
        runs[name] = metrics(out)
    assert "x 1 data-parallel ranks x 2 per sequence" in logs["two"]
    assert "same on all 2 ranks" in logs["two"]
    with open(os.path.join(tmp_path, "two", "run_info.json")) as f:
        info = json.load(f)
    assert info["sequence_parallel_size"] == 2
    assert info["engine_sequence_parallel_size"] == 2  # DeepSpeed's engine reduces over it
    one = runs["one"]
    assert [r["step"] for r in one if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for got, want in ((runs["two"], one), (runs["resumed"], [r for r in one if r["step"] > 3])):
        assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
        for a, b in zip(want, got):
            for key in ("loss", "mlm_loss", "nsp_loss", "eval_loss"):
                if key in a:
                    assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)


@pytest.mark.parametrize("world, size, flags, message", [
    ("1", "2", [], "--sequence_parallel_size 2 does not divide the 1 ranks"),
    ("3", "3", [], "--sequence_parallel_size 3 does not divide the model's 2 attention heads"),
    ("2", "2", ["--max_seq_length", "144"],
     "(padded: 144) is not a multiple of sequence_parallel_size * block = 2 * 16 = 32: use "
     "--max_seq_length 160"),
    ("2", "2", ["--dense"], "--sequence_parallel_size > 1 needs --deepspeed_sparse_attention"),
])
def test_sequence_parallel_errors(tmp_path, data_dir, test_config, capsys, monkeypatch,
                                  world, size, flags, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    argv = base_argv(data_dir, test_config, str(tmp_path)) + ["--sequence_parallel_size", size]
    if flags == ["--dense"]:
        argv.remove("--deepspeed_sparse_attention")
    else:
        argv += flags
    code, err = run_main(argv, capsys)
    assert code == 2 and message in err, err


def test_prepare_data_docstrings_of(tmp_path):
    """--docstrings_of DIR: the corpus is the docstrings of the modules under DIR (one
    document per module), merged by --min_doc_chars into sequences longer than any module."""
    import prepare_data

    src = tmp_path / "pkg"
    src.mkdir()
    sentence = "The quick parser reads every token of the stream and keeps its offset. "
    for i in range(12):
        (src / f"mod{i}.py").write_text(
            f'"""Module {i}. {sentence * 8}"""\n\n\ndef f():\n    """Function {i}. '
            f'{sentence * 4}"""\n')
    out = tmp_path / "data"
    assert prepare_data.main(["--output_dir", str(out), "--max_seq_length", "1024",
                              "--docstrings_of", str(src), "--vocab_size", "200",
                              "--min_doc_chars", "3000", "--dupe_factor", "1",
                              "--short_seq_prob", "0"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == f"docstrings of the Python modules under {src}"
    assert 1 < meta["documents"] < 12  # 12 modules of about 900 characters, merged
    corpus = (out / "corpus.txt").read_text()
    assert corpus.count("Module ") == 12 and corpus.count("Function ") == 12
    shard = torch.load(out / meta["train_shards"][0])
    # merged documents: some sequence is longer than any single module (about 150 tokens)
    assert int(shard["lengths"].max()) > 300
    with pytest.raises(SystemExit, match="not a directory"):
        prepare_data.main(["--output_dir", str(out), "--docstrings_of", str(tmp_path / "no")])
