"""One rank of the transformers Ulysses tests: ``python hf_ulysses_worker.py OUT_DIR P`` with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (as the deepspeed launcher sets them).

Joins a gloo world through ``deepspeed.comm``; sequence parallelism over groups of ``P``
consecutive ranks (``WORLD_SIZE / P`` data-parallel replicas) through
``sparse_attn.hf.enable_sequence_parallel`` (DeepSpeed's ``register_with_transformers``
inside). For each case of ``hf_ulysses_cases.CASES``: a fresh
tiny BertForMaskedLM, forward and backward on this rank's shard of the case's batch, recording
the logits shard, the loss part and the parameter gradients (parts: the pytest side adds them
up over the ranks). Then a few training steps through ``deepspeed.initialize`` (ZeRO 0, fp32,
gloo) fed by ``sequence_parallel_dataloader``, recording the sequence loss of each step, with a
checkpoint that a fresh engine resumes from; then the errors that need a process group. Writes ``OUT_DIR/rank{RANK}.pt``.
"""
import os
import sys
import traceback

import torch

import hf_ulysses_cases as hc
from ulysses_worker import record_error


def shard(t, rank, p):
    """Rank ``rank``'s contiguous part of ``[batch, seq]`` ``t`` (None stays None)."""
    if t is None:
        return None
    part = t.shape[1] // p
    return t[:, rank * part:(rank + 1) * part].contiguous()


def run_case(family, layout, padded, rank, p, checkpointing=False):
    """``rank``: this rank's place in its sequence group of ``p``."""
    import sparse_attn.hf as sahf

    model = hc.make_model(layout, family=family)
    if checkpointing:  # the backward pass replays the layers with the kwargs they were given
        model.activation_checkpointing_enable({"use_reentrant": False})
    mpu = sahf.enable_sequence_parallel(model, p, hc.BATCH)
    assert mpu.get_sequence_parallel_rank() == rank
    ids, mask, labels = hc.make_batch(seed=10 + padded, padded=padded,
                                      pad_id=hc.FAMILIES[family][1])
    positions = sahf.sequence_position_ids(model, ids)  # the full sequence's, then sharded
    model.train()
    out = model(input_ids=shard(ids, rank, p), attention_mask=shard(mask, rank, p),
                position_ids=shard(positions, rank, p))
    loss = sahf.sequence_parallel_loss_part(out.logits, shard(labels, rank, p))
    loss.backward()
    return {"logits": out.logits.detach(), "loss_part": loss.item(),
            "grads": {n: t.grad.clone() for n, t in model.named_parameters()
                      if t.grad is not None}}


def _engine(rank, p):
    """A fresh model made sequence-parallel, in DeepSpeed's engine (ZeRO 0, fp32)."""
    import deepspeed

    import sparse_attn.hf as sahf

    model = hc.make_model(hc.TRAIN_LAYOUT)
    mpu = sahf.enable_sequence_parallel(model, p, hc.BATCH)
    assert mpu.get_sequence_parallel_rank() == rank % p
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=hc.make_optimizer(model.parameters()), mpu=mpu,
        config={"train_micro_batch_size_per_gpu": hc.BATCH, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 0}, "gradient_clipping": hc.GRAD_CLIP,
                "steps_per_print": 10 ** 6})
    return engine, model, mpu


