"""scripts/dev/check_two_gpu_run.py, the checker of the multi-GPU example runs, on logs written
the way the example and the launcher write them."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location(
    "check_two_gpu_run", os.path.join(ROOT, "scripts", "dev", "check_two_gpu_run.py"))
checker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checker)


def rank_line(rank, world, checksum, kernel="off"):
    return (f"rank {rank}/{world}: sparse attention: mode bigbird, block 64, layout "
            f"{checksum}; transformer kernel {kernel}\n")


def write_run(tmp_path, name, checksums, losses, first_step=1, cross_rank=True, resumed=False,
              world=2):
    log = "".join(rank_line(r, world, c) for r, c in enumerate(checksums))
    if cross_rank:
        log += f"[sparse_attn.launcher] INFO: rank 0: ... (same on all {world} ranks)\n"
    if resumed:
        log += "resumed from /tmp/ckpt/step_3 at step 3\n"
    (tmp_path / f"{name}.log").write_text(log)
    rows = [json.dumps({"step": first_step + i, "loss": x}) for i, x in enumerate(losses)]
    (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return str(tmp_path / f"{name}.log"), str(tmp_path / f"{name}.jsonl")


FALLING = [9.5, 9.3, 9.0, 8.6, 8.2, 7.9, 7.5, 7.2]


def run(tmp_path, log, metrics, world, resumed=None):
    argv = ["--log", log, "--metrics", metrics, "--world", str(world),
            "--out", str(tmp_path / "summary.json")]
    if resumed:
        argv += ["--resumed-log", resumed[0], "--resumed-metrics", resumed[1]]
    code = checker.main(argv)
    with open(tmp_path / "summary.json") as f:
        return code, json.load(f)["checks"]


def test_passes_on_a_good_run_and_resume(tmp_path):
    log, metrics = write_run(tmp_path, "a", ["12x64x64:abc"] * 2, FALLING)
    resumed = write_run(tmp_path, "b", ["12x64x64:abc"] * 2, FALLING[3:5], first_step=4,
                        resumed=True)
    code, checks = run(tmp_path, log, metrics, 2, resumed)
    assert code == 0 and all(checks.values()), checks


@pytest.mark.parametrize("case, failing", [
    ("different layouts", "same layout on every rank"),
    ("missing rank", "every rank reported a layout"),
    ("no cross-rank comparison", "cross-rank comparison ran"),
    ("loss flat", "loss falls"),
    ("resume differs", "resumed losses match"),
])
def test_fails_naming_the_check(tmp_path, case, failing):
    sums = {"different layouts": ["4x8x8:aaa", "4x8x8:bbb"],
            "missing rank": ["4x8x8:aaa"]}.get(case, ["4x8x8:aaa"] * 2)
    losses = [9.0] * 8 if case == "loss flat" else FALLING
    log, metrics = write_run(tmp_path, "a", sums, losses,
                             cross_rank=case != "no cross-rank comparison")
    resumed = None
    if case == "resume differs":
        resumed = write_run(tmp_path, "b", sums, [x + 0.5 for x in FALLING[3:5]], first_step=4,
                            resumed=True)
    code, checks = run(tmp_path, log, metrics, 2, resumed)
    assert code == 1
    assert [name for name, ok in checks.items() if not ok] == [failing]
