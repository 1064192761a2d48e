"""Command-line arguments of the launcher plugin."""
from __future__ import annotations

import argparse


def _dests(parser: argparse.ArgumentParser) -> set:
    return {action.dest for action in parser._actions}


def add_sparse_attention_arguments(parser: argparse.ArgumentParser,
                                   with_deepspeed: bool = True) -> argparse.ArgumentParser:
    """Add ``--deepspeed_sparse_attention`` (and keep ``--deepspeed_transformer_kernel``) to
    a training script's parser, beside DeepSpeed's own config arguments, and
    ``--allow_layout_change`` (resume a checkpoint trained with another layout).

    With ``with_deepspeed`` (default) the call also runs ``deepspeed.add_config_arguments``
    when the parser does not have ``--deepspeed_config`` yet, and adds ``--local_rank`` (the
    ``deepspeed`` launcher passes it to every rank) when missing. Arguments the parser
    already has are left alone, so calling it after ``deepspeed.add_config_arguments`` or
    twice is fine. Returns the parser.
    """
    if with_deepspeed and "deepspeed_config" not in _dests(parser):
        import deepspeed

        parser = deepspeed.add_config_arguments(parser)
    dests = _dests(parser)
    group = parser.add_argument_group(
        "Sparse attention", "block-sparse attention from the DeepSpeed config's "
        "\"sparse_attention\" block")
    if "deepspeed_sparse_attention" not in dests:
        group.add_argument(
            "--deepspeed_sparse_attention", default=False, action="store_true",
            help="Use block-sparse self-attention with the layout of the \"sparse_attention\" "
            "block of the DeepSpeed config (without this flag the block is validated and "
            "ignored: dense attention).")
    if "deepspeed_transformer_kernel" not in dests:
        group.add_argument(
            "--deepspeed_transformer_kernel", default=False, action="store_true",
            help="Use DeepSpeed's fused transformer kernel for dense layers (turned off, with "
            "a warning, when --deepspeed_sparse_attention is on).")
    if "allow_layout_change" not in dests:
        group.add_argument(
            "--allow_layout_change", default=False, action="store_true",
            help="Resume a checkpoint trained with another attention layout (another "
            "\"sparse_attention\" block, or sparse where it was dense or the reverse); without "
            "it such a resume is refused (launcher.check_resume_layout).")
    if with_deepspeed and "local_rank" not in dests:
        group.add_argument("--local_rank", type=int, default=-1,
                           help="Local rank, passed by the deepspeed launcher.")
    return parser
