"""Sparse attention for a Hugging Face ``Trainer`` whose ``TrainingArguments(deepspeed=...)``
points at a DeepSpeed config holding a ``"sparse_attention"`` block (the README's recipe).

    deepspeed --num_gpus 1 hf_trainer_recipe.py ds_trainer.json

``prepare_from_config`` validates the block and returns the config without it (DeepSpeed
0.19 rejects the block); ``run.patch_model`` switches the transformers model to block-sparse
attention; the Trainer gets the cleaned dict. A random-token toy dataset keeps it
self-contained: put your model and data in its place.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments  # noqa: E402

from launcher import prepare_from_config  # noqa: E402

SEQ = 256


class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(5, 1000, (SEQ - 7,), generator=g)  # any length: padded inside
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(ds_config_path, output_dir="out/hf_trainer_recipe", max_steps=4):
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=SEQ)
    model = BertForMaskedLM(config)

    run = prepare_from_config(ds_config_path, sparse_attention=True,
                              num_heads=config.num_attention_heads, max_seq_length=SEQ,
                              max_position_embeddings=config.max_position_embeddings)
    model = run.patch_model(model)

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2,
                             max_steps=max_steps, logging_steps=1, report_to=[],
                             save_strategy="no", deepspeed=run.ds_config,
                             use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=ToyData())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trainer finished with {run.describe()}; losses {losses}", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("ds_config")
    parser.add_argument("--output_dir", default="out/hf_trainer_recipe")
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    a = parser.parse_args()
    main(a.ds_config, a.output_dir, a.max_steps)
