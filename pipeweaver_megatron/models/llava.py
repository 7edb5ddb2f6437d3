"""megatron-core's LLaVAModel, as pretrain_vlm.py builds it, cut into LMM chunk parts.

pretrain_vlm.py's model_provider builds LLaVAModel from Megatron's flags: a CLIPViTModel
vision encoder (vision_model_type "clip": conv1 patch embedding, a class token,
learned position embeddings, ln_pre, no ln_post), an "mlp" MultimodalProjector and a
GPTModel language model. A LlavaRecipe holds everything that build needs; the parts
below build the same modules with the same parameter names (layer indices global, as in
a PP-1 LLaVAModel), so an LMMChunk of parts registered as "vision_model",
"vision_projection" and "language_model" loads a LLaVAModel state_dict by name:

- LlavaVisionPart: layers [first, last) of the ViT; the first part holds CLIPViTModel's
  conv1, class_token, position_embeddings and ln_pre, layers are ``decoder.layers.<i>``.
- LlavaProjectorPart: the projector itself (``encoder.linear_fc1`` / ``linear_fc2``),
  dropping the class token first under --disable-vision-class-token.
- LlavaLanguagePart: layers [first, last) of the GPTModel; the first part holds
  ``embedding`` and puts the image embeddings into the text with LLaVAModel's own
  _preprocess_data, the last ``decoder.final_layernorm``, ``output_layer`` and
  megatron-core's compute_language_model_loss, summed under the loss mask with the
  number of loss tokens (pretrain_gpt.py's loss_func). RoPE when the recipe says so.

Tensors between parts and stages (see lmm.py's [Note: chunk forward]): the ViT emits
"hidden" [n * s, 1, h_vision], tile after tile (s = patches + class token, the order
of CLIPViTModel's [b, s, h] output); the projector emits "image_embeds" [n * s', h_lm]
tile after tile (s' = LLaVA's img_seq_len), the order _preprocess_data puts into the
sequence, so sub-microbatches of images concatenate in image order; the LM passes
"hidden" [S', 1, h_lm]. Data: models/llava_data.py.

[Note: LLaVA sequence parallelism] With the language config's sequence_parallel (the
--sequence-parallel of pretrain_vlm.py, which keeps it off for the ViT and the
projector), the LM runs as LLaVAModel runs it: the first LM part scatters the combined
embeddings to the sequence-parallel region right after _preprocess_data (where
LLaVAModel._process_embedding_token_parallel does; S' must divide by TP, which
pretrain_vlm.py's get_batch pads the text for), the layers run on [S'/tp, 1, h] (their
linear layers gather and reduce-scatter the sequence themselves, and the norms' weights
carry ``sequence_parallel`` so finalize_model_grads all-reduces their gradients), the
final norm runs on the shard and the output layer gathers the sequence before the
logits, as GPTModel's does. Between LM parts the message stays the whole [S', 1, h]:
a part that ends before the LM does gathers its shard (backward: each rank keeps its
rows of the gradient) and the next part scatters it again, so the plan's message
shapes, which carry no sequence-parallel flag, are those without it; the gather and
split move values only, so numerics are LLaVAModel's under SP at any cut.

Inside each part the tensors take exactly the shapes LLaVAModel gives them ([s, n, h]
for the ViT layers and the projector, [S', 1, h] for the LM, [S'/tp, 1, h] under
sequence parallelism), so the layers run the same kernels on the same operands. Layers
are built with their config's pipeline size set to 1, so layer_number is the global
index + 1 on every pipeline rank.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.multimodal.llava_model import DEFAULT_IMAGE_TOKEN_INDEX, LLaVAModel
from megatron.core.models.vision.clip_vit_model import get_num_image_embeddings
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec as MegatronModuleSpec
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .data import MicrobatchData
from .language import Flow, PartResult, build_layers, first_param, run_layers, seeded
from .llava_data import (LANGUAGE_MODEL, VISION_MODEL, VISION_PROJECTION, llava_pixels,
                         preprocess_shim)
from .rotary import PortableRotaryEmbedding

__all__ = ["LlavaRecipe", "llava_recipe", "LlavaVisionPart", "LlavaProjectorPart",
           "LlavaLanguagePart", "VISION_MODEL", "VISION_PROJECTION", "LANGUAGE_MODEL"]


def _clip_norm() -> Any:
    """CLIPViTModel's default ln_pre: TENorm with Transformer Engine, else
    torch.nn.LayerNorm, which megatron-core 0.16.1 cannot build (build_module passes it
    config=); WrappedTorchNorm builds that same torch.nn.LayerNorm from the config."""
    from megatron.core.models.vision.clip_vit_model import NORM_IMPL

    return WrappedTorchNorm if NORM_IMPL is torch.nn.LayerNorm else NORM_IMPL


def _block_norm() -> Any:
    """TransformerBlock's final norm for a layer spec (TENorm, FusedLayerNorm or
    WrappedTorchNorm, whichever megatron-core picked)."""
    from megatron.core.transformer.transformer_block import LayerNormImpl

    return LayerNormImpl


@dataclass(frozen=True, kw_only=True, eq=False)
class LlavaRecipe:
    """Everything pretrain_vlm.py's model_provider passes to LLaVAModel (configs as it
    derives them from Megatron's flags: the vision and projection configs are copies of
    the language one with their own changes)."""

    language_config: TransformerConfig
    vision_config: TransformerConfig
    """vision_model_type must be "clip"."""
    projection_config: TransformerConfig
    language_layer_spec: MegatronModuleSpec | TransformerBlockSubmodules
    vision_layer_spec: MegatronModuleSpec | TransformerBlockSubmodules
    projection_submodules: MLPSubmodules
    """The projector's MLP submodules (pretrain_vlm: a copy of the LM layer's MLP ones)."""
    vocab_size: int
    """--padded-vocab-size."""
    max_sequence_length: int
    """The LM's max sequence length (pretrain_vlm: decoder_seq_length)."""
    img_h: int
    img_w: int
    patch_dim: int
    drop_vision_class_token: bool
    class_token_len: int = 1
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    projection_type: str = "mlp"
    image_token_index: int = DEFAULT_IMAGE_TOKEN_INDEX
    parallel_output: bool = True
    ln_pre_impl: Any = None
    """CLIPViTModel's ln_pre module (None: its default, see _clip_norm)."""
    final_norm_impl: Any = None
    """The LM's final norm (None: TransformerBlock's, or the block spec's layer_norm)."""

    def __post_init__(self) -> None:
        kind = getattr(self.vision_config, "vision_model_type", "clip")
        if kind != "clip":
            raise ValueError(f"vision_model_type {kind!r}: only CLIP ViTs are supported")
        if self.img_h % self.patch_dim or self.img_w % self.patch_dim:
            raise ValueError(f"patch_dim {self.patch_dim} does not divide the "
                             f"{self.img_h}x{self.img_w} image")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is "
                             "not supported (learned_absolute, rope, none)")
        if getattr(self.language_config, "mtp_num_layers", None):
            raise ValueError("multi-token prediction is not supported")
        if self.ln_pre_impl is None:
            object.__setattr__(self, "ln_pre_impl", _clip_norm())
        if self.final_norm_impl is None:
            spec = self.language_layer_spec
            norm = spec.layer_norm if isinstance(spec, TransformerBlockSubmodules) else None
            object.__setattr__(self, "final_norm_impl", norm or _block_norm())

    @property
    def grid(self) -> tuple[int, int]:
        """Patch rows and columns of a tile."""
        return self.img_h // self.patch_dim, self.img_w // self.patch_dim

    @property
    def vision_seq_length(self) -> int:
        """Tokens the ViT processes per tile: its patches and the class token."""
        rows, cols = self.grid
        return rows * cols + self.class_token_len

    @property
    def img_seq_len(self) -> int:
        """LM tokens of one tile (LLaVAModel.img_seq_len)."""
        return get_num_image_embeddings(self.img_h, self.img_w, self.patch_dim, "clip",
                                        self.drop_vision_class_token, self.class_token_len,
                                        False, False)


