"""The cases of the transformers Ulysses tests, shared by the rank processes
(``hf_ulysses_worker.py``) and the pytest side that runs the single-process model: the tiny
BertForMaskedLM, its layouts, the batches and the training run."""
import torch

from sparse_attn.sparsity_config import BigBirdSparsityConfig, FixedSparsityConfig

HEADS, HIDDEN, LAYERS, VOCAB, BLOCK = 4, 64, 2, 96, 16
MAX_SEQ = 256  # the layout is built here; shorter sequences use its top-left corner
SEQ, BATCH = 128, 2  # forward/backward cases: 128 = a multiple of P * block for P = 2, 4
TRAIN_SEQ, TRAIN_STEPS = 100, 4  # 100: the loader pads to a multiple of P * block
SAVE_AFTER = 2  # a checkpoint after this many steps; a fresh engine resumes from it
GRAD_CLIP = 1.0  # DeepSpeed's default; the global norm must be that of the summed gradients

# Per-head layouts (different_layout_per_head=True): a rank on the wrong heads would differ.
LAYOUTS = {
    "fixed": lambda: FixedSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_local_blocks=2,
        num_different_global_patterns=2),
    "bigbird": lambda: BigBirdSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_random_blocks=1, seed=3),
    "unidirectional": lambda: FixedSparsityConfig(
        HEADS, BLOCK, different_layout_per_head=True, num_local_blocks=2,
        num_different_global_patterns=2, attention="unidirectional"),
}
# family -> (config class, pad token id, extra position rows)
FAMILIES = {"bert": ("BertConfig", 0, 0), "roberta": ("RobertaConfig", 1, 2)}
# (family, layout, padded); RoBERTa numbers positions from its padding index + 1.
CASES = [("bert", layout, padded) for layout in LAYOUTS for padded in (False, True)]
CASES.append(("roberta", "bigbird", True))
# Layer 0 sparse, layer 1 dense (SDPA on the rank's heads, with the gathered mask).
CASES.append(("bert", "fixed@layer0", True))
CHECKPOINTED_CASE = ("bert", "bigbird", True)  # run again with gradient checkpointing
TRAIN_LAYOUT = "bigbird"


def make_model(layout: str, heads: int = HEADS, family: str = "bert"):
    """The tiny masked LM, the same weights in every process (seed 0), block-sparse with
    ``layout`` (``"name@layerN"``: in layer N only). No dropout: the sharded and single-process runs draw no random numbers."""
    import transformers

    import sparse_attn.hf as sahf

    config_cls, pad, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=heads, intermediate_size=2 * HIDDEN,
        max_position_embeddings=MAX_SEQ + extra, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=pad)
    torch.manual_seed(0)
    prefix = "Bert" if family == "bert" else "Roberta"
    model = getattr(transformers, prefix + "ForMaskedLM")(config)
    layout, _, only = layout.partition("@layer")  # "fixed@layer0": only layer 0 is sparse
    if heads == HEADS:
        sparsity = LAYOUTS[layout]()
    else:
        sparsity = FixedSparsityConfig(heads, BLOCK)
    return sahf.enable_sparse_attention(model, sparsity, max_seq_length=MAX_SEQ,
                                        layers=[int(only)] if only else None)


def make_batch(seed: int, seq: int = SEQ, padded: bool = True, pad_id: int = 0):
    """``input_ids``, ``attention_mask`` (None unless padded) and masked-LM ``labels`` (-100
    where no loss is taken), ``[BATCH, seq]`` int64. Padded: sequence b ends in
    ``7 + 23 * b`` padding tokens (``pad_id``, mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, seq), generator=g)
    labels = torch.where(torch.rand(BATCH, seq, generator=g) < 0.3, ids,
                         torch.full_like(ids, -100))
    mask = None
    if padded:
        mask = torch.ones(BATCH, seq, dtype=torch.long)
        for b in range(BATCH):
            n = 7 + 23 * b
            ids[b, seq - n:], mask[b, seq - n:], labels[b, seq - n:] = pad_id, 0, -100
    return ids, mask, labels


def make_optimizer(params):
    """SGD with momentum: its updates are linear in the gradients, so the sharded and the
    one-process runs stay round-off apart. (Adam divides by the gradients' size: it turns the
    round-off gradients of the key biases, zero in exact arithmetic, into steps of full size
    with random signs.)"""
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def train_batch(source_rank: int, round_: int):
    """The full batch that (global) rank ``source_rank``'s loader yields in round
    ``round_``."""
    ids, mask, labels = make_batch(1000 + 17 * source_rank + round_, TRAIN_SEQ, padded=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_order(p: int):
    """(source rank in the group, round) of each training step: DeepSpeed's adapter gathers
    one batch from each rank of the group and hands out their shards in rank order."""
    return [(step % p, step // p) for step in range(TRAIN_STEPS)]
