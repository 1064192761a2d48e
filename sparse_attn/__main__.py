"""Command line: check a DeepSpeed config's ``sparse_attention`` block and look at its layout.

    python -m sparse_attn validate ds.json
    python -m sparse_attn show ds.json --num-heads 12 --seq-len 4096 --png layout.png
    python -m sparse_attn schema > configs/sparse_attention.schema.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .config import SparseAttentionConfigError, json_schema, resolved, split_deepspeed_config


def _load_block(path: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = split_deepspeed_config(path)
    for w in caught:  # one line each, without Python's source-line noise
        print(f"warning: {w.message}", file=sys.stderr)
    if model is None:
        raise SparseAttentionConfigError(f"{path} has no \"sparse_attention\" block")
    return model


def cmd_validate(args) -> int:
    model = _load_block(args.config)
    print(f"{args.config}: sparse_attention block is valid")
    print(json.dumps(resolved(model), indent=2))
    if args.num_heads:
        print(repr(model.build(args.num_heads)))
    return 0


def distinct_head_layouts(layout):
    """Groups of heads sharing one layout: list of (heads, layout[head])."""
    groups = []
    for h in range(layout.shape[0]):
        for heads, pattern in groups:
            if (layout[h] == pattern).all():
                heads.append(h)
                break
        else:
            groups.append(([h], layout[h]))
    return groups


def _heads_label(heads) -> str:
    if len(heads) > 4:
        return f"heads {heads[0]}..{heads[-1]} ({len(heads)})"
    return "head " + ", ".join(map(str, heads)) if len(heads) == 1 else "heads " + ", ".join(
        map(str, heads))


def write_layout_png(layout, path: str, title: str) -> None:
    """One panel per distinct head layout; a filled cell is an attended block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = distinct_head_layouts(layout)
    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (heads, pattern) in zip(axes.flat, groups):
        ax.imshow(pattern.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{_heads_label(heads)}: {pattern.float().mean().item():.1%}", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        ax.axis("on")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_show(args) -> int:
    if args.png:
        folder = os.path.dirname(os.path.abspath(args.png))
        if not os.path.isdir(folder):
            raise SparseAttentionConfigError(
                f"--png {args.png}: the folder {folder} does not exist; create it first")
    model = _load_block(args.config)
    cfg = model.build(args.num_heads)
    layout = cfg.make_layout(args.seq_len)
    nb = layout.shape[-1]
    print(f"{model.mode} layout, {args.num_heads} heads, seq {args.seq_len}, block "
          f"{model.block}: {nb} x {nb} blocks, density {layout.float().mean().item():.2%}")
    for h in range(layout.shape[0]):
        print(f"  head {h:3d}: {int(layout[h].sum()):7d} blocks, density "
              f"{layout[h].float().mean().item():.2%}")
    if args.png:
        write_layout_png(layout, args.png,
                         f"{model.mode}, block {model.block}, seq {args.seq_len}")
        print(f"wrote {args.png} ({len(distinct_head_layouts(layout))} distinct head layouts)")
    return 0


def cmd_schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate a DeepSpeed config's sparse_attention block")
    p.add_argument("config", help="DeepSpeed JSON config")
    p.add_argument("--num-heads", type=int, default=0, help="also build the layout class")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("show", help="print density per head; optionally draw the layout")
    p.add_argument("config", help="DeepSpeed JSON config")
    p.add_argument("--num-heads", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--png", help="write a picture of the layout here")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("schema", help="print the JSON Schema of the block")
    p.set_defaults(func=cmd_schema)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
