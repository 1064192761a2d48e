"""SequenceParallelSparseAttention under DeepSpeed Ulysses on 2 and 4 gloo ranks (CPU) against
the single-process module and the float64 dense oracle.

Each world runs once (``ulysses_worker.py``, one process per rank, as the deepspeed launcher
starts them); the tests compare what the ranks recorded. Data and layouts come from
``ulysses_cases.py``; the sequence is split into contiguous shards in group-rank order.
"""
import functools
import os
import socket
import subprocess
import sys

import pytest
import torch

import ulysses_cases as uc
from reference import assert_rel_close, reference_attention

from sparse_attn.sequence_parallel import SequenceParallelSparseAttention
from sparse_attn.sparse_self_attention import SparseSelfAttention

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# (world size, split of the world into sequence groups)
SPLITS = [(2, "sp2"), (4, "sp4"), (4, "sp2x2")]
GROUPS = {"sp2": [[0, 1]], "sp4": [[0, 1, 2, 3]], "sp2x2": [[0, 1], [2, 3]]}
ROUND_OFF = 1e-6  # relative: the sharded run and the single-process run differ by round-off


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def run_world(world: int, tmp_root: str, worker: str = "ulysses_worker.py",
              args: tuple = ()) -> list:
    """Start ``world`` rank processes of ``worker`` (a script beside this file, called with
    an output folder and ``args``); return each rank's record, ``rank{r}.pt``."""
    name = "_".join([os.path.splitext(worker)[0], f"world{world}", *map(str, args)])
    out_dir = os.path.join(tmp_root, name)
    os.makedirs(out_dir, exist_ok=True)
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, worker), out_dir, *map(str, args)], cwd=HERE,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"world {world}: ranks did not finish in 240 s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"world {world} rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ulysses"))
    return lambda world: run_world(world, root)


def _gathered(records, split, case, ranks_of_group):
    """The full-sequence out, dq, dk, dv of one group: its ranks' shards concatenated."""
    parts = [records[r]["cases"][(split, case)] for r in ranks_of_group]
    return {name: torch.cat([p[name] for p in parts], dim=2) for name in ("out", "dq", "dk", "dv")}


def _single_process(case, seed):
    """The same module with P = 1 (no process group) on the full sequence, and its inputs."""
    config_name, mode = uc.CASES[case]
    module = SequenceParallelSparseAttention(uc.CONFIGS[config_name](), None, 1,
                                             key_padding_mask_mode=mode,
                                             max_seq_length=uc.MAX_SEQ)
    q, k, v, grad, mask = uc.make_data(case, seed)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, key_padding_mask=mask, attn_mask=uc.make_attn_mask(case, seed))
    out.backward(grad)
    return module, (q, k, v, grad, mask), {"out": out.detach(), "dq": q.grad, "dk": k.grad,
                                           "dv": v.grad}


@pytest.mark.parametrize("case", sorted(uc.CASES))
@pytest.mark.parametrize("world,split", SPLITS)
def test_sharded_run_matches_single_process_and_oracle(ranks, world, split, case):
    records = ranks(world)
    for index, members in enumerate(GROUPS[split]):
        got = _gathered(records, split, case, members)
        module, (q, k, v, grad, mask), single = _single_process(case, seed=100 + index)
        for name in got:
            err = ((got[name] - single[name]).norm() / single[name].norm()).item()
            assert err <= ROUND_OFF, f"group {members} {name}: relative error {err:.2e}"
        # Independently of the module: the float64 dense oracle on the full layout.
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        attn_mask = uc.make_attn_mask(case, seed=100 + index)
        if attn_mask is not None:
            attn_mask = uc.additive(attn_mask, "mul")
        ref = reference_attention(q64, k64, v64, module.get_layout(uc.SEQ), uc.BLOCK,
                                  causal=module.local_attention.causal,
                                  key_padding_mask=uc.additive(mask, uc.CASES[case][1]),
                                  attn_mask=attn_mask)
        ref.backward(grad.double())
        assert_rel_close(got["out"], ref, torch.float32)
        for name, t in (("dq", q64), ("dk", k64), ("dv", v64)):
            assert_rel_close(got[name], t.grad, torch.float32, factor=2)


