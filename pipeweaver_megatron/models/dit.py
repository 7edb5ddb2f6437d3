"""The generator (DiT) layers of a text-to-video LMM chunk."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec as MegatronModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ModelSpec
from .attention import SDPAttention
from .data import MicrobatchData
from .language import (Flow, PartResult, axial_rope, build_layers, module_config, packed_params,
                       run_layers, seeded)
from .layer_specs import layer_spec
from .sequence_parallel import (SequenceParallelNorm, gather, layer_rng, local_rows, packed,
                                pad_rows, scatter, whole_rows)

TIME_FREQUENCIES = 256
"""Width of the sinusoidal diffusion-time features fed to the time embedding MLP."""


class ConditionedCrossAttention(CrossAttention):
    """megatron-core CrossAttention whose keys and values come from a sequence of another
    width (the LM's hidden states): linear_kv maps condition_hidden, not hidden_size."""

    def __init__(self, config: TransformerConfig, submodules: CrossAttentionSubmodules,
                 layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.padding,
                 cp_comm_type: str | None = None, pg_collection=None,
                 condition_hidden: int = 0) -> None:
        super().__init__(config, submodules, layer_number, attn_mask_type, cp_comm_type,
                         pg_collection)
        if condition_hidden and condition_hidden != config.hidden_size:
            self.linear_kv = submodules.linear_kv(
                condition_hidden, 2 * self.kv_projection_size, config=config,
                init_method=config.init_method, gather_output=False,
                bias=config.add_bias_linear, skip_bias_add=False, is_expert=False)


def dit_layer_spec(condition_hidden: int, use_te: bool = False) -> MegatronModuleSpec:
    """The bidirectional layer spec (local + SDPA, or Transformer Engine) plus a norm and
    cross-attention to the cond.

    The cross-attention is local linears + SDPAttention in both specs: each clip attends
    only its own sample's caption, a per-token mask that TE's packed (THD) attention does
    not take. Under TE the self-attention's input norm is fused into linear_qkv, so the
    cross-attention's norm is a TENorm of its own.
    """
    spec = layer_spec(use_te, causal=False)
    norm = spec.submodules.input_layernorm
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        norm = TENorm
    cross = MegatronModuleSpec(
        module=ConditionedCrossAttention,
        params={"attn_mask_type": AttnMaskType.padding, "condition_hidden": condition_hidden},
        submodules=CrossAttentionSubmodules(linear_q=ColumnParallelLinear,
                                            linear_kv=ColumnParallelLinear,
                                            core_attention=SDPAttention,
                                            linear_proj=RowParallelLinear))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, pre_cross_attn_layernorm=norm,
        cross_attention=cross, cross_attn_bda=get_bias_dropout_add))