def _steps(engine, model, mpu, rank, p, first=0):
    """Training steps ``first .. TRAIN_STEPS - 1`` on this rank's loader (the earlier steps'
    batches are drawn and skipped, on every rank alike); their sequence losses and the
    shapes of the batches."""
    import deepspeed.comm as dist

    import sparse_attn.hf as sahf

    rounds = -(-hc.TRAIN_STEPS // p)
    loader = [hc.train_batch(rank, r) for r in range(rounds)]  # this rank's own batches
    batches = sahf.sequence_parallel_dataloader(loader, model)
    assert len(batches) == rounds * p
    losses, shapes = [], []
    for step, batch in zip(range(hc.TRAIN_STEPS), batches):
        if step < first:
            continue
        labels = batch.pop("labels")
        shapes.append({k: tuple(v.shape) for k, v in batch.items()})
        logits = engine(**batch).logits
        loss = sahf.sequence_parallel_loss_part(logits, labels)
        engine.backward(loss)
        engine.step()
        whole = loss.detach().clone()
        dist.all_reduce(whole, group=mpu.get_sequence_parallel_group())
        losses.append(whole.item())
        if step + 1 == hc.SAVE_AFTER and first == 0:
            engine.save_checkpoint(os.path.join(_OUT_DIR, "checkpoints"), tag="saved")
    return losses, shapes


def train(rank, p):
    """``rank``: the global rank; each rank's loader yields its own batches. Then a fresh
    engine resumes from the checkpoint saved after ``SAVE_AFTER`` steps."""
    engine, model, mpu = _engine(rank, p)
    losses, shapes = _steps(engine, model, mpu, rank, p)
    engine, model, mpu = _engine(rank, p)
    engine.load_checkpoint(os.path.join(_OUT_DIR, "checkpoints"), tag="saved")
    resumed, _ = _steps(engine, model, mpu, rank, p, first=hc.SAVE_AFTER)
    return {"losses": losses, "resumed": resumed, "shapes": shapes,
            "engine_sp": getattr(engine, "sequence_parallel_size", None)}


def errors(rank, p, world):
    import sparse_attn.hf as sahf
    from sparse_attn.sparsity_config import BigBirdSparsityConfig

    out = {}
    model = hc.make_model("fixed")
    sahf.enable_sequence_parallel(model, p, hc.BATCH)
    rank = rank % p  # in the group
    ids, _, labels = hc.make_batch(seed=7, padded=False)
    pos = torch.arange(hc.SEQ).expand(hc.BATCH, hc.SEQ)
    short = slice(0, 8)  # P shards of 8 tokens: not a multiple of P * block
    out["seq_multiple"] = record_error(
        lambda: model(input_ids=ids[:, short], position_ids=pos[:, short]))
    out["no_position_ids"] = record_error(lambda: model(input_ids=shard(ids, rank, p)))
    out["labels"] = record_error(
        lambda: model(input_ids=shard(ids, rank, p), position_ids=shard(pos, rank, p),
                      labels=shard(labels, rank, p)))
    out["batch_size"] = record_error(
        lambda: model(input_ids=shard(ids, rank, p)[:1], position_ids=shard(pos, rank, p)[:1]))
    out["other_sizes"] = record_error(
        lambda: sahf.enable_sequence_parallel(hc.make_model("fixed"), p, hc.BATCH + 1))
    # 8 heads divide 2 * world; the world of `world` ranks does not.
    out["no_group_of_p"] = record_error(
        lambda: sahf.enable_sequence_parallel(hc.make_model("fixed", heads=8), 2 * world,
                                              hc.BATCH))
    # A layout that differs by rank (another seed) must be refused on every rank.
    odd = hc.make_model("fixed")
    sahf.enable_sparse_attention(odd, BigBirdSparsityConfig(
        hc.HEADS, hc.BLOCK, different_layout_per_head=True, num_random_blocks=2, seed=rank),
        max_seq_length=hc.MAX_SEQ)
    out["layout_mismatch"] = record_error(lambda: sahf.enable_sequence_parallel(odd, p, hc.BATCH))
    return out


_OUT_DIR = None


def main(out_dir, p):
    global _OUT_DIR
    _OUT_DIR = out_dir
    import deepspeed.comm as dist

    from launcher import avoid_cpu_op_builds

    avoid_cpu_op_builds()  # plain gloo collectives, no C++ build of DeepSpeed's shm op
    dist.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world, "p": p, "cases": {}}
    for case in hc.CASES:
        results["cases"][case] = run_case(*case, rank % p, p)
    results["checkpointed"] = run_case(*hc.CHECKPOINTED_CASE, rank % p, p, checkpointing=True)
    # A model on plain "block_sparse" in the same process is untouched by Ulysses' wrapper.
    plain = hc.make_model("fixed")
    ids, mask, _ = hc.make_batch(seed=11, padded=True)
    with torch.no_grad():
        results["plain_logits"] = plain(input_ids=ids, attention_mask=mask).logits
    results["train"] = train(rank, p)
    results["errors"] = errors(rank, p, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
