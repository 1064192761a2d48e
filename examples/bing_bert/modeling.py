"""A bing_bert-style BERT for pre-training (masked LM + next-sentence prediction).

Pre-LayerNorm transformer layers (as bing_bert's DeepSpeed model), MLM decoder tied to the
word embeddings and evaluated only at the masked positions. When a ``SparsityConfig`` is
given, every layer's ``attention.self`` is a ``BertSparseSelfAttention`` and ``BertModel``
pads the batch to a multiple of the block before the encoder and cuts the output back after
(``SparseAttentionUtils.pad_to_block_size`` / ``unpad_sequence_output``), so callers pass any
sequence length. With ``use_transformer_kernel`` (and no sparsity) the layers are DeepSpeed's
fused ``DeepSpeedTransformerLayer`` (CUDA only).

Without an ``attention_mask`` no mask is built (the dense layers then keep SDPA's flash kernel,
which takes no mask; the sparse layers skip the key-padding mask). For long sequences,
``BertForPreTraining.set_memory_options`` turns on activation checkpointing of each encoder
layer and sequence tiling of the feed-forward and of the masked-LM loss (``tiling.py``): the
same losses and gradients, less activation memory, some recomputation.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def masked_positions(masked_lm_labels: torch.Tensor) -> torch.Tensor:
    """The flat positions (int64 ``[n]``, ascending) of the tokens to predict in
    ``masked_lm_labels`` ``[batch, seq]`` (labels other than ``IGNORE_INDEX``): what
    ``BertForPreTraining.forward`` takes as ``masked_positions``. Computed where the batch is
    made, on the host, it spares the forward a device-to-host sync (``nonzero``)."""
    return (masked_lm_labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def check_masked_positions(positions: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ValueError unless ``positions`` is an int64 ``[n]`` tensor on the device of the
    flat ``labels``; then check, without a host sync (an asynchronous device assert), that it
    is exactly ``masked_positions`` of those labels (every predicted token once, in order)."""
    if positions.dim() != 1 or positions.dtype != torch.long or \
            positions.device != labels.device:
        raise ValueError(f"masked_positions must be an int64 [n] tensor on {labels.device} "
                         f"(modeling.masked_positions(masked_lm_labels)), got "
                         f"{positions.dtype} {list(positions.shape)} on {positions.device}")
    kept = labels != IGNORE_INDEX
    ok = (kept.sum() == positions.numel()) & kept.index_select(0, positions).all()
    if positions.numel() > 1:
        ok = ok & (positions[1:] > positions[:-1]).all()
    torch._assert_async(ok, "masked_positions are not the positions of masked_lm_labels other "
                        "than IGNORE_INDEX, in order (modeling.masked_positions)")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json_file(cls, path: str) -> "BertConfig":
        if not os.path.isfile(path):
            raise ValueError(f"BERT config {path} does not exist")
        with open(path) as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column "
                             f"{err.colno}: {err.msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a BERT config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        config = cls(**data)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{path}: hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        return config

    def to_dict(self) -> dict:
        return asdict(self)


