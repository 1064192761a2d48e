"""DeepSpeed launcher plugin: ``deepspeed train.py --deepspeed_sparse_attention
--deepspeed_config ds.json`` with the ``"sparse_attention"`` block in ``ds.json``.

In a training script::

    import argparse
    from launcher import add_sparse_attention_arguments, prepare_sparse_attention

    parser = add_sparse_attention_arguments(argparse.ArgumentParser())  # + deepspeed's args
    args = parser.parse_args()
    run = prepare_sparse_attention(args, num_heads=config.num_attention_heads,
                                   max_seq_length=args.max_seq_length,
                                   max_position_embeddings=config.max_position_embeddings)
    model = run.patch_model(model)          # sparse self-attention + padding (no-op if dense)
    engine, optimizer, _, scheduler = run.initialize(model=model,
                                                     model_parameters=model.parameters())

Checkpoints: ``save_checkpoint(engine, save_dir, tag, run=run)`` records the layout and marks
the checkpoint complete once every rank's files are written (``latest`` only then);
``resolve_checkpoint(load_dir, tag)`` picks the checkpoint to resume (the newest complete one
without a tag) with clear errors, and ``check_resume_layout(ckpt.layout, run)`` refuses a
resume with another layout unless allowed (``--allow_layout_change``).

fp16 at ZeRO stage 0: ``scaled_backward(engine, loss)`` in place of ``engine.backward(loss)``
applies the loss scale that DeepSpeed 0.19's engine leaves undone (``loss_scaling``).

``prepare_sparse_attention`` validates the block, removes it from the config DeepSpeed sees
(DeepSpeed 0.19 rejects it) and never writes the user's file. DeepSpeed is imported only when
needed; ``sparse_attn`` itself never imports it.
"""
from .arguments import add_sparse_attention_arguments
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    LayoutChangeError,
    check_resume_layout,
    layout_record,
    resolve_checkpoint,
    save_checkpoint,
)
from .loss_scaling import scaled_backward, unapplied_loss_scale
from .patching import add_encoder_padding, patch_bert_model
from .run import (
    LauncherConfigError,
    SparseAttentionRun,
    avoid_cpu_op_builds,
    model_layout_checksums,
    prepare_from_config,
    prepare_sparse_attention,
)

__all__ = [
    "add_sparse_attention_arguments", "prepare_sparse_attention", "prepare_from_config",
    "SparseAttentionRun", "LauncherConfigError", "patch_bert_model", "add_encoder_padding",
    "avoid_cpu_op_builds", "model_layout_checksums", "save_checkpoint", "resolve_checkpoint",
    "check_resume_layout", "layout_record", "Checkpoint", "CheckpointError", "LayoutChangeError",
    "scaled_backward", "unapplied_loss_scale",
]