def llava_recipe(language_config: TransformerConfig, vision_config: TransformerConfig,
                 projection_config: TransformerConfig, *, vocab_size: int,
                 max_sequence_length: int, img_h: int, img_w: int, patch_dim: int,
                 drop_vision_class_token: bool, position_embedding_type: str = "learned_absolute",
                 rotary_percent: float = 1.0, transformer_impl: str = "local",
                 rope_scaling: bool = False, num_experts: int | None = None,
                 moe_grouped_gemm: bool = False) -> LlavaRecipe:
    """A LlavaRecipe with megatron-core's layer specs chosen as pretrain_vlm.py chooses
    them for --transformer-impl (without --spec): llava_spec's decoder spec for the LM,
    vit_layer_specs' for the ViT, a copy of the LM spec's MLP submodules for the
    projector."""
    from megatron.core.models.multimodal import llava_spec
    from megatron.core.models.vision import vit_layer_specs

    if transformer_impl == "transformer_engine":
        language = llava_spec.decoder_model_with_transformer_engine_default_spec(
            num_experts, moe_grouped_gemm)
        vision = vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    elif transformer_impl == "local":
        language = llava_spec.decoder_model_with_local_default_spec(num_experts,
                                                                    moe_grouped_gemm)
        vision = vit_layer_specs.get_vit_layer_with_local_spec()
    else:
        raise ValueError(f"transformer_impl {transformer_impl!r}: transformer_engine or local")
    return LlavaRecipe(
        language_config=language_config, vision_config=vision_config,
        projection_config=projection_config, language_layer_spec=language,
        vision_layer_spec=vision,
        projection_submodules=copy.deepcopy(language.submodules.mlp.submodules),
        vocab_size=vocab_size, max_sequence_length=max_sequence_length, img_h=img_h,
        img_w=img_w, patch_dim=patch_dim, drop_vision_class_token=drop_vision_class_token,
        position_embedding_type=position_embedding_type, rotary_percent=rotary_percent,
        rope_scaling=rope_scaling)


