"""Unit tests of ``launcher/checkpoints.py``: the layout a checkpoint records and the refusal
to resume it with another, finding the checkpoint to resume (clear errors for a missing tag or
folder, unfinished saves skipped), and the order in which a checkpoint is saved (files, then
the completion marker, then ``latest``). The end-to-end runs through the real launcher are in
tests/example/test_bing_bert.py."""
import json
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from launcher import (CheckpointError, LayoutChangeError, check_resume_layout,  # noqa: E402
                      layout_record, prepare_from_config, resolve_checkpoint, save_checkpoint)
from launcher.checkpoints import COMPLETE_NAME, RECORD_NAME  # noqa: E402

FIXED16 = {"mode": "fixed", "block": 16, "num_local_blocks": 4, "num_global_blocks": 1}
BIGBIRD32 = {"mode": "bigbird", "block": 32, "num_random_blocks": 1}
BASE = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2}
MODEL_FILE = "mp_rank_00_model_states.pt"


def make_run(block=FIXED16, sparse=True, seq=128, heads=2):
    return prepare_from_config(dict(BASE, sparse_attention=block), sparse_attention=sparse,
                               num_heads=heads, max_seq_length=seq, max_position_embeddings=512)


def launcher_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "sparse_attn.launcher"]


# -- the layout record and the resume check -------------------------------------------------
def test_layout_record_holds_what_is_compared():
    run = make_run()
    rec = layout_record(run)
    assert rec["sparse_attention"] is True and (rec["mode"], rec["block"]) == ("fixed", 16)
    assert rec["layout_checksum"] == run.layout_checksum and rec["layout_length"] == 128
    assert rec["sparse_attention_block"]["num_local_blocks"] == 4  # defaults filled in too
    assert rec["sparse_attention_block"]["attention"] == "bidirectional"
    assert layout_record(make_run(sparse=False)) == {"sparse_attention": False}
    assert check_resume_layout(rec, make_run()) is None  # the same layout: nothing to say


@pytest.mark.parametrize("saved, now, different", [
    (dict(block=FIXED16), dict(block=BIGBIRD32), "mode, block, layout checksum)"),
    (dict(block=FIXED16), dict(block=dict(FIXED16, num_local_blocks=2)), "num_local_blocks"),
    (dict(block=FIXED16), dict(sparse=False), "sparse or dense"),
    (dict(sparse=False), dict(block=FIXED16), "sparse or dense"),
], ids=["fixed16_to_bigbird32", "local_blocks", "sparse_to_dense", "dense_to_sparse"])
def test_another_layout_is_refused_naming_both(saved, now, different):
    old, new = make_run(**saved), make_run(**now)
    with pytest.raises(LayoutChangeError) as err:
        check_resume_layout(layout_record(old), new, checkpoint="checkpoint ck/step_5")
    text = str(err.value)
    assert text.startswith("checkpoint ck/step_5 was trained with ")
    assert f"(different: {different}" in text and "--allow_layout_change" in text
    for run, side in ((old, "was trained with "), (new, "this run has ")):
        if run.enabled:
            want = f"{side}sparse attention: mode {run.block_model.mode}, block {run.block}"
            assert want in text, text
        else:
            assert f"{side}dense attention" in text, text
    if old.enabled:
        assert old.layout_checksum in text


def test_layout_checksum_alone_differs(monkeypatch):
    """Same block settings, another layout (e.g. a changed layout rule in the library): the
    checksum comparison catches it."""
    rec = layout_record(make_run())
    rec["layout_checksum"] = "2x8x8:000000000000"
    with pytest.raises(LayoutChangeError, match=r"different: layout checksum\)"):
        check_resume_layout(rec, make_run())


def test_allow_layout_change_logs_one_line(caplog):
    saved, now = layout_record(make_run()), make_run(block=BIGBIRD32)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        line = check_resume_layout(saved, now, allow_change=True,
                                   checkpoint="checkpoint ck/step_5")
    assert launcher_lines(caplog) == [line]
    assert line.startswith("--allow_layout_change: resuming checkpoint ck/step_5")
    assert "mode fixed, block 16" in line and "mode bigbird, block 32" in line
    assert line.endswith("(different: mode, block, layout checksum)")


