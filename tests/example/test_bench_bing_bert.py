"""``scripts/bench_bing_bert.py``: its harness on the tiny model (CPU, micro-batches 1 and 2,
one variant made to run out of memory at 2) writes every row to its JSON and Markdown (it
measures; no speed is asserted); and its pieces: the variants' layouts, the attention-kernel
names ``--profile`` looks for, the error without DeepSpeed, and the README renderer of its
record."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
BENCH = os.path.join(SCRIPTS, "bench_bing_bert.py")

import bench_bing_bert as bbb  # noqa: E402

SEQ = 256  # BigBird 64 with 3 random blocks needs 4 blocks
VARIANTS = ("dense", "fixed16", "bigbird64")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("bench_bing_bert") / "tiny.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT,
               **{bbb.FAULT_OOM: "fixed16:2"})
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, BENCH, "--tiny", "--device", "cpu", "--lamb", "torch", "--seqs",
         str(SEQ), "--max_batch", "2", "--warmup", "0", "--steps", "1", "--rounds", "1",
         "--profile", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(out) as f:
        return json.load(f), out, proc.stdout


def test_every_row_is_written(record):
    data, _, _ = record
    assert data["benchmark"] == "bing_bert"
    assert {"device", "torch", "deepspeed", "commit"} <= set(data["env"])
    assert data["date"] and "scripts/bench_bing_bert.py --tiny" in data["command"]
    assert data["conditions"] and data["complete"] and data["skipped_settings"] == []
    rows = {(r["variant"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(v, b) for v in VARIANTS for b in (1, 2)}
    failed = rows.pop(("fixed16", 2))
    assert failed["status"] == "oom" and bbb.FAULT_OOM in failed["error"]
    for (variant, batch), r in rows.items():
        assert r["status"] == "ok", r
        assert r["model"] == "tiny" and r["seq"] == SEQ
        assert r["tokens_per_step"] == batch * SEQ
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["optimizer"] == "Lamb"  # the shipped config's LAMB (the PyTorch one on CPU)
        assert r["describe"].startswith("dense" if variant == "dense" else "sparse")
        assert {"attention_ms", "other_ms", "non_attention_ms"} <= set(r["profile"])
        assert r["allocator"] is None  # the CUDA caching allocator's counters: GPU only
        if variant != "dense":
            assert r["x_dense"] > 0 and r["non_attention_vs_dense"] > 0
    assert "mode fixed, block 16" in rows[("fixed16", 1)]["describe"]
    assert "mode bigbird, block 64" in rows[("bigbird64", 1)]["describe"]
    # the dense kernel is found by name on CPU too (the sparse backend has no op of its own)
    assert rows[("dense", 1)]["profile"]["attention_ms"] > 0


def test_summary_best_batch_and_ratio(record):
    data, _, out = record
    summary = {s["variant"]: s for s in data["summary"]}
    assert list(summary) == list(VARIANTS)
    for variant, s in summary.items():
        assert s["best_batch"] in (1, 2) and s["best_tokens_per_s"] > 0
        if variant != "dense":
            assert s["x_dense"] > 0
    assert summary["fixed16"]["max_batch"] == 1
    assert summary["fixed16"]["stopped_at"]["status"] == "oom"
    assert summary["fixed16"]["stopped_at"]["batch"] == 2
    assert summary["dense"]["max_batch"] == summary["bigbird64"]["max_batch"] == 2
    assert "best" in out and "tokens/s" in out


def test_markdown_and_readme_table(record):
    import render_results

    data, path, _ = record
    with open(os.path.splitext(path)[0] + ".md") as f:
        md = f.read()
    assert data["command"] in md and data["env"]["device"] in md
    assert "| model | seq | variant | best tokens/s |" in md
    assert "| tiny | 256 | tutorial Fixed 16 |" in md and "oom at 2" in md
    assert "| tiny | 256 | 2 | fixed16 | - | - | - | - | - | oom" in md
    assert "Profile (cpu ops" in md
    table = render_results.bing_bert_table([("eager", data, "bing_bert_test.json")])
    assert table[2] == "| model | seq | mode | dense SDPA | tutorial Fixed 16 | BigBird 64 |"
    assert table[4].startswith("| tiny | 256 | eager | ") and "x" in table[4]
    assert render_results.main(["--bing-bert", str(path)]) == 0


def test_variants_are_the_tutorial_fixed_and_the_shipped_bigbird():
    from bench_bert_training import sparsity_config
    from sparse_attn.config import parse_sparse_attention

    for heads in (12, 16):
        ours = parse_sparse_attention(bbb.VARIANTS["fixed16"]).build(heads).make_layout(2048)
        theirs = sparsity_config("sparse_fixed", heads, 16).make_layout(2048)
        assert (ours == theirs).all()
    for model in ("base", "large"):
        with open(bbb.MODELS[model][1]) as f:
            assert json.load(f)["sparse_attention"] == bbb.VARIANTS["bigbird64"]


def test_attention_kernels_by_name():
    names = bbb.sparse_kernel_names()
    assert {"fused_attn_fwd_kernel", "fused_attn_bwd_dq_kernel",
            "fused_attn_bwd_dkdv_kernel"} <= set(names)
    for name, kind in [
            ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "dense"),
            ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "dense"),
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "dense"),
            ("fused_attn_fwd_kernel", "sparse"), ("fused_attn_bwd_dkdv_kernel", "sparse"),
            ("_dsd_kernel", "sparse"),
            ("triton_per_fused_add_native_layer_norm_0", None),
            ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", None),
            ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernel>",
             None)]:
        assert bbb.attention_kind(name, names) == kind, name


def test_clear_error_without_deepspeed(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert bbb.main(["--tiny"]) == 2
    assert "needs DeepSpeed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max_batch", "0"], "--max_batch 0"),
    (["--tiled_mlp", "0"], "--tiled_mlp 0"),
    (["--seqs", "512", "-4"], "--seqs -4"),
    (["--time_budget", "0"], "--time_budget 0"),
])
def test_bad_values_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        bbb.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [(), ("--no_fused_norm",), ("--no_fused_loss",),
                                   ("--no_fused_norm", "--no_fused_loss")])
def test_example_kernel_flags_reach_every_variant_and_the_conditions(tmp_path, flags):
    opts = bbb.parse_args(["--tiny", "--device", "cpu", *flags])
    for variant in VARIANTS:
        argv = bbb.example_argv(opts, "tiny", variant, SEQ, "ds.json", str(tmp_path))
        for flag in ("--no_fused_norm", "--no_fused_loss"):
            assert (flag in argv) == (flag in flags)
    for flag, text in (("--no_fused_norm", "plain modules (--no_fused_norm)"),
                       ("--no_fused_loss", "float32 logits (--no_fused_loss)")):
        assert (text in bbb.conditions(opts)[0]) == (flag in flags)


def test_allocator_counts_are_differences_of_the_cuda_counters():
    assert bbb.allocator_counts(torch.device("cpu")) is None
    before = {"retries": 1, "device_allocs": 10, "device_frees": 2}
    after = {"retries": 1, "device_allocs": 14, "device_frees": 5}
    assert bbb.counts_between(before, after) == {"retries": 0, "device_allocs": 4,
                                                 "device_frees": 3}
    assert bbb.counts_between(None, after) is None
    assert set(bbb.ALLOCATOR_COUNTERS.values()) == set(after)


def test_autocast_replaces_the_config_bf16_with_deepspeed_torch_autocast(tmp_path, capsys):
    opts = bbb.parse_args(["--tiny", "--device", "cpu", "--autocast"])
    with open(bbb.variant_ds_config(opts, "tiny", "bigbird64", str(tmp_path))) as f:
        cfg = json.load(f)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["sparse_attention"]["mode"] == "bigbird"
    assert not opts.fp32 and "torch_autocast" in bbb.conditions(opts)[0]
    with pytest.raises(SystemExit):
        bbb.parse_args(["--autocast", "--fp32"])
    assert "--autocast and --fp32" in capsys.readouterr().err


def test_sync_site_charges_the_innermost_frame_outside_torch_and_the_script():
    import traceback

    frame = traceback.FrameSummary
    stack = [frame(os.path.join(ROOT, "examples", "bing_bert", "deepspeed_train.py"), 10, "main"),
             frame("/x/site-packages/deepspeed/runtime/utils.py", 292, "has_overflow_serial"),
             frame("/x/site-packages/torch/_tensor.py", 40, "__bool__"),
             frame(bbb.__file__, 5, "record"),
             frame("/usr/lib/python3.11/warnings.py", 1, "warn")]
    assert bbb.sync_site(stack) == "deepspeed/runtime/utils.py:292 has_overflow_serial"
    assert bbb.sync_site(stack[:1]) == "examples/bing_bert/deepspeed_train.py:10 main"
    assert bbb.sync_site(stack[2:]) == "torch"
    assert bbb.sync_text(None) == "-" and bbb.sync_text({}) == "0"
    assert bbb.sync_text({"a.py:1 f": 3, "b.py:2 g": 1}) == "4; `a.py:1 f` (3)"


def test_gpu_idle_by_phase_splits_gaps_by_the_host_phase_running():
    # kernels on two streams overlap (no gap); gaps begin in each phase and after them
    kernels = [(0, 10), (5, 12), (15, 20), (20, 30), (40, 45), (47, 50), (70, 80)]
    phases = [("forward", 0, 14), ("backward", 14, 35), ("step", 44, 49)]
    idle = bbb.gpu_idle_by_phase(kernels, phases)
    assert idle == {"forward": 3, "backward": 10, "step": 2, "other": 20}
    assert bbb.gpu_idle_by_phase([], phases) == {}
    assert bbb.gpu_idle_by_phase([(0, 5), (1, 2)], phases) == {}


@pytest.mark.parametrize("sync", [False, True], ids=["host_positions", "sync_positions"])
def test_batches_carry_the_masked_positions_unless_sync_positions(sync):
    """By default the benchmark's batches carry ``masked_positions`` found on the host, as
    the example's own batches do; ``--sync_positions`` leaves them to the model (a sync)."""
    pytest.importorskip("deepspeed")
    _, modeling = bbb.load_example()
    opts = bbb.parse_args(["--tiny", "--device", "cpu"] + (["--sync_positions"] if sync else []))
    batch = bbb.make_batch(2, 40, 100, "cpu", 3,
                           None if opts.sync_positions else modeling.masked_positions)
    labels = batch["masked_lm_labels"].reshape(-1)
    assert (labels != -100).sum() == 2 * round(bbb.MASKED_FRACTION * 40)
    if sync:
        assert "masked_positions" not in batch and "a host sync" in bbb.conditions(opts)[1]
    else:
        assert batch["masked_positions"].tolist() == (labels != -100).nonzero()[:, 0].tolist()
        assert "found on the host" in bbb.conditions(opts)[1]