def _one_stage(config: TransformerConfig) -> TransformerConfig:
    """A copy of config with pipeline size 1: megatron then numbers layer i as i + 1
    whatever the pipeline rank (get_transformer_layer_offset is 0)."""
    config = copy.copy(config)
    config.pipeline_model_parallel_size = 1
    return config


def _layer_specs(spec: Any, count: int) -> Sequence[MegatronModuleSpec]:
    if isinstance(spec, TransformerBlockSubmodules):
        if len(spec.layer_specs) != count:
            raise ValueError(f"the block spec has {len(spec.layer_specs)} layers, the config "
                             f"{count}")
        return spec.layer_specs
    return [spec] * count


class _Decoder(nn.Module):
    """Where TransformerBlock keeps its modules: ``layers.<global index>`` and, on the
    LM's last part, ``final_layernorm``."""

    def __init__(self, spec: Any, config: TransformerConfig, module: str, first: int,
                 last: int, seed: int) -> None:
        super().__init__()
        specs = _layer_specs(spec, config.num_layers)
        if not 0 <= first < last <= config.num_layers:
            raise ValueError(f"layers [{first}, {last}) are not a range of {module!r}'s "
                             f"{config.num_layers}")
        self.layers = build_layers(list(specs), config, module, first, last, seed)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """TransformerBlock's sharded_state_dict, layers numbered globally
        (models/sharding.py)."""
        from .sharding import container_sharded_state_dict

        return container_sharded_state_dict(self, prefix, sharded_offsets, metadata)


