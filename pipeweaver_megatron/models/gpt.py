"""megatron-core's GPTModel, as pretrain_gpt.py builds it, cut into LMM chunk parts.

pretrain_gpt.py's gpt_builder builds GPTModel from Megatron's flags: a TransformerConfig
(core_transformer_config_from_args), a layer spec (or a block spec of every layer), the
padded vocabulary, --max-position-embeddings and the position embedding. A GptRecipe
holds what that call passes (megatron/script_gpt.py records it); GptLanguagePart builds
layers [first, last) with megatron-core's own modules and GPTModel's parameter names:

- the first part: ``embedding`` (LanguageModelEmbedding: word and, for learned absolute
  positions, position embeddings) on the script's tokens and position_ids;
- every part: ``decoder.layers.<global index>`` (build_module of the script's layer
  spec, layer_number = index + 1) on [S, 1, h] with the script's attention mask and,
  under RoPE, GPTModel's rotary embedding of positions 0..S-1;
- the last part: ``decoder.final_layernorm``, ``output_layer`` and megatron-core's
  compute_language_model_loss, summed under the loss mask with the number of loss
  tokens (pretrain_gpt.py's loss_func).

[Note: GPT chunk names] A GptChunk is an LMMChunk of one module, "language_model"
(LANGUAGE_MODEL), so its parameters are GPTModel's names under that prefix:
``language_model.embedding.word_embeddings.weight``,
``language_model.decoder.layers.3.mlp.linear_fc1.weight``,
``language_model.decoder.final_layernorm.weight``, ``language_model.output_layer.weight``;
gpt_names / chunk_names move between the two (a PP-1 GPTModel's state_dict loads with
``chunk.load_from(chunk_names(gpt.state_dict()))``). Tied input and output embeddings
are not implemented (they would need Megatron's embedding group between the stages of
the first and the last part).

Data: gpt_microbatch turns one get_batch result into MicrobatchData (text only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.spec_utils import ModuleSpec as MegatronModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ModelSpec, ModuleKind
from ..ir import Layout, Part
from .data import ClipData, ImageData, MicrobatchData, TextData, cu_seqlens
from .language import Flow, PartResult
from .llava import _block_norm, _one_stage, build_language_stack
from .lmm import LMMChunk, check_parts

__all__ = ["LANGUAGE_MODEL", "GPT_SPLITS", "GptRecipe", "GptTextData", "GptLanguagePart",
           "GptChunk", "gpt_microbatch", "gpt_stage_chunk", "gpt_names", "chunk_names"]

LANGUAGE_MODEL = "language_model"
"""The one module of a GPT spec; the prefix of the chunks' parameter names."""
GPT_SPLITS = ((LANGUAGE_MODEL, "samples"),)
"""What models.data.select splits for a GPT (nothing: one sample per microbatch)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class GptRecipe:
    """What pretrain_gpt.py's gpt_builder passes to GPTModel (see the module docstring)."""

    language_config: TransformerConfig
    """core_transformer_config_from_args of the flags."""
    layer_spec: MegatronModuleSpec | TransformerBlockSubmodules
    vocab_size: int
    """--padded-vocab-size."""
    max_sequence_length: int
    """--max-position-embeddings."""
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    parallel_output: bool = True
    final_norm_impl: Any = None
    """The final norm (None: TransformerBlock's, or the block spec's layer_norm)."""

    def __post_init__(self) -> None:
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is "
                             "not supported (learned_absolute, rope, none)")
        if getattr(self.language_config, "mtp_num_layers", None):
            raise ValueError("multi-token prediction is not supported")
        if self.final_norm_impl is None:
            spec = self.layer_spec
            norm = spec.layer_norm if isinstance(spec, TransformerBlockSubmodules) else None
            object.__setattr__(self, "final_norm_impl", norm or _block_norm())


@dataclass(frozen=True, kw_only=True, eq=False)
class GptTextData(TextData):
    """TextData of one pretrain_gpt.py sequence plus its attention mask."""

    attention_mask: Tensor | None
    """[1, 1, S, S] bool (True: masked) as the dataset made it, or None (causal)."""


