"""Turn plain text into BERT pre-training shards (masked LM + next-sentence prediction).

Input: text files, one document per blank-line-separated block (sentences one per line or
running text). Without ``--input`` the corpus is built from the docstrings of Python's
standard library on this machine (one document per module), so the example needs no
download.

Output (``--output_dir``): ``vocab.txt`` (copied from ``--vocab`` or trained on the corpus,
the same vocab on every run), ``train_shard_XXX.pt`` / ``eval_shard_000.pt`` and
``meta.json``. Each shard is a dict of tensors: ``input_ids`` [N, L] (0 = [PAD]),
``token_type_ids`` [N, L], ``lengths`` [N], ``masked_lm_labels`` [N, L] (the original token at
masked positions, -100 elsewhere), ``next_sentence_label`` [N] (0 = B follows A, 1 = random).
Masking is static, as in bing_bert's shards: 15% of the tokens, 80% [MASK] / 10% random /
10% unchanged, ``--dupe_factor`` copies with different masks.

    python prepare_data.py --output_dir data/seq512 --max_seq_length 512
    python prepare_data.py --input my_corpus.txt --vocab vocab.txt --output_dir data/x
"""
from __future__ import annotations

import argparse
import ast
import collections
import heapq
import itertools
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from typing import Iterable, List

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`'\"(])")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "lib2to3", "ensurepip", "turtledemo"}


# -- corpus ----------------------------------------------------------------------------------
def docstring_documents(limit_files: int = 0, min_chars: int = 200, roots=None) -> List[str]:
    """One document per Python module under ``roots`` (default: the standard library): its
    module, class and function docstrings."""
    docs = []
    roots = roots or [sysconfig.get_paths()["stdlib"]]
    for dirpath, dirnames, filenames in itertools.chain.from_iterable(map(os.walk, roots)):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:
                        parts.append(doc.strip())
            text = "\n".join(parts)
            if len(text) >= min_chars:
                docs.append(text)
            if limit_files and len(docs) >= limit_files:
                return docs
    return docs


def read_documents(paths: Iterable[str]) -> List[str]:
    """Documents of text files: blocks separated by blank lines."""
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"input file {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        docs.extend(block.strip() for block in re.split(r"\n\s*\n", text) if block.strip())
    if not docs:
        raise ValueError(f"no documents in {list(paths)}")
    return docs


def split_sentences(doc: str) -> List[str]:
    sentences = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*[-*>])", doc):
        text = " ".join(paragraph.split())
        if text:
            sentences.extend(s for s in _SENTENCE_END.split(text) if s)
    return sentences


def merge_documents(docs: List[str], min_chars: int) -> List[str]:
    merged, current = [], []
    for doc in docs:
        current.append(doc)
        if sum(len(d) for d in current) >= min_chars:
            merged.append("\n".join(current))
            current = []
    if current:
        if merged:
            merged[-1] += "\n" + "\n".join(current)
        else:
            merged.append("\n".join(current))
    return merged


# -- vocab -----------------------------------------------------------------------------------
def word_counts(docs: Iterable[str]) -> collections.Counter:
    """How often each word occurs, as BERT's uncased tokenizer splits text into words."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    counts: collections.Counter = collections.Counter()
    for doc in docs:
        text = tok.normalizer.normalize_str(doc)
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    return counts


def wordpiece_vocab(counts: collections.Counter, vocab_size: int, min_frequency: int = 2,
                    prefix: str = "##") -> List[str]:
    """A WordPiece vocab learnt by byte-pair merges over the words ``counts``: the special
    tokens, every character (word-initial and ``prefix``-continued), then the merged pieces
    in merge order, up to ``vocab_size``. The most frequent pair merges first; ties go to the
    smaller pair, so the vocab is the same on every run (``tokenizers``' own trainer breaks
    ties in hash order, huggingface/tokenizers#1794)."""
    words = sorted(counts)
    freq = [counts[w] for w in words]
    symbols = [[w[0]] + [prefix + c for c in w[1:]] for w in words]
    alphabet = sorted({s for syms in symbols for s in syms} - set(SPECIALS))
    vocab = SPECIALS + alphabet
    known = set(vocab)
    pairs: collections.Counter = collections.Counter()
    holders = collections.defaultdict(set)  # pair -> words that had it (some may no more)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pairs[pair] += freq[i]
            holders[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]  # entries whose count changed are stale
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair):
            continue
        if -n < min_frequency:
            break
        a, b = pair
        merged = a + b[len(prefix):] if b.startswith(prefix) else a + b
        for i in sorted(holders.pop(pair)):
            syms, out, j = symbols[i], [], 0
            while j < len(syms):
                if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            if len(out) == len(syms):
                continue
            for old in zip(syms, syms[1:]):
                pairs[old] -= freq[i]
                if pairs[old] <= 0:
                    del pairs[old]
                elif old != pair:
                    heapq.heappush(heap, (-pairs[old], old))
            for new in zip(out, out[1:]):
                pairs[new] += freq[i]
                holders[new].add(i)
                heapq.heappush(heap, (-pairs[new], new))
            symbols[i] = out
        pairs.pop(pair, None)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return vocab


def train_vocab(docs: List[str], vocab_size: int, out_path: str) -> None:
    """Write ``wordpiece_vocab`` of the documents' words to ``out_path``, a token a line."""
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(wordpiece_vocab(word_counts(docs), vocab_size)) + "\n")


def load_tokenizer(vocab_path: str):
    from tokenizers import BertWordPieceTokenizer

    with open(vocab_path, encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    missing = [t for t in SPECIALS if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_path} lacks the special tokens {missing}")
    return BertWordPieceTokenizer(vocab_path, lowercase=True), {t: vocab.index(t) for t in SPECIALS}, len(vocab)


# -- instances -------------------------------------------------------------------------------
def create_instances(docs_ids: List[List[List[int]]], max_seq_length: int, rng: random.Random,
                     short_seq_prob: float = 0.1):
    """BERT's sentence-pair instances: (tokens_a, tokens_b, is_random_next)."""
    max_tokens = max_seq_length - 3
    instances = []
    for d, doc in enumerate(docs_ids):
        target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                if chunk:
                    a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                    tokens_a = [t for s in chunk[:a_end] for t in s]
                    tokens_b = []
                    random_next = len(chunk) == 1 or rng.random() < 0.5
                    if random_next and len(docs_ids) > 1:
                        other = rng.randrange(len(docs_ids) - 1)
                        other = other + 1 if other >= d else other
                        odoc = docs_ids[other]
                        start = rng.randrange(len(odoc))
                        for s in odoc[start:]:
                            tokens_b.extend(s)
                            if len(tokens_b) >= target - len(tokens_a):
                                break
                        i -= len(chunk) - a_end  # put the unused sentences back
                    else:
                        random_next = False
                        tokens_b = [t for s in chunk[a_end:] for t in s]
                    while len(tokens_a) + len(tokens_b) > max_tokens:
                        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
                        if rng.random() < 0.5:
                            del longer[0]
                        else:
                            longer.pop()
                    if tokens_a and tokens_b:
                        instances.append((tokens_a, tokens_b, random_next))
                chunk, length = [], 0
                target = max_tokens if rng.random() >= short_seq_prob else rng.randint(
                    2, max_tokens)
            i += 1
    return instances


def mask_instance(tokens_a, tokens_b, specials, vocab_size, max_seq_length, masked_lm_prob,
                  max_predictions, rng: random.Random):
    cls_id, sep_id, mask_id = specials["[CLS]"], specials["[SEP]"], specials["[MASK]"]
    ids = [cls_id] + tokens_a + [sep_id] + tokens_b + [sep_id]
    types = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
    candidates = [i for i, t in enumerate(ids) if t not in (cls_id, sep_id)]
    rng.shuffle(candidates)
    n = min(max_predictions, max(1, int(round(len(ids) * masked_lm_prob))))
    labels = [-100] * len(ids)
    first_regular = len(SPECIALS)
    for pos in candidates[:n]:
        labels[pos] = ids[pos]
        r = rng.random()
        if r < 0.8:
            ids[pos] = mask_id
        elif r < 0.9:
            ids[pos] = rng.randrange(first_regular, vocab_size)
    return ids, types, labels


def build_shard(instances, specials, vocab_size, max_seq_length, masked_lm_prob,
                max_predictions, rng):
    n = len(instances)
    input_ids = torch.zeros(n, max_seq_length, dtype=torch.int32)
    token_type_ids = torch.zeros(n, max_seq_length, dtype=torch.int8)
    labels = torch.full((n, max_seq_length), -100, dtype=torch.int32)
    lengths = torch.zeros(n, dtype=torch.int32)
    nsp = torch.zeros(n, dtype=torch.int8)
    for row, (a, b, random_next) in enumerate(instances):
        ids, types, lab = mask_instance(list(a), list(b), specials, vocab_size, max_seq_length,
                                        masked_lm_prob, max_predictions, rng)
        k = len(ids)
        input_ids[row, :k] = torch.tensor(ids, dtype=torch.int32)
        token_type_ids[row, :k] = torch.tensor(types, dtype=torch.int8)
        labels[row, :k] = torch.tensor(lab, dtype=torch.int32)
        lengths[row] = k
        nsp[row] = int(random_next)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "lengths": lengths,
            "masked_lm_labels": labels, "next_sentence_label": nsp}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="*", default=None,
                   help="text files (documents separated by blank lines); default: docstrings "
                   "of Python's standard library")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--vocab", default=None, help="an existing vocab.txt (WordPiece, with "
                   "[PAD] [UNK] [CLS] [SEP] [MASK]); default: train one on the corpus")
    p.add_argument("--vocab_size", type=int, default=8192, help="size of a trained vocab")
    p.add_argument("--dupe_factor", type=int, default=5,
                   help="copies of the corpus with different masks and pairs")
    p.add_argument("--masked_lm_prob", type=float, default=0.15)
    p.add_argument("--max_predictions_per_seq", type=int, default=None,
                   help="default: ceil(0.15 * max_seq_length)")
    p.add_argument("--short_seq_prob", type=float, default=0.1)
    p.add_argument("--eval_fraction", type=float, default=0.05,
                   help="fraction of documents held out for evaluation")
    p.add_argument("--instances_per_shard", type=int, default=20000)
    p.add_argument("--min_doc_chars", type=int, default=0,
                   help="merge consecutive documents until each has this many characters "
                   "(long-sequence data from short documents, e.g. 40000 for 4096 tokens)")
    p.add_argument("--docstrings_of", nargs="+", default=None, metavar="DIR",
                   help="without --input: the docstrings of the Python modules under these "
                   "directories (default: the standard library; e.g. site-packages for "
                   "sequences longer than the standard library's text)")
    p.add_argument("--limit_files", type=int, default=0,
                   help="use only the first N standard-library modules (quick tests)")
    p.add_argument("--seed", type=int, default=12345)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    if args.max_seq_length < 16:
        raise SystemExit("error: --max_seq_length must be at least 16")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.input:
        docs = read_documents(args.input)
        source = f"{len(args.input)} file(s)"
    else:
        for root in args.docstrings_of or []:
            if not os.path.isdir(root):
                raise SystemExit(f"error: --docstrings_of {root}: not a directory")
        docs = docstring_documents(args.limit_files, roots=args.docstrings_of)
        source = f"docstrings of the Python {sys.version_info.major}.{sys.version_info.minor} " \
                 f"standard library" if not args.docstrings_of else \
                 f"docstrings of the Python modules under {' '.join(args.docstrings_of)}"
        with open(os.path.join(args.output_dir, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(" ".join(d.split()) for d in docs) + "\n")
    if args.min_doc_chars:
        docs = merge_documents(docs, args.min_doc_chars)
    vocab_path = os.path.join(args.output_dir, "vocab.txt")
    if args.vocab:
        if not os.path.isfile(args.vocab):
            raise SystemExit(f"error: vocab file {args.vocab} does not exist")
        if os.path.abspath(args.vocab) != os.path.abspath(vocab_path):
            shutil.copyfile(args.vocab, vocab_path)
    else:
        train_vocab(docs, args.vocab_size, vocab_path)
    tokenizer, specials, vocab_size = load_tokenizer(vocab_path)

    rng = random.Random(args.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_eval = max(1, int(len(docs) * args.eval_fraction)) if len(docs) > 1 else 0
    eval_docs = [docs[i] for i in order[:n_eval]]
    train_docs = [docs[i] for i in order[n_eval:]] or eval_docs

    def tokenize(ds):
        out = []
        for doc in ds:
            sents = split_sentences(doc)
            enc = tokenizer.encode_batch(sents, add_special_tokens=False) if sents else []
            ids = [e.ids for e in enc if e.ids]
            if ids:
                out.append(ids)
        return out

    train_ids, eval_ids = tokenize(train_docs), tokenize(eval_docs)
    max_pred = args.max_predictions_per_seq or -(-args.max_seq_length * 15 // 100)
    meta = {"max_seq_length": args.max_seq_length, "vocab_size": vocab_size,
            "pad_token_id": specials["[PAD]"], "special_tokens": specials,
            "max_predictions_per_seq": max_pred, "masked_lm_prob": args.masked_lm_prob,
            "dupe_factor": args.dupe_factor, "source": source, "documents": len(docs),
            "train_shards": [], "eval_shards": []}
    for split, ids, dupes in (("train", train_ids, args.dupe_factor), ("eval", eval_ids, 1)):
        instances = []
        for _ in range(dupes):
            instances.extend(create_instances(ids, args.max_seq_length, rng,
                                              args.short_seq_prob))
        rng.shuffle(instances)
        if not instances:
            raise SystemExit(f"error: the corpus gave no {split} instances; add text")
        for s in range(0, len(instances), args.instances_per_shard):
            shard = build_shard(instances[s:s + args.instances_per_shard], specials, vocab_size,
                                args.max_seq_length, args.masked_lm_prob, max_pred, rng)
            name = f"{split}_shard_{s // args.instances_per_shard:03d}.pt"
            torch.save(shard, os.path.join(args.output_dir, name))
            meta[f"{split}_shards"].append(name)
        meta[f"{split}_instances"] = len(instances)
        meta[f"{split}_tokens"] = int(sum(len(a) + len(b) + 3 for a, b, _ in instances))
    with open(os.path.join(args.output_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{source}: {len(docs)} documents -> {meta['train_instances']} train / "
          f"{meta['eval_instances']} eval instances of up to {args.max_seq_length} tokens "
          f"({meta['train_tokens'] / max(1, meta['train_instances']):.0f} tokens on average), "
          f"vocab {vocab_size}, in {args.output_dir} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