class LlavaVisionPart(nn.Module):
    """Layers [first, last) of LLaVA's CLIPViTModel (see the module docstring).

    The first part embeds the sub-microbatch's tiles as CLIPViTModel.forward does
    (conv1, class token in front, position embeddings, ln_pre); every part runs its
    layers on [s, n, h] as the ViT's TransformerBlock does (attention mask None, the
    spec's mask type). "clip" has no ln_post. Emits "hidden" [n * s, 1, h]."""

    def __init__(self, recipe: LlavaRecipe, first: int, last: int, *, seed: int = 0) -> None:
        super().__init__()
        config = _one_stage(recipe.vision_config)
        self.recipe, self.first = recipe, first
        self.hidden_size = config.hidden_size
        self.seq_length = recipe.vision_seq_length
        if first == 0:  # CLIPViTModel.__init__ for model_subtype "clip"
            with seeded(seed, VISION_MODEL, "embedding"):
                self.ln_pre = build_module(recipe.ln_pre_impl, config=config,
                                           hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)
                self.conv1 = nn.Conv2d(3, config.hidden_size, kernel_size=recipe.patch_dim,
                                       stride=recipe.patch_dim, bias=False, padding=0)
                self.position_embeddings = nn.Embedding(self.seq_length, config.hidden_size,
                                                        dtype=config.params_dtype)
                self.class_token = nn.Parameter(torch.randn(
                    1, recipe.class_token_len, config.hidden_size, dtype=config.params_dtype))
        self.decoder = _Decoder(recipe.vision_layer_spec, config, VISION_MODEL, first, last,
                                seed)

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:
        n, s, h = len(data.images.grids), self.seq_length, self.hidden_size
        if n and any(g != self.recipe.grid for g in data.images.grids):
            raise ValueError(f"tiles of {data.images.grids} patches; the ViT takes "
                             f"{self.recipe.grid}")
        if self.first == 0:
            if n == 0:
                return {"hidden": first_param(self).new_zeros(0, 1, h)}, None, 0
            pixels = llava_pixels(data.images, self.recipe.patch_dim)
            x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [n, h, rows, cols]
            x = x.reshape(n, h, -1).permute(0, 2, 1)
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
            positions = torch.arange(s, device=x.device).expand(1, -1)
            x = self.ln_pre(x + self.position_embeddings(positions))
            hidden = x.permute(1, 0, 2).contiguous()  # [s, n, h]
        else:
            hidden = flow["hidden"]
            if hidden.size(0) != n * s:
                raise ValueError(f"the ViT got {hidden.size(0)} tokens, the sub-microbatch's "
                                 f"{n} tiles hold {n * s}")
            if n == 0:
                return {"hidden": hidden}, None, 0
            hidden = hidden.reshape(n, s, h).permute(1, 0, 2).contiguous()
        hidden = run_layers(self.decoder.layers, hidden)
        return {"hidden": hidden.permute(1, 0, 2).reshape(n * s, 1, h)}, None, 0


class LlavaProjectorPart(MultimodalProjector):
    """LLaVA's vision_projection (a megatron-core MultimodalProjector, its own forward):
    CLIP's output without the class token under drop_vision_class_token, [s', n, h] as
    LLaVAModel.forward gives it. Emits "image_embeds" [n * s', h_lm]."""

    def __init__(self, recipe: LlavaRecipe, *, seed: int = 0) -> None:
        with seeded(seed, VISION_PROJECTION, "encoder"):
            super().__init__(_one_stage(recipe.projection_config), recipe.projection_submodules,
                             recipe.projection_type, recipe.vision_config.hidden_size)
        self.recipe = recipe

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:  # type: ignore[override]
        hidden = flow["hidden"]
        n, s = len(data.images.grids), self.recipe.vision_seq_length
        if hidden.size(0) != n * s:
            raise ValueError(f"the projector got {hidden.size(0)} tokens, the sub-microbatch's "
                             f"{n} tiles hold {n * s}")
        if n == 0:
            return {"image_embeds": first_param(self).new_zeros(
                0, self.config.hidden_size)}, None, 0
        x = hidden.reshape(n, s, -1)
        if self.recipe.drop_vision_class_token:
            x = x[:, self.recipe.class_token_len:, :]
        x = super().forward(x.permute(1, 0, 2).contiguous())  # [s', n, h_lm]
        return {"image_embeds": x.permute(1, 0, 2).reshape(-1, x.size(-1))}, None, 0