@pytest.mark.parametrize("case", sorted(uc.CASES))
@pytest.mark.parametrize("world,split", SPLITS)
def test_each_rank_runs_its_head_slice(ranks, world, split, case):
    records = ranks(world)
    config_name = uc.CASES[case][0]
    full = SparseSelfAttention(uc.CONFIGS[config_name](), max_seq_length=uc.MAX_SEQ) \
        .get_layout(uc.SEQ)
    for members in GROUPS[split]:
        p = len(members)
        slices = []
        for r, rank in enumerate(members):
            rec = records[rank]["cases"][(split, case)]
            h = uc.HEADS // p
            assert rec["heads"] == (r * h, (r + 1) * h)
            assert torch.equal(rec["layout"], full[r * h:(r + 1) * h])
            slices.append(rec["layout"])
        if config_name.endswith("perhead"):  # else a wrong slice could not be seen
            assert any(not torch.equal(slices[0], s) for s in slices[1:])


@pytest.mark.parametrize("world", [2, 4])
def test_errors_that_need_a_group(ranks, world):
    for rank, rec in enumerate(ranks(world)):
        errors = rec["errors"]
        wrong_p = 4 if world == 2 else 2
        assert errors["group_size"] == ("ValueError", (
            f"sequence_parallel_size is {wrong_p} but the sequence process group has {world} "
            f"ranks; they must be equal")), rank
        kind, text = errors["seq_multiple"]
        assert kind == "ValueError" and f"full sequence of {8 * world} tokens" in text
        assert f"{world} * {uc.BLOCK} = {world * uc.BLOCK}" in text
        assert f"pad the full sequence to {world * uc.BLOCK} tokens" in text
        kind, text = errors["mask_shard"]
        assert kind == "ValueError" and f"full sequence of {uc.SEQ} tokens" in text
        kind, text = errors["layout_mismatch"]
        assert kind == "RuntimeError" and "different sparse attention layouts" in text


@pytest.mark.parametrize("heads,p", [(4, 3), (6, 4), (12, 8)])
def test_heads_not_divisible(heads, p):
    config = uc.FixedSparsityConfig(heads, uc.BLOCK)
    with pytest.raises(ValueError, match=rf"num_heads {heads} is not divisible by "
                                         rf"sequence_parallel_size {p}"):
        SequenceParallelSparseAttention(config, None, p)


@pytest.mark.parametrize("p", [2, 4])
def test_parallel_size_without_group(p):
    with pytest.raises(ValueError, match=rf"sequence_parallel_size {p} needs a sequence process "
                                         rf"group of {p} ranks, got sequence_process_group=None"):
        SequenceParallelSparseAttention(uc.CONFIGS["fixed_perhead"](), None, p)


@pytest.mark.parametrize("p", [0, -1, 1.0, True])
def test_bad_parallel_size(p):
    with pytest.raises(ValueError, match="sequence_parallel_size must be an integer >= 1"):
        SequenceParallelSparseAttention(uc.CONFIGS["fixed_perhead"](), None, p)


@pytest.mark.parametrize("case", sorted(uc.CASES))
def test_p1_is_sparse_self_attention(case):
    """P = 1 is today's path: the same module, no exchange, bit for bit."""
    _, (q, k, v, _, mask), single = _single_process(case, seed=7)
    config_name, mode = uc.CASES[case]
    want = SparseSelfAttention(uc.CONFIGS[config_name](), key_padding_mask_mode=mode,
                               max_seq_length=uc.MAX_SEQ)(
        q, k, v, key_padding_mask=mask, attn_mask=uc.make_attn_mask(case, seed=7))
    assert torch.equal(single["out"], want)
    module = SequenceParallelSparseAttention(uc.CONFIGS[config_name](), None, 1)
    assert module.distributed_attention is None
    assert type(module.local_attention) is SparseSelfAttention
