"""megatron-core transformer layer specs: Transformer Engine on CUDA, local + SDPA elsewhere."""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec as MegatronModuleSpec

from .attention import SDPAttention
from .sequence_parallel import SequenceParallelNorm


def te_usable() -> bool:
    """Transformer Engine is importable and a CUDA device is present."""
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def layer_spec(use_te: bool | None = None, *, causal: bool = True) -> MegatronModuleSpec:
    """A GPT-style transformer layer spec.

    use_te: True for megatron-core's Transformer Engine spec, False for the local spec
    with SDPAttention as core attention, None to pick TE when te_usable().
    causal: causal self-attention (LMs); False for bidirectional encoders and DiTs.
    The norms follow TransformerConfig.normalization (LayerNorm or RMSNorm) in both specs.
    """
    if use_te is None:
        use_te = te_usable()
    if use_te:
        if not te_usable():
            raise ValueError("use_te=True needs transformer_engine and a CUDA device")
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        spec = get_gpt_layer_with_transformer_engine_spec()
        return _with_mask(spec, causal)
    # normalization="RMSNorm" selects WrappedTorchNorm, which builds LayerNorm or RMSNorm
    # from the config (apex's FusedLayerNorm, the other choice, has no RMSNorm); it
    # refuses sequence parallelism, so the norms are SequenceParallelNorm, the same
    # torch norm with its parameters marked for the tensor-parallel gradient sum.
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules,
                                                  core_attention=SDPAttention))
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=attention, input_layernorm=SequenceParallelNorm,
        pre_mlp_layernorm=SequenceParallelNorm))
    return _with_mask(spec, causal)


def _with_mask(spec: MegatronModuleSpec, causal: bool) -> MegatronModuleSpec:
    """A copy of spec whose self-attention uses the causal or no-mask type."""
    attention = spec.submodules.self_attention
    params = {**attention.params,
              "attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask}
    attention = dataclasses.replace(attention, params=params)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                   self_attention=attention))


# [Note: TE parameter names] Transformer Engine's spec fuses each layer's pre-attention
# and pre-MLP norms into the following linear (TELayerNormColumnParallelLinear), so the
# same weights carry other names than in the local spec. Checkpoints and references use
# the local names; a TE chunk translates on load.
_FUSED_NORMS = (
    (".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
    (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"),
)


def local_name(name: str) -> str:
    """A parameter's local-spec name, given its local or Transformer Engine name."""
    return _swap(name, 1, 0)


def te_name(name: str) -> str:
    """A parameter's Transformer Engine name, given its local-spec name."""
    return _swap(name, 0, 1)


def _swap(name: str, source: int, target: int) -> str:
    for pair in _FUSED_NORMS:
        head, found, tail = name.partition(pair[source])
        if found and tail in ("weight", "bias"):
            return f"{head}{pair[target]}{tail}"
    return name
