"""The vision encoder's layers and the projector (patch merger) of an LMM chunk."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from ..config import ModelSpec
from .data import MicrobatchData
from .language import (Flow, PartResult, axial_rope, build_layers, first_param, module_config,
                       packed_params, run_layers, seeded)
from .layer_specs import layer_spec
from .sequence_parallel import gather, layer_rng, local_rows, packed, pad_rows, scatter


class VisionEncoderPart(nn.Module):
    """Layers [first, last) of a ViT over packed images (attention within each image).

    First part: ``patch_embed``, a linear map of the flattened patches (Qwen2-VL's patch
    convolution), then bidirectional layers with 2-D RoPE over each patch's (row, col).
    The encoder's final norm belongs to the projector (it is applied right before the
    merge). Emits "hidden" [T_enc, 1, H] (empty when the sub-microbatch has no images);
    with sequence_parallel, this rank's rows of it ([Note: sequence parallelism in the
    chunks]).
    """

    def __init__(self, model: ModelSpec, name: str, first: int, last: int, *, tp: int,
                 params_dtype: torch.dtype, dropout: float, seed: int,
                 use_te: bool = False, sequence_parallel: bool = False) -> None:
        super().__init__()
        spec = model.module(name)
        rule = spec.image
        self.first, self.head_dim, self.hidden_size = first, spec.head_dim, spec.hidden_size
        self.config = config = module_config(spec, tp, params_dtype, dropout, sequence_parallel)
        if first == 0:
            patch = rule.channels * rule.temporal_patch_size * rule.patch_size**2
            with seeded(seed, name, "patch_embed"):
                self.patch_embed = nn.Linear(patch, spec.hidden_size, bias=False,
                                             dtype=params_dtype)
                nn.init.normal_(self.patch_embed.weight, std=config.init_method_std)
        self.layers = build_layers(layer_spec(use_te, causal=False), config, name, first, last,
                                   seed)

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:
        images = data.images
        tokens = sum(images.encoder_tokens)
        config = self.config
        if self.first == 0:
            weight = self.patch_embed.weight
            hidden = self.patch_embed(images.patches.to(weight.dtype))[:, None, :]
            hidden = scatter(hidden, config) if tokens else hidden
        else:
            hidden = flow["hidden"]
        if hidden.size(0) != local_rows(tokens, config):
            raise ValueError(f"vision hidden states hold {hidden.size(0)} rows, the "
                             f"sub-microbatch's {tokens} image tokens {local_rows(tokens, config)}")
        if tokens:
            cu_seqlens, lengths = packed(images.cu_seqlens, images.encoder_tokens, config)
            rope = pad_rows(axial_rope(images.positions, self.head_dim), sum(lengths))
            with layer_rng(config):
                hidden = run_layers(self.layers, hidden, rotary_pos_emb=rope,
                                    packed_seq_params=packed_params(cu_seqlens, lengths))
        return {"hidden": hidden}, None, 0


class ProjectorPart(nn.Module):
    """The patch merger: the encoder's final ``norm``, then every merge_size**2
    consecutive patch tokens concatenated and mapped by a megatron-core MLP projector
    (``merger``: ColumnParallel fc1, GELU, RowParallel fc2) to one LM-wide token.

    Emits "image_embeds" [T_img, H_lm] (2-D, replicated over tensor-parallel ranks).
    Under sequence_parallel it first gathers the encoder's rows (the merge joins
    neighbouring rows) and then runs whole, as without it.
    """

    def __init__(self, model: ModelSpec, name: str, *, tp: int, params_dtype: torch.dtype,
                 dropout: float, seed: int, use_te: bool = False,
                 sequence_parallel: bool = False) -> None:
        # use_te is accepted and ignored: the merger and norm are local modules in both
        # layer specs (they are small next to the encoder's layers).
        super().__init__()
        spec = model.module(name)
        encoder = model.module(model.upstream(name)[0])
        self.merge = encoder.image.merge_size
        self.encoder_config = module_config(encoder, tp, params_dtype, dropout, sequence_parallel)
        encoder_config = module_config(encoder, tp, params_dtype, dropout)
        self.norm = WrappedTorchNorm(encoder_config, encoder.hidden_size,
                                     eps=encoder_config.layernorm_epsilon)
        # An MLP config: the encoder's conventions (LayerNorm, biases, GELU) at the
        # projector's widths; attention settings are unused (tp heads pass the checks).
        mlp = dataclasses.replace(encoder, name=name, num_layers=1, hidden_size=spec.hidden_size,
                                  ffn_hidden_size=spec.ffn_hidden_size, num_attention_heads=tp,
                                  num_query_groups=0, gated_mlp=False)
        with seeded(seed, name, "merger"):
            self.merger = MultimodalProjector(
                module_config(mlp, tp, params_dtype, dropout),
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                "mlp", input_size=spec.input_size)
        self.hidden_size = spec.hidden_size

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:
        tokens = sum(data.images.lm_tokens)
        hidden, patches = flow["hidden"], tokens * self.merge**2
        if hidden.size(0) != local_rows(patches, self.encoder_config):
            raise ValueError(f"the projector got {hidden.size(0)} encoder rows, the images' "
                             f"{patches} patch tokens need {local_rows(patches, self.encoder_config)}")
        if tokens == 0:
            return {"image_embeds": first_param(self).new_zeros(0, self.hidden_size)}, None, 0
        hidden = gather(hidden, patches, self.encoder_config)
        merged = self.norm(hidden).reshape(tokens, 1, -1)
        return {"image_embeds": self.merger(merged)[:, 0, :].contiguous()}, None, 0