def test_checkpoint_without_record_is_one_line(caplog):
    now = make_run()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        line = check_resume_layout(None, now, checkpoint="checkpoint ck/old")
    assert launcher_lines(caplog) == [line]
    assert "no layout record" in line and "cannot be checked" in line
    assert "mode fixed, block 16" in line


def test_same_block_at_another_length_resumes(caplog):
    """bing_bert's second phase (128 then 512 tokens): the same block, so this run's layout
    at the checkpoint's length is the checkpoint's; accepted with one line."""
    rec, now = layout_record(make_run(seq=128)), make_run(seq=512)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        line = check_resume_layout(rec, now)
    assert launcher_lines(caplog) == [line] and "trained at 128 tokens, this run at 512" in line
    with pytest.raises(LayoutChangeError, match="layout .* at 128 tokens"):
        check_resume_layout(rec, make_run(block=BIGBIRD32, seq=512))


# -- finding the checkpoint to resume ---------------------------------------------------------
def fake_checkpoint(root, tag, step, state="complete", layout=None):
    path = root / tag
    path.mkdir(parents=True)
    (path / MODEL_FILE).write_bytes(b"x" * (100 + step))
    if state == "unrecorded":
        return path
    record = {"format": 1, "tag": tag, "step": step,
              "layout": layout or {"sparse_attention": False}}
    (path / RECORD_NAME).write_text(json.dumps(record))
    if state in ("complete", "damaged"):
        files = {MODEL_FILE: 100 + step, RECORD_NAME: (path / RECORD_NAME).stat().st_size}
        (path / COMPLETE_NAME).write_text(json.dumps(dict(record, files=files)))
    if state == "damaged":
        (path / MODEL_FILE).write_bytes(b"x" * 10)
    return path


def test_missing_folder_and_tag_name_what_is_there(tmp_path):
    with pytest.raises(CheckpointError, match="--load_checkpoint_dir .*nope does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts, "step_10", 10)
    fake_checkpoint(ckpts, "step_20", 20)
    (ckpts / "latest").write_text("step_20")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(str(ckpts), "step_15")
    assert str(err.value) == (
        f"--load_checkpoint_tag step_15: {ckpts} has no checkpoint step_15 (did you mean "
        f"step_10?); tags present: step_10 (complete, step 10), step_20 (complete, step 20)")
    with pytest.raises(CheckpointError, match=r"holds no checkpoint \(tags present: none\) "
                       r"\(did you mean .*checkpoints\?\)"):
        resolve_checkpoint(str(tmp_path))  # the output folder, not its checkpoints
    assert resolve_checkpoint(str(ckpts), "step_10").step == 10
    assert resolve_checkpoint(str(ckpts)).tag == "step_20"


def test_unfinished_save_is_skipped_with_one_line_and_refused_by_tag(tmp_path, caplog):
    ckpts = tmp_path / "ck"
    fake_checkpoint(ckpts, "step_5", 5)
    fake_checkpoint(ckpts, "step_10", 10, state="incomplete")
    (ckpts / "latest").write_text("step_10")  # what DeepSpeed alone could have left
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        chosen = resolve_checkpoint(str(ckpts))
    assert chosen.tag == "step_5" and chosen.state == "complete"
    lines = launcher_lines(caplog)
    assert len(lines) == 1 and "skipped step_10 (incomplete: its save did not finish" in lines[0]
    assert lines[0].endswith("resuming from the newest complete checkpoint, step_5")
    with pytest.raises(CheckpointError, match="step_10 is incomplete .* cannot be resumed; "
                       r"complete checkpoints: step_5 \(complete, step 5\)"):
        resolve_checkpoint(str(ckpts), "step_10")


def test_damaged_checkpoint_is_not_resumed(tmp_path):
    ckpts = tmp_path / "ck"
    fake_checkpoint(ckpts, "step_5", 5)
    fake_checkpoint(ckpts, "step_10", 10, state="damaged")
    assert resolve_checkpoint(str(ckpts)).tag == "step_5"
    with pytest.raises(CheckpointError, match=f"step_10 is damaged \\({MODEL_FILE} has 10 "
                       f"bytes, 110 when saved\\)"):
        resolve_checkpoint(str(ckpts), "step_10")


def test_unrecorded_checkpoints_resume_as_deepspeed_would(tmp_path, caplog):
    """Checkpoints saved before the records existed: ``latest`` (or the tag) is taken, one
    line says their completeness cannot be checked; without ``latest``, a clear error."""
    ckpts = tmp_path / "ck"
    fake_checkpoint(ckpts, "global_step3", 3, state="unrecorded")
    fake_checkpoint(ckpts, "global_step6", 6, state="unrecorded")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint to resume .*"
                       r"global_step3 \(unrecorded\).*give --load_checkpoint_tag"):
        resolve_checkpoint(str(ckpts))
    (ckpts / "latest").write_text("global_step6\n")
    with caplog.at_level(logging.INFO, logger="sparse_attn.launcher"):
        chosen = resolve_checkpoint(str(ckpts))
    assert chosen.tag == "global_step6" and chosen.layout is None
    assert len(launcher_lines(caplog)) == 1 and "cannot be checked" in caplog.text
    assert resolve_checkpoint(str(ckpts), "global_step3").state == "unrecorded"