class GptLanguagePart(LanguageModule):
    """Layers [first, last) of pretrain_gpt.py's GPTModel (see the module docstring). A
    megatron-core LanguageModule, so its loss is compute_language_model_loss."""

    def __init__(self, recipe: GptRecipe, first: int, last: int, *, seed: int = 0) -> None:
        super().__init__(config=_one_stage(recipe.language_config))
        build_language_stack(self, recipe, recipe.layer_spec, first, last, seed)

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:  # type: ignore[override]
        text = data.text
        if self.first == 0:
            hidden = self.embedding(input_ids=text.tokens[None],
                                    position_ids=text.position_ids[None])  # [S, 1, h]
        else:
            hidden = flow["hidden"]
        if hidden.size(0) != text.tokens.numel():
            raise ValueError(f"GPT hidden states hold {hidden.size(0)} tokens, the microbatch "
                             f"{text.tokens.numel()}")
        rope = None
        if self.rotary_pos_emb is not None:  # GPTModel: positions 0..S-1 of the sequence
            if self.rotary_pos_emb.inv_freq.device != hidden.device:
                self.rotary_pos_emb.inv_freq = self.rotary_pos_emb.inv_freq.to(hidden.device)
            rope = self.rotary_pos_emb.get_emb(hidden.size(0))
        mask = getattr(text, "attention_mask", None)
        for layer in self.decoder.layers.values():  # TransformerBlock.forward's loop
            hidden, _ = layer(hidden, attention_mask=mask, rotary_pos_emb=rope)
        if not self.is_last:
            return {"hidden": hidden}, None, 0
        logits, _ = self.output_layer(self.decoder.final_layernorm(hidden))
        losses = self.compute_language_model_loss(text.labels[None], logits)  # [1, S]
        loss = torch.sum(losses.view(-1).float() * text.loss_mask.view(-1).float())
        return {}, loss, text.loss_tokens


class GptChunk(LMMChunk):
    """The GPT parts of one stage (see [Note: GPT chunk names]): an LMMChunk of the one
    module "language_model", built from a GptRecipe (forward, loading by name and the
    checkpoint hooks are LMMChunk's; torch_dist keys are GPTModel's own)."""

    checkpoint_key_prefixes = {LANGUAGE_MODEL: ""}

    def __init__(self, model: ModelSpec, parts: tuple[Part, ...], *, tp: int = 1,
                 recipe: GptRecipe, seed: int = 0) -> None:
        nn.Module.__init__(self)
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("parallel_state is not initialised; call init_single_process "
                               "or init_parallel first")
        parts = tuple(parts)
        check_parts(model, parts)
        _check_gpt(model, recipe, tp)
        self.model, self.parts, self.tp, self.recipe = model, parts, tp, recipe
        self.use_te = False
        for part in parts:
            self.add_module(part.module, GptLanguagePart(recipe, part.first_layer,
                                                         part.last_layer, seed=seed))

    def _gated(self, name: str) -> bool:
        return self.recipe.language_config.gated_linear_unit and ".mlp.linear_fc1." in name


def _check_gpt(model: ModelSpec, recipe: GptRecipe, tp: int) -> None:
    """The model is one language model named LANGUAGE_MODEL with the recipe's layers."""
    config = recipe.language_config
    if len(model.modules) != 1 or model.modules[0].kind != ModuleKind.LANGUAGE_MODEL \
            or model.modules[0].name != LANGUAGE_MODEL:
        raise ValueError(f"a GPT recipe needs one language model {LANGUAGE_MODEL!r}; "
                         f"{model.name} has {[m.name for m in model.modules]}")
    if config.num_layers != model.modules[0].num_layers:
        raise ValueError(f"{LANGUAGE_MODEL!r} has {model.modules[0].num_layers} layers in the "
                         f"model spec, {config.num_layers} in the recipe")
    if config.tensor_model_parallel_size != tp:
        raise ValueError(f"tp={tp} but the recipe's config has tensor_model_parallel_size "
                         f"{config.tensor_model_parallel_size}")
    if config.sequence_parallel or config.context_parallel_size != 1:
        raise ValueError("GPT chunks run without sequence or context parallelism")


