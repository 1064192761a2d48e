"""One rank of the Ulysses tests: ``python ulysses_worker.py OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (as the deepspeed launcher sets them).

Joins a gloo world through ``deepspeed.comm``, then for each split of the world into sequence
groups and each case of ``ulysses_cases.CASES`` runs ``SequenceParallelSparseAttention``
forward and backward on its shard of the case's data (the full key padding mask gathered from
the ranks' mask shards), and records its output and gradient shards, its head slice and
layout; then provokes the errors that need a process group. Writes everything to
``OUT_DIR/rank{RANK}.pt``; the pytest side compares.
"""
import os
import sys
import traceback

import torch

import ulysses_cases as uc


def group_splits(world: int):
    """name -> list of rank lists; every rank builds every group, in this order."""
    splits = {f"sp{world}": [list(range(world))]}
    if world == 4:
        splits["sp2x2"] = [[0, 1], [2, 3]]  # two sequence groups side by side (data parallel)
    return splits


def run_case(module, case, seed, rank_in_group, p, group):
    from sparse_attn.sequence_parallel import gather_sequence_shards

    q, k, v, grad, mask = uc.make_data(case, seed)
    s = uc.SEQ // p
    part = slice(rank_in_group * s, (rank_in_group + 1) * s)
    q, k, v = (t[:, :, part].clone().requires_grad_() for t in (q, k, v))
    # What a loader that hands out mask shards does once per step: gather the full mask.
    mask = gather_sequence_shards(mask[..., part].contiguous(), group)
    out = module(q, k, v, key_padding_mask=mask, attn_mask=uc.make_attn_mask(case, seed))
    out.backward(grad[:, :, part])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "layout": module.get_layout(uc.SEQ).clone(), "heads": (module.head_start,
                                                                   module.head_stop)}


def record_error(fn):
    try:
        fn()
    except Exception as err:  # the pytest side checks type and message
        return (type(err).__name__, str(err))
    return None


def main(out_dir):
    import deepspeed.comm as dist
    from sparse_attn.sequence_parallel import SequenceParallelSparseAttention as SPSA
    from sparse_attn.sparsity_config import BigBirdSparsityConfig

    from launcher import avoid_cpu_op_builds

    avoid_cpu_op_builds()  # plain gloo collectives, no C++ build of DeepSpeed's shm op
    dist.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)  # the data must not depend on the global generator
    results = {"world": world, "cases": {}, "errors": {}}
    for split, groups in group_splits(world).items():
        handles = [dist.new_group(ranks) for ranks in groups]
        index = next(i for i, ranks in enumerate(groups) if rank in ranks)
        group, p = handles[index], len(groups[index])
        for case, (config_name, mode) in uc.CASES.items():
            module = SPSA(uc.CONFIGS[config_name](), group, p, key_padding_mask_mode=mode,
                          max_seq_length=uc.MAX_SEQ)
            res = run_case(module, case, seed=100 + index, rank_in_group=groups[index].index(rank),
                           p=p, group=group)
            res.update(group_index=index, rank_in_group=groups[index].index(rank), p=p)
            results["cases"][(split, case)] = res

    world_group = dist.new_group(list(range(world)))
    config = uc.CONFIGS["fixed_perhead"]
    wrong_p = 4 if world == 2 else 2
    results["errors"]["group_size"] = record_error(
        lambda: SPSA(config(), world_group, wrong_p, max_seq_length=uc.MAX_SEQ))
    module = SPSA(config(), world_group, world, max_seq_length=uc.MAX_SEQ)
    short = torch.randn(uc.BATCH, uc.HEADS, 8, uc.HEAD_DIM)  # world * 8 tokens
    results["errors"]["seq_multiple"] = record_error(lambda: module(short, short, short))
    shard = torch.randn(uc.BATCH, uc.HEADS, uc.SEQ // world, uc.HEAD_DIM)
    results["errors"]["mask_shard"] = record_error(
        lambda: module(shard, shard, shard,
                       key_padding_mask=torch.zeros(uc.BATCH, uc.SEQ // world)))
    # A layout that differs by rank (another seed) must be refused on every rank.
    results["errors"]["layout_mismatch"] = record_error(
        lambda: SPSA(BigBirdSparsityConfig(uc.HEADS, uc.BLOCK, different_layout_per_head=True,
                                           num_random_blocks=2, seed=rank),
                     world_group, world, max_seq_length=uc.MAX_SEQ))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