# -- saving -----------------------------------------------------------------------------------
class FakeEngine:
    """What save_checkpoint uses of a DeepSpeed engine; its save checks the order."""

    global_rank = 0

    def __init__(self, steps):
        self.global_steps = steps
        self.saves = 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # ``latest`` is written after the marker, not by DeepSpeed
        path = os.path.join(save_dir, tag)
        with open(os.path.join(path, RECORD_NAME)) as f:
            assert json.load(f)["step"] == self.global_steps  # the record came first
        assert not os.path.exists(os.path.join(path, COMPLETE_NAME))  # no stale marker
        with open(os.path.join(path, MODEL_FILE), "wb") as f:
            f.write(b"w" * (1000 + self.global_steps))
        self.saves += 1


def test_save_marks_complete_after_the_files_and_latest_last(tmp_path):
    ckpts = str(tmp_path / "ck")
    run = make_run()
    seen = []

    def before_commit(path):  # files written, not marked, latest not moved yet
        seen.append((os.path.exists(os.path.join(path, COMPLETE_NAME)),
                     open(os.path.join(ckpts, "latest")).read()
                     if os.path.exists(os.path.join(ckpts, "latest")) else None))

    path = save_checkpoint(FakeEngine(4), ckpts, "step_4", run=run, before_commit=before_commit)
    path8 = save_checkpoint(FakeEngine(8), ckpts, "step_8", run=run,
                            before_commit=before_commit, extra={"note": "x"})
    assert seen == [(False, None), (False, "step_4")]
    with open(os.path.join(path8, COMPLETE_NAME)) as f:
        marker = json.load(f)
    assert marker["files"] == {MODEL_FILE: 1008, RECORD_NAME: os.path.getsize(
        os.path.join(path8, RECORD_NAME))}
    assert marker["layout"] == layout_record(run) and marker["note"] == "x"
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "step_8"
    assert resolve_checkpoint(ckpts).path == path8
    # saving the same tag again removes its old marker before any file is rewritten
    engine = FakeEngine(4)
    save_checkpoint(engine, ckpts, "step_4", run=run)
    assert engine.saves == 1 and os.path.isfile(os.path.join(path, COMPLETE_NAME))
    assert not [n for n in os.listdir(path) if ".tmp" in n]


def test_save_interrupted_before_the_marker_leaves_latest_alone(tmp_path):
    ckpts = str(tmp_path / "ck")
    run = make_run()
    save_checkpoint(FakeEngine(4), ckpts, "step_4", run=run)

    class Killed(Exception):
        pass

    def kill(path):
        raise Killed  # stands for the SIGKILL of the end-to-end test

    with pytest.raises(Killed):
        save_checkpoint(FakeEngine(8), ckpts, "step_8", run=run, before_commit=kill)
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "step_4"
    assert resolve_checkpoint(ckpts).tag == "step_4"
    with pytest.raises(CheckpointError, match="step_8 is incomplete"):
        resolve_checkpoint(ckpts, "step_8")