def _act(name: str):
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "tanh":
        return torch.tanh
    raise ValueError(f"unknown hidden_act {name!r}")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        seq = input_ids.shape[1]
        if seq > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq} is above max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}; extend the position embeddings "
                f"(SparseAttentionUtils.extend_position_embedding)")
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Dense self-attention (SDPA); ``forward(hidden_states, attention_mask)`` with BERT's
    additive extended mask ``[batch, 1, 1, seq]``; returns ``[batch, seq, hidden]``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None):
        q, k, v = (self._heads(lin(hidden_states)) for lin in (self.query, self.key, self.value))
        mask = attention_mask.to(q.dtype) if attention_mask is not None else None
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return input_tensor + self.dropout(self.dense(hidden_states))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask, residual):
        return self.output(self.self(hidden_states, attention_mask), residual)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _act(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return input_tensor + self.dropout(self.dense(hidden_states))


def _feed_forward(layer: "BertLayer", x: torch.Tensor) -> torch.Tensor:
    """The feed-forward of ``layer`` without its dropout and residual: ``[..., hidden]`` ->
    ``[..., hidden]`` through ``[..., intermediate_size]`` (deterministic: tiling recomputes
    it)."""
    return layer.output.dense(layer.intermediate(x))


class BertLayer(nn.Module):
    """Pre-LayerNorm transformer layer: ``forward(hidden_states [batch, seq, hidden],
    attention_mask)`` -> ``[batch, seq, hidden]``.

    ``mlp_shards`` > 1 computes the feed-forward in that many pieces of the sequence
    (``tiling.tiled_mlp``; dropout and the residual stay outside the tiled part).
    ``fused_norm``: each residual add, its dropout and the LayerNorm after it run as one
    kernel each way on GPUs (``residual_norm.add_dropout_norm``; the plain modules elsewhere).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.PreAttentionLayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = BertAttention(config)
        self.PostAttentionLayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.mlp_shards = 1
        self.fused_norm = True

    def forward(self, hidden_states, attention_mask):
        return self.forward_chained(hidden_states, attention_mask)[0]

    def forward_chained(self, hidden_states, attention_mask, normed=None, next_norm=None):
        """``forward``, chained to its neighbours' LayerNorms: ``normed`` is this layer's
        ``PreAttentionLayerNorm(hidden_states)`` when the caller has it, and ``next_norm``
        the LayerNorm that follows the layer (the next layer's first, or the encoder's
        final), computed with the layer's last residual add. Returns ``(output,
        next_norm(output))`` (None without ``next_norm``)."""
        from residual_norm import add_dropout_norm

        if normed is None:
            normed = self.PreAttentionLayerNorm(hidden_states)
        attention = self.attention.output.dense(self.attention.self(normed, attention_mask))
        x, y = add_dropout_norm(hidden_states, attention, self.attention.output.dropout,
                                self.PostAttentionLayerNorm, self.fused_norm)
        if self.mlp_shards > 1:
            from tiling import tiled_mlp

            params = list(self.intermediate.parameters()) + list(self.output.dense.parameters())
            h = tiled_mlp(_feed_forward, self, y, self.mlp_shards, params)
        else:
            h = _feed_forward(self, y)
        return add_dropout_norm(x, h, self.output.dropout, next_norm, self.fused_norm)


def _deepspeed_transformer_layers(config: BertConfig, batch_size: int, fp16: bool, seed: int,
                                  **options):
    """bing_bert's fused DeepSpeed transformer layers (CUDA; dense attention only).
    ``options``: further ``DeepSpeedTransformerConfig`` switches (bing_bert's
    ``stochastic_mode``, ``attn_dropout_checkpoint``, ``normalize_invertible``,
    ``gelu_checkpoint``)."""
    if not torch.cuda.is_available():
        raise ValueError("--deepspeed_transformer_kernel needs a CUDA GPU (DeepSpeed's fused "
                         "transformer kernel has no CPU version); drop the flag")
    from deepspeed.ops.transformer import DeepSpeedTransformerConfig, DeepSpeedTransformerLayer

    cfg = DeepSpeedTransformerConfig(
        batch_size=batch_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, heads=config.num_attention_heads,
        attn_dropout_ratio=config.attention_probs_dropout_prob,
        hidden_dropout_ratio=config.hidden_dropout_prob,
        num_hidden_layers=config.num_hidden_layers, initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        seed=seed, fp16=fp16, pre_layer_norm=True, **options)
    return nn.ModuleList(DeepSpeedTransformerLayer(cfg) for _ in range(config.num_hidden_layers))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, sparsity_config=None, use_transformer_kernel=False,
                 transformer_kernel_args: Optional[dict] = None,
                 sparse_max_seq_length: Optional[int] = None):
        super().__init__()
        if use_transformer_kernel and sparsity_config is not None:
            raise ValueError("DeepSpeed transformer kernels cannot run sparse attention")
        if use_transformer_kernel:
            self.layer = _deepspeed_transformer_layers(config, **(transformer_kernel_args or {}))
        else:
            self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
            if sparsity_config is not None:
                from sparse_attn.bert_sparse_self_attention import BertSparseSelfAttention

                for layer in self.layer:
                    layer.attention.self = BertSparseSelfAttention(
                        config, sparsity_config=sparsity_config)
                    if sparse_max_seq_length:  # the layout's length (default: the positions)
                        layer.attention.self.sparse_self_attention.max_seq_length = \
                            sparse_max_seq_length
        self.FinalLayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        #: checkpoint each layer in training (torch.utils.checkpoint, non-reentrant): only the
        #: layers' inputs are kept; each layer's forward runs again in the backward
        self.checkpoint_layers = False

    def forward(self, hidden_states, attention_mask, output_all_encoded_layers=False):
        """``hidden_states`` ``[batch, seq, hidden]``; ``attention_mask`` the additive
        ``[batch, 1, 1, seq]`` mask or None. Returns a list: the last layer's states (after
        the final LayerNorm), or every layer's with ``output_all_encoded_layers``."""
        all_layers = []
        checkpoint = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        layers = list(self.layer)
        # the example's layers hand each LayerNorm to the residual add before it (one kernel);
        # checkpointed layers keep only their input, so they do not
        chained = bool(layers) and not checkpoint and all(isinstance(layer, BertLayer)
                                                          for layer in layers)
        normed = None
        for i, layer in enumerate(layers):
            if checkpoint:
                from torch.utils.checkpoint import checkpoint as run_checkpointed

                # dropout masks are replayed: the RNG state is saved and restored
                hidden_states = run_checkpointed(layer, hidden_states, attention_mask,
                                                 use_reentrant=False)
            elif chained:
                following = layers[i + 1].PreAttentionLayerNorm if i + 1 < len(layers) \
                    else self.FinalLayerNorm
                hidden_states, normed = layer.forward_chained(hidden_states, attention_mask,
                                                              normed, following)
            else:
                hidden_states = layer(hidden_states, attention_mask)
            if output_all_encoded_layers:
                all_layers.append(hidden_states)
        hidden_states = normed if chained else self.FinalLayerNorm(hidden_states)
        if output_all_encoded_layers:
            all_layers[-1] = hidden_states
            return all_layers
        return [hidden_states]


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return torch.tanh(self.dense(hidden_states[:, 0]))