def build_language_stack(part: LanguageModule, recipe: Any, layer_spec: Any, first: int,
                         last: int, seed: int) -> None:
    """GPTModel's modules of LM layers [first, last) on a LanguageModule part (LLaVA's
    language model, pretrain_gpt.py's GPT): the embedding on the first part, rotary
    embeddings when the recipe says rope, the layers, and the final norm and output layer
    on the last, with the attributes LanguageModule's methods read. recipe: a
    LlavaRecipe or a GptRecipe (the same field names)."""
    config = part.config
    part.recipe, part.first = recipe, first
    part.is_last = last == config.num_layers
    part.pre_process, part.post_process = first == 0, part.is_last
    part.share_embeddings_and_output_weights = False
    if first == 0:
        with seeded(seed, LANGUAGE_MODEL, "embedding"):
            part.embedding = LanguageModelEmbedding(
                config=config, vocab_size=recipe.vocab_size,
                max_sequence_length=recipe.max_sequence_length,
                position_embedding_type=recipe.position_embedding_type,
                scatter_to_sequence_parallel=False)
    part.rotary_pos_emb = None
    if recipe.position_embedding_type == "rope":
        part.rotary_pos_emb = PortableRotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=recipe.rotary_percent,
            rotary_interleaved=config.rotary_interleaved, rotary_base=recipe.rotary_base,
            rope_scaling=recipe.rope_scaling, rope_scaling_factor=recipe.rope_scaling_factor,
            use_cpu_initialization=True)
    part.decoder = _Decoder(layer_spec, config, LANGUAGE_MODEL, first, last, seed)
    if part.is_last:
        part.decoder.final_layernorm = build_module(
            recipe.final_norm_impl, config=config, hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon)
        with seeded(seed, LANGUAGE_MODEL, "output_layer"):
            part.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, recipe.vocab_size, config=config,
                init_method=config.init_method, bias=False, skip_bias_add=False,
                gather_output=not recipe.parallel_output)
    part.setup_embeddings_and_output_layer()  # marks the embedding and output weights


