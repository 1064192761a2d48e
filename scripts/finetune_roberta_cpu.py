#!/usr/bin/env python
"""Long-document fine-tuning on CPU: a RoBERTa converted to 4096 tokens with a BigBird layout.

Everything is offline and random (no downloads): the script

1. builds a small random RoBERTa "checkpoint" with 512 positions and a word-level tokenizer,
   and saves both (this stands in for a pre-trained model such as roberta-base);
2. loads it, extends the position embeddings to ``--max-position`` tokens (copying the trained
   512 to fill the new length, RoBERTa's padding offset kept) and the tokenizer's
   ``model_max_length``;
3. switches every self-attention layer to block-sparse BigBird attention (the query/key/value
   weights are kept);
4. fine-tunes a few steps on a toy long-document classification task (does the document
   contain the word ``needle``?), with documents of different lengths in a batch, none a
   multiple of the block: padding to the block happens inside the model;
5. saves the model and tokenizer, reloads them, and checks that the reloaded model is sparse
   and gives identical logits.

    python scripts/finetune_roberta_cpu.py                    # 4096 tokens, ~1 minute on 2 cores
    python scripts/finetune_roberta_cpu.py --max-position 1024 --steps 2   # quicker
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import sparse_attn.hf as sparse_hf  # noqa: E402  (registers the "block_sparse" attention)
from sparse_attn.sparse_attention_utils import SparseAttentionUtils  # noqa: E402
from sparse_attn.sparsity_config import BigBirdSparsityConfig  # noqa: E402

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(200)] + ["needle"]


def make_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")


def make_documents(n: int, max_words: int, rng: random.Random):
    """Documents of random lengths; label 1 iff ``needle`` occurs (anywhere, often far in)."""
    docs, labels = [], []
    for _ in range(n):
        length = rng.randint(max_words // 2, max_words)
        words = [rng.choice(WORDS[:-1]) for _ in range(length)]
        label = rng.random() < 0.5
        if label:
            for _ in range(3):
                words[rng.randrange(length)] = "needle"
        docs.append(" ".join(words))
        labels.append(int(label))
    return docs, torch.tensor(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-position", type=int, default=4096, help="new maximum length")
    p.add_argument("--train-length", type=int, default=4000,
                   help="longest training document in tokens (<= max-position)")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)
    if args.train_length > args.max_position:
        p.error("--train-length must not exceed --max-position")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="sparse_roberta_")
    base_dir, tuned_dir = os.path.join(out_dir, "base-512"), os.path.join(out_dir, "sparse")
    t0 = time.time()

    # 1. a small random "pre-trained" RoBERTa with 512 positions (+2: RoBERTa's offset)
    tokenizer = make_tokenizer(512)
    config = RobertaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           intermediate_size=4 * args.hidden, max_position_embeddings=514,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2)
    RobertaForSequenceClassification(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    # 2.-3. load, extend to max_position, switch to BigBird block-sparse attention
    model = RobertaForSequenceClassification.from_pretrained(base_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = SparseAttentionUtils.extend_position_embedding(model, args.max_position)
    tokenizer = SparseAttentionUtils.update_tokenizer_model_max_length(tokenizer, args.max_position)
    sparsity = BigBirdSparsityConfig(num_heads=args.heads, block=args.block,
                                     different_layout_per_head=True, num_random_blocks=2,
                                     num_sliding_window_blocks=3, num_global_blocks=1,
                                     seed=args.seed)
    model = SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, args.max_position, sparsity)
    layout = sparsity.make_layout(args.max_position)
    print(f"model: RoBERTa {args.layers}x{args.hidden}, {args.heads} heads, positions "
          f"{model.config.max_position_embeddings} (= {args.max_position} + 2), attention "
          f"{model.config._attn_implementation!r}, BigBird block {args.block}, layout density "
          f"{layout.float().mean():.3%}")

    # 4. fine-tune on the toy task
    docs, labels = make_documents(args.batch * args.steps, args.train_length - 2, rng)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        sl = slice(step * args.batch, (step + 1) * args.batch)
        enc = tokenizer(docs[sl], padding=True, truncation=True, return_tensors="pt")
        out = model(**enc, labels=labels[sl])
        if not torch.isfinite(out.loss):
            raise RuntimeError(f"loss is not finite at step {step}: {out.loss}")
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: tokens {tuple(enc['input_ids'].shape)} loss {out.loss.item():.4f}")

    # 5. save, reload, compare
    model.eval()
    eval_docs, _ = make_documents(2, args.train_length - 2, rng)
    enc = tokenizer(eval_docs, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    model.save_pretrained(tuned_dir)
    tokenizer.save_pretrained(tuned_dir)

    reloaded = sparse_hf.from_pretrained(RobertaForSequenceClassification, tuned_dir).eval()
    tokenizer2 = PreTrainedTokenizerFast.from_pretrained(tuned_dir)
    assert tokenizer2.model_max_length == args.max_position
    assert sparse_hf.is_sparse(reloaded), "the reloaded model is not sparse"
    assert torch.equal(sparse_hf.get_sparsity_config(reloaded).make_layout(args.max_position),
                       layout), "the reloaded layout differs"
    with torch.no_grad():
        logits2 = reloaded(**tokenizer2(eval_docs, padding=True, truncation=True,
                                        return_tensors="pt")).logits
    if not torch.equal(logits, logits2):
        raise AssertionError(f"reloaded logits differ: {logits} vs {logits2}")
    print(f"saved to {tuned_dir}; reloaded model is sparse and gives identical logits "
          f"{logits.tolist()} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