def gpt_stage_chunk(model: ModelSpec, layout: Layout, stage: int, *, tp: int = 1,
                    recipe: GptRecipe, seed: int = 0) -> GptChunk:
    """The GptChunk of one stage of a layout."""
    return GptChunk(model, layout.stages[stage].parts, tp=tp, recipe=recipe, seed=seed)


def chunk_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """A GPTModel state_dict under the chunks' names ([Note: GPT chunk names])."""
    return {f"{LANGUAGE_MODEL}.{name}": value for name, value in state.items()}


def gpt_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Chunk tensors under GPTModel's names (chunk_names inverted)."""
    prefix = f"{LANGUAGE_MODEL}."
    return {name[len(prefix):]: value for name, value in state.items()
            if name.startswith(prefix)}


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Any]:
    if isinstance(batch, Mapping):
        return (batch["tokens"], batch["labels"], batch["loss_mask"],
                batch.get("attention_mask"), batch["position_ids"],
                batch.get("packed_seq_params"))
    items = tuple(batch)
    if len(items) < 5:
        raise ValueError(f"get_batch gave {len(items)} values; pretrain_gpt.py's gives "
                         "(tokens, labels, loss_mask, attention_mask, position_ids, "
                         "packed_seq_params)")
    tokens, labels, loss_mask, attention_mask, position_ids = items[:5]
    return tokens, labels, loss_mask, attention_mask, position_ids, \
        items[5] if len(items) > 5 else None


def gpt_microbatch(batch: Any, index: int = 0) -> MicrobatchData:
    """MicrobatchData of one pretrain_gpt.py microbatch.

    batch: what its get_batch returns at --micro-batch-size 1, (tokens, labels,
    loss_mask, attention_mask, position_ids, packed_seq_params) with tokens [1, S]
    (packed_seq_params must be None: no packed sequences or context parallelism), or a
    mapping with those keys. One sample of S tokens; the loss tokens are the loss
    mask's ones. index: the microbatch's index within its global batch. Tensors stay
    where they are."""
    tokens, labels, loss_mask, attention_mask, position_ids, packed = _unpack(batch)
    if tokens is None:
        raise ValueError("get_batch gave no tokens on this rank (pretrain_gpt.py reads "
                         "only on the first and last pipeline stages unless told otherwise)")
    if packed is not None:
        raise ValueError("the batch has packed_seq_params; GPT chunks run one unpacked "
                         "sequence per microbatch")
    if tokens.dim() != 2 or tokens.size(0) != 1:
        raise ValueError(f"tokens must be [1, S] (--micro-batch-size 1), got "
                         f"{tuple(tokens.shape)}")
    length = tokens.size(1)
    device = tokens.device
    loss_mask = loss_mask.float().view(-1)
    text = GptTextData(
        tokens=tokens.long().view(-1), labels=labels.long().view(-1), loss_mask=loss_mask,
        position_ids=position_ids.long().view(-1), cu_seqlens=cu_seqlens([length]).to(device),
        image_positions=torch.zeros(0, dtype=torch.int64, device=device),
        sample_lengths=(length,), loss_tokens=int(loss_mask.sum().item()),
        attention_mask=attention_mask)
    empty = torch.zeros(0, 0, device=device)
    images = ImageData(indices=(), patches=empty, positions=torch.zeros(
        0, 2, dtype=torch.int64, device=device), cu_seqlens=cu_seqlens([]).to(device),
        grids=(), lm_tokens=())
    clips = ClipData(indices=(), latents=empty, noise=empty.clone(),
                     timesteps=torch.zeros(0, device=device),
                     positions=torch.zeros(0, 3, dtype=torch.int64, device=device),
                     cu_seqlens=cu_seqlens([]).to(device), lengths=(), samples=())
    return MicrobatchData(index=index, text=text, images=images, clips=clips,
                          splits=GPT_SPLITS)