class LlavaLanguagePart(LanguageModule):
    """Layers [first, last) of LLaVA's GPTModel (see the module docstring). A
    megatron-core LanguageModule, so its loss is compute_language_model_loss. Under the
    config's sequence_parallel the layers run on the TP rank's rows of the sequence
    (see [Note: LLaVA sequence parallelism])."""

    def __init__(self, recipe: LlavaRecipe, first: int, last: int, *, seed: int = 0) -> None:
        super().__init__(config=_one_stage(recipe.language_config))
        build_language_stack(self, recipe, recipe.language_layer_spec, first, last, seed)

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:  # type: ignore[override]
        text = data.text
        length = text.tokens.numel()
        hidden = self._embed(flow.get("image_embeds"), text) if self.first == 0 else flow["hidden"]
        if hidden.size(0) != length:
            raise ValueError(f"LM hidden states hold {hidden.size(0)} tokens, the microbatch "
                             f"{length}")
        sequence_parallel = self.config.sequence_parallel
        if sequence_parallel:
            hidden = self._scatter(hidden)
        rope = None
        if self.rotary_pos_emb is not None:  # GPTModel: positions 0..S'-1 of the sequence
            if self.rotary_pos_emb.inv_freq.device != hidden.device:
                self.rotary_pos_emb.inv_freq = self.rotary_pos_emb.inv_freq.to(hidden.device)
            rope = self.rotary_pos_emb.get_emb(length)
        with self._layer_rng():
            hidden = run_layers(self.decoder.layers, hidden, rotary_pos_emb=rope)
        if not self.is_last:
            if sequence_parallel:  # the whole sequence to the next part (see the Note)
                hidden = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden, tensor_parallel_output_grad=False)
            return {"hidden": hidden}, None, 0
        logits, _ = self.output_layer(self.decoder.final_layernorm(hidden))
        losses = self.compute_language_model_loss(text.labels[None], logits)  # [1, S']
        loss = torch.sum(losses.view(-1).float() * text.loss_mask.view(-1).float())
        return {}, loss, text.loss_tokens

    def _scatter(self, hidden: Tensor) -> Tensor:
        """This TP rank's rows of the whole [S', 1, h] sequence (LLaVAModel's
        scatter_to_sequence_parallel_region; backward gathers the gradient)."""
        tp = self.config.tensor_model_parallel_size
        if hidden.size(0) % tp:
            raise ValueError(f"sequence parallelism: the LM sequence of {hidden.size(0)} "
                             f"tokens does not divide by the tensor-parallel size {tp} "
                             "(pretrain_vlm.py's get_batch pads the text so that it does)")
        return tensor_parallel.scatter_to_sequence_parallel_region(hidden)

    def _layer_rng(self) -> Any:
        """TransformerBlock's RNG under sequence parallelism (the model-parallel fork, so
        the shards draw different dropout masks); nothing else draws in the layers, so
        without dropout the fork is skipped."""
        config = self.config
        if config.sequence_parallel and (config.hidden_dropout or config.attention_dropout):
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _embed(self, embeds: Tensor | None, text: Any) -> Tensor:
        """LLaVAModel.forward's text embedding, then its _preprocess_data: [S', 1, h]."""
        recipe = self.recipe
        tiles = text.num_image_tiles
        count = int(tiles.sum())
        h = self.config.hidden_size
        given = 0 if embeds is None else embeds.size(0)
        if given != count * recipe.img_seq_len:
            raise ValueError(f"the microbatch has {count} tiles of {recipe.img_seq_len} LM "
                             f"tokens, {given} image embeddings were given")
        ids = text.input_ids.clone()
        ids[ids == recipe.image_token_index] = 0
        language = self.embedding(input_ids=ids, position_ids=text.text_position_ids)
        language = language.transpose(1, 0).contiguous()  # [1, S, h]
        if count:
            images = embeds.view(count, recipe.img_seq_len, h).permute(1, 0, 2)
        else:  # LLaVAModel's empty image embeddings
            images = language.new_zeros(0, 0, 0)
        combined, _, _ = LLaVAModel._preprocess_data(
            preprocess_shim(recipe, pre_process=True, post_process=False),
            images.to(language.dtype), language, text.input_ids, None, None, False, None,
            recipe.image_token_index, tiles)
        return combined


def llava_part(recipe: LlavaRecipe, kind: str, first: int, last: int, *,
               seed: int = 0) -> nn.Module:
    """The part of a LLaVA module kind ("vision_encoder", "projector", "language_model")."""
    if kind == "vision_encoder":
        return LlavaVisionPart(recipe, first, last, seed=seed)
    if kind == "projector":
        return LlavaProjectorPart(recipe, seed=seed)
    if kind == "language_model":
        return LlavaLanguagePart(recipe, first, last, seed=seed)
    raise ValueError(f"LLaVA has no {kind} module")


def recipe_config(recipe: LlavaRecipe, module: str) -> TransformerConfig:
    """The config of one of LLaVA's modules by its name."""
    return {VISION_MODEL: recipe.vision_config, VISION_PROJECTION: recipe.projection_config,
            LANGUAGE_MODEL: recipe.language_config}[module]