class BertModel(nn.Module):
    """Embeddings + encoder + pooler. ``sparsity_config``: block-sparse self-attention."""

    def __init__(self, config: BertConfig, sparsity_config=None, use_transformer_kernel=False,
                 transformer_kernel_args: Optional[dict] = None,
                 sparse_max_seq_length: Optional[int] = None):
        super().__init__()
        self.config = config
        self.pad_token_id = config.pad_token_id or 0
        self.sparse_attention_config = sparsity_config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, sparsity_config, use_transformer_kernel,
                                   transformer_kernel_args, sparse_max_seq_length)
        self.pooler = BertPooler(config)
        # Set by bert_sequence_parallel.use_in_model: this rank holds a shard of the tokens.
        self.sequence_shard = None
        # DeepSpeed's fused layers take no mask-less call
        self.always_mask = bool(use_transformer_kernel)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                output_all_encoded_layers=False):
        if self.sequence_shard is not None:
            return self._forward_shard(input_ids, token_type_ids, attention_mask,
                                       output_all_encoded_layers)
        # No mask given: none is built (SDPA keeps its flash kernel, which takes no mask),
        # unless padding to the sparse block adds tokens that must be masked.
        if attention_mask is None and self.always_mask:
            attention_mask = torch.ones_like(input_ids)
        pad_len = 0
        if self.sparse_attention_config is not None:
            from sparse_attn.sparse_attention_utils import SparseAttentionUtils

            pad_len, input_ids, attention_mask, token_type_ids, _, _ = \
                SparseAttentionUtils.pad_to_block_size(
                    block_size=self.sparse_attention_config.block, input_ids=input_ids,
                    attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=None, inputs_embeds=None, pad_token_id=self.pad_token_id,
                    model_embeddings=self.embeddings)
        embedding_output = self.embeddings(input_ids, token_type_ids)
        extended = None
        if attention_mask is not None:
            # the sparse layers read the mask in float32: built so, no layer casts it again
            dtype = torch.float32 if self.sparse_attention_config is not None \
                else embedding_output.dtype
            extended = attention_mask[:, None, None, :].to(dtype)
            extended = (1.0 - extended) * torch.finfo(dtype).min
        layers = self.encoder(embedding_output, extended, output_all_encoded_layers)
        if pad_len > 0:
            from sparse_attn.sparse_attention_utils import SparseAttentionUtils

            layers = [SparseAttentionUtils.unpad_sequence_output(pad_len, x) for x in layers]
        sequence_output = layers[-1]
        pooled = self.pooler(sequence_output)
        if not output_all_encoded_layers:
            layers = layers[-1]
        return layers, pooled

    def _forward_shard(self, input_ids, token_type_ids, attention_mask,
                       output_all_encoded_layers):
        """Sequence parallel: ``input_ids``/``token_type_ids`` are this rank's shard
        ``[batch, S / P]`` and ``attention_mask`` is the whole sequence's ``[batch, S]``
        (``bert_sequence_parallel.shard_batch`` pads and cuts them); the outputs are the
        shard's states and the pooled state of the shard's first token (the sequence's [CLS]
        on the group's rank 0 only)."""
        shard = self.sequence_shard
        part = input_ids.shape[1]
        if attention_mask is None or attention_mask.shape[1] != part * shard.size:
            raise ValueError("sequence parallel: pass the whole sequence's attention_mask "
                             "[batch, S] with the shard's input_ids [batch, S / P]")
        positions = torch.arange(shard.rank * part, (shard.rank + 1) * part,
                                 device=input_ids.device).unsqueeze(0)
        embedding_output = self.embeddings(input_ids, token_type_ids, positions)
        extended = attention_mask[:, None, None, :].to(torch.float32)
        extended = (1.0 - extended) * torch.finfo(torch.float32).min
        layers = self.encoder(embedding_output, extended, output_all_encoded_layers)
        pooled = self.pooler(layers[-1])
        return (layers if output_all_encoded_layers else layers[-1]), pooled


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _act(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.word_embeddings = word_embeddings  # tied decoder weight
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def prediction_scores(self, hidden):
        hidden = self.LayerNorm(self.act(self.transform(hidden)))
        return F.linear(hidden, self.word_embeddings.weight, self.decoder_bias)


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM and next-sentence heads.

    ``forward(input_ids, token_type_ids, attention_mask, masked_lm_labels=None,
    next_sentence_label=None)``: with labels returns ``(loss, mlm_loss, nsp_loss)`` (the MLM
    decoder runs only at positions whose label is not ``IGNORE_INDEX``), without them
    ``(prediction_scores, seq_relationship_score)``. Sequence parallel
    (``bert_sequence_parallel.use_in_model``): the inputs are this rank's shard and the three
    losses are this rank's parts, which add up over the sequence group.

    ``input_ids``, ``token_type_ids``, ``attention_mask`` (0/1 keep-mask, or None: no padding)
    and ``masked_lm_labels`` (``IGNORE_INDEX`` where nothing is predicted) are int64
    ``[batch, seq]``, ``next_sentence_label`` int64 ``[batch]``; the losses are float32 scalars.
    ``masked_positions`` (optional, int64 ``[n]``: ``masked_positions(masked_lm_labels)`` made
    with the batch) saves the forward its one host sync, finding those positions itself.
    ``set_memory_options`` trades recomputation for activation memory at long sequences.
    """

    def __init__(self, config: BertConfig, sparsity_config=None, use_transformer_kernel=False,
                 transformer_kernel_args: Optional[dict] = None,
                 sparse_max_seq_length: Optional[int] = None):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, sparsity_config, use_transformer_kernel,
                              transformer_kernel_args, sparse_max_seq_length)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.apply(self._init_weights)
        #: >1: the masked-LM loss in that many pieces of the masked positions
        #: (``tiling.tiled_masked_lm_loss_sum``)
        self.mlm_loss_shards = 1
        #: the masked-LM loss by ``cross_entropy.masked_lm_cross_entropy`` (``set_fused``)
        self.fused_loss = True

    def set_memory_options(self, activation_checkpointing: bool = False, tiled_mlp: int = 1,
                           tiled_loss: int = 1) -> "BertForPreTraining":
        """Long-sequence memory savers (each leaves the losses and gradients as they were):

        * ``activation_checkpointing``: checkpoint every encoder layer in training
          (``torch.utils.checkpoint``, non-reentrant; dropout replayed): only each layer's
          input ``[batch, seq, hidden]`` is kept, the layer runs again in the backward.
        * ``tiled_mlp``: compute each layer's feed-forward in this many pieces of the sequence
          (DeepSpeed's ``TiledMLP``): the ``[batch, seq, intermediate_size]`` activation
          exists for one piece at a time. Not with DeepSpeed's transformer kernel.
        * ``tiled_loss``: compute the masked-LM logits ``[masked tokens, vocab]`` and their
          loss in this many pieces (recomputed in the backward).

        Returns the model. Raises ValueError for a shard count below 1 or ``tiled_mlp`` with
        layers that are not the example's ``BertLayer``.
        """
        from tiling import check_shards

        tiled_mlp = check_shards("--tiled_mlp", tiled_mlp)
        tiled_loss = check_shards("--tiled_loss", tiled_loss)
        layers = list(self.bert.encoder.layer)
        if tiled_mlp > 1 and not all(isinstance(layer, BertLayer) for layer in layers):
            raise ValueError("--tiled_mlp needs the example's BertLayer; DeepSpeed's transformer "
                             "kernel (--deepspeed_transformer_kernel) fuses the feed-forward: "
                             "drop one of the two flags")
        self.bert.encoder.checkpoint_layers = bool(activation_checkpointing)
        for layer in layers:
            if isinstance(layer, BertLayer):
                layer.mlp_shards = tiled_mlp
        self.mlm_loss_shards = tiled_loss
        return self

    def set_fused(self, norm: bool = True, loss: bool = True) -> "BertForPreTraining":
        """The example's own kernels where they run (GPUs; both on by default), or the plain
        PyTorch ops: ``norm``, each encoder layer's residual adds, dropouts and LayerNorms as
        one kernel each way (``residual_norm``); ``loss``, the masked-LM cross-entropy without
        float32 copies of the logits (``cross_entropy``). Returns the model."""
        for layer in self.bert.encoder.layer:
            if isinstance(layer, BertLayer):
                layer.fused_norm = bool(norm)
        self.fused_loss = bool(loss)
        return self

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                masked_lm_labels=None, next_sentence_label=None, masked_positions=None):
        sequence_output, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        seq_rel = self.cls.seq_relationship(pooled)
        if masked_lm_labels is None:
            return self.cls.prediction_scores(sequence_output), seq_rel
        labels = masked_lm_labels.reshape(-1)
        if masked_positions is None:
            picked = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # waits for the device
        else:
            check_masked_positions(masked_positions, labels)
            picked = masked_positions
        hidden = sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, picked)
        shard = self.bert.sequence_shard
        if self.mlm_loss_shards > 1:
            from tiling import tiled_masked_lm_loss_sum

            total = tiled_masked_lm_loss_sum(self.cls, hidden, labels.index_select(0, picked),
                                             self.mlm_loss_shards)
            count = picked.numel()
            if shard is not None:  # the whole sequence's masked tokens: the parts add up
                import torch.distributed as dist

                count = torch.tensor(float(count), device=total.device)
                dist.all_reduce(count, group=shard.group)
            mlm_loss = total / count
            return self._with_next_sentence_loss(mlm_loss, seq_rel, next_sentence_label)
        scores = self.cls.prediction_scores(hidden)
        if shard is None:
            from cross_entropy import masked_lm_cross_entropy

            mlm_loss = masked_lm_cross_entropy(scores, labels.index_select(0, picked),
                                               self.fused_loss)
        else:  # this rank's part; the parts of a sequence group add up to the loss
            from bert_sequence_parallel import masked_lm_loss_part

            mlm_loss = masked_lm_loss_part(scores.float(), labels.index_select(0, picked),
                                           shard)
        return self._with_next_sentence_loss(mlm_loss, seq_rel, next_sentence_label)

    def _with_next_sentence_loss(self, mlm_loss, seq_rel, next_sentence_label):
        """``(loss, mlm_loss, nsp_loss)``: the next-sentence loss (this rank's part when
        sequence parallel) from ``seq_rel`` ``[batch, 2]``, zero without labels."""
        shard = self.bert.sequence_shard
        if next_sentence_label is None:
            return mlm_loss, mlm_loss, torch.zeros_like(mlm_loss)
        nsp_loss = F.cross_entropy(seq_rel.float(), next_sentence_label.reshape(-1))
        if shard is not None:
            from bert_sequence_parallel import next_sentence_loss_part

            nsp_loss = next_sentence_loss_part(nsp_loss, shard)
        return mlm_loss + nsp_loss, mlm_loss, nsp_loss


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_flops_note(config: BertConfig) -> str:  # pragma: no cover - informational
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads, head dim "
            f"{config.hidden_size // config.num_attention_heads}, ~"
            f"{math.ceil(12 * config.num_hidden_layers * config.hidden_size ** 2 / 1e6)}M "
            f"encoder parameters")