def test_trace_gaps_names_the_wait_and_the_launch(tmp_path):
    """``scripts/dev/trace_gaps.py`` on a made-up trace: two kernels, a gap while the host
    synchronizes in the forward, one while it launches in the step; each gap's host call, the
    op that launched the next kernel and the phase are reported."""
    sys.path.insert(0, os.path.join(SCRIPTS, "dev"))
    import trace_gaps

    def x(cat, name, ts, dur, tid=1, corr=None):
        e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
        if corr is not None:
            e["args"] = {"correlation": corr}
        return e

    events = [
        x("user_annotation", bbb.PHASE_PREFIX + "forward", 0, 65),
        x("user_annotation", bbb.PHASE_PREFIX + "step", 65, 135),
        x("cpu_op", "aten::mm", 0, 5), x("cuda_runtime", "cudaLaunchKernel", 1, 2, corr=1),
        x("kernel", "gemm", 10, 30, tid=7, corr=1),
        x("cpu_op", "aten::nonzero", 20, 40),
        x("cuda_runtime", "cudaStreamSynchronize", 25, 30),
        x("cpu_op", "aten::index_select", 56, 4),
        x("cuda_runtime", "cudaLaunchKernel", 57, 2, corr=2),
        x("kernel", "gather", 60, 10, tid=7, corr=2),
        x("cpu_op", "aten::_foreach_mul_", 150, 10),
        x("cuda_runtime", "cudaLaunchKernel", 155, 2, corr=3),
        x("kernel", "multi_tensor_apply_kernel", 158, 5, tid=7, corr=3),
    ]
    path = tmp_path / "t.json.gz"
    import gzip
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    gaps = trace_gaps.find_gaps(trace_gaps.load(str(path)))
    assert [(g.start, g.length, g.phase, g.host_call, g.next_kernel, g.launched_by)
            for g in gaps] == [
        (40, 20, "forward", "cudaStreamSynchronize", "gather", "aten::index_select"),
        (70, 88, "step", "", "multi_tensor_apply_kernel", "aten::_foreach_mul_")]
    assert gaps[0].host_ops == ["aten::nonzero"]
    assert trace_gaps.summarize(gaps, lambda g: g.phase) == [("step", 88, 1), ("forward", 20, 1)]
    assert trace_gaps.main([str(path), "--min-us", "50"]) == 0


def test_trace_gaps_busy_time_is_the_union_of_the_gpu_spans():
    sys.path.insert(0, os.path.join(SCRIPTS, "dev"))
    import trace_gaps

    spans = [trace_gaps.Span(*t, "k") for t in ((0, 10), (5, 12), (15, 20), (18, 19), (30, 31))]
    assert trace_gaps.busy_time(spans) == 12 + 5 + 1
    assert trace_gaps.busy_time([]) == 0.0