def time_features(t: Tensor, width: int = TIME_FREQUENCIES) -> Tensor:
    """Sinusoidal features [n, width] of diffusion times t in (0, 1)."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs.to(t.device)[None, :]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=1)


class DiTPart(nn.Module):
    """Layers [first, last) of a DiT over packed clips.

    First part: the clip's noisy latents (1 - t) * x0 + t * noise through ``patch_embed``,
    plus ``time_embed`` (an MLP of sinusoidal time features) added to every token of
    the clip. Every layer: bidirectional self-attention within each clip (3-D RoPE over
    frame, row, col), then cross-attention from each clip to its own sample's part of
    the cond (the LM's normed hidden states of the whole microbatch), then the MLP.
    Last part: ``final_norm`` and ``output`` predict the noise; the loss is the squared
    error averaged over each token's features and summed over tokens.
    Emits "hidden" [T_video, 1, H] and "cond" (a copy of the one received) until the last.
    With sequence_parallel both are this rank's rows ([Note: sequence parallelism in the
    chunks]); the cross-attention's linear_kv gathers the cond's.
    """

    def __init__(self, model: ModelSpec, name: str, first: int, last: int, *, tp: int,
                 params_dtype: torch.dtype, dropout: float, seed: int,
                 use_te: bool = False, sequence_parallel: bool = False) -> None:
        super().__init__()
        spec = model.module(name)
        video = spec.video
        self.first, self.head_dim = first, spec.head_dim
        self.is_last = last == spec.num_layers
        patch = video.latent_channels * video.patch_size**2
        self.config = config = module_config(spec, tp, params_dtype, dropout, sequence_parallel)
        if first == 0:
            with seeded(seed, name, "embed"):
                self.patch_embed = nn.Linear(patch, spec.hidden_size, dtype=params_dtype)
                self.time_embed = nn.Sequential(
                    nn.Linear(TIME_FREQUENCIES, spec.hidden_size, dtype=params_dtype), nn.SiLU(),
                    nn.Linear(spec.hidden_size, spec.hidden_size, dtype=params_dtype))
        self.layers = build_layers(dit_layer_spec(model.condition_hidden(name), use_te), config,
                                   name, first, last, seed)
        if self.is_last:
            self.final_norm = SequenceParallelNorm(config, spec.hidden_size,
                                                   eps=config.layernorm_epsilon)
            with seeded(seed, name, "output"):
                self.output = nn.Linear(spec.hidden_size, patch, dtype=params_dtype)

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:
        clips, config = data.clips, self.config
        cond = flow["cond"]
        lengths = torch.tensor(clips.lengths, dtype=torch.int64).to(cond.device)
        if self.first == 0:
            t = clips.timesteps.repeat_interleave(lengths)[:, None]
            noisy = (1 - t) * clips.latents + t * clips.noise
            weight = self.patch_embed.weight
            time = self.time_embed(time_features(clips.timesteps).to(weight.dtype))
            hidden = self.patch_embed(noisy.to(weight.dtype))
            hidden = (hidden + time.repeat_interleave(lengths, dim=0))[:, None, :]
            hidden = scatter(hidden, config) if clips.lengths else hidden
        else:
            hidden = flow["hidden"]
        tokens, cond_tokens = sum(clips.lengths), data.text.tokens.numel()
        if hidden.size(0) != local_rows(tokens, config):
            raise ValueError(f"DiT hidden states hold {hidden.size(0)} rows, the "
                             f"sub-microbatch's {tokens} clip tokens {local_rows(tokens, config)}")
        if cond.size(0) != local_rows(cond_tokens, config):
            raise ValueError(f"the cond holds {cond.size(0)} rows, the microbatch's "
                             f"{cond_tokens} text tokens {local_rows(cond_tokens, config)}")
        if clips.lengths:  # a microbatch without clips only passes through (empty)
            cu_seqlens, packed_lengths = packed(clips.cu_seqlens, clips.lengths, config)
            rope = pad_rows(axial_rope(clips.positions, self.head_dim), sum(packed_lengths))
            with layer_rng(config):
                hidden = run_layers(self.layers, hidden, context=cond,
                                    context_mask=self._cond_mask(data, lengths, config),
                                    rotary_pos_emb=rope,
                                    packed_seq_params=packed_params(cu_seqlens, packed_lengths))
        if not self.is_last:
            return {"hidden": hidden, "cond": cond.clone()}, None, 0
        hidden = gather(self.final_norm(hidden), tokens, config)
        predicted = self.output(hidden)[:, 0, :]
        loss = (predicted.float() - clips.noise.float()).square().mean(dim=1).sum()
        return {}, loss, int(tokens)

    @staticmethod
    def _cond_mask(data: MicrobatchData, lengths: Tensor, config: TransformerConfig) -> Tensor:
        """[1, 1, T_video, S] True where a clip token may not attend a cond token (the
        cond token belongs to another sample); under sequence parallelism [1, 1,
        T_video', S'] over the padded sequences, padding rows attending every cond row
        (their outputs are dropped; a row attending nothing would make NaNs)."""
        clips, text = data.clips, data.text
        for clip, sample in zip(clips.indices, clips.samples):
            if text.sample_lengths[sample] == 0:
                raise ValueError(f"clip {clip} belongs to sample {sample}, which has no text "
                                 "tokens to be conditioned on")
        samples = torch.tensor(clips.samples, dtype=torch.int64).to(lengths.device)
        token_sample = samples.repeat_interleave(lengths)
        owners = torch.arange(len(text.sample_lengths)).to(lengths.device)
        cond_sample = owners.repeat_interleave(
            torch.tensor(text.sample_lengths, dtype=torch.int64).to(lengths.device))
        rows, cols = token_sample.numel(), cond_sample.numel()
        token_sample = pad_rows(token_sample, whole_rows(rows, config))
        cond_sample = torch.cat([cond_sample, cond_sample.new_full(
            (whole_rows(cols, config) - cols,), -1)])
        blocked = token_sample[:, None] != cond_sample[None, :]
        blocked[rows:] = False
        return blocked[None, None]
