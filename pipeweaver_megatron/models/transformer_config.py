"""megatron-core TransformerConfig from our ModuleSpec."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ModuleKind, ModuleSpec


def transformer_config(spec: ModuleSpec, *, tp: int = 1, num_layers: int | None = None,
                       params_dtype: torch.dtype = torch.float32, dropout: float = 0.0,
                       init_std: float = 0.02, sequence_parallel: bool = False
                       ) -> TransformerConfig:
    """The TransformerConfig of one transformer module (vision encoder, LM, generator).

    The LM uses RMSNorm, no linear biases and (with gated_mlp) SwiGLU; vision encoders
    and generators use LayerNorm, biases and GELU (gated_mlp switches to SwiGLU there
    too). Weights are created on the host (use_cpu_initialization) and moved by the
    caller; every fused kernel that needs CUDA, apex or Transformer Engine is off, so
    the same config runs on CPU and GPU. num_layers defaults to the module's layers.
    sequence_parallel takes effect with tp > 1 (models/sequence_parallel.py).
    """
    if not spec.is_transformer:
        raise ValueError(f"module {spec.name!r} is a {spec.kind.value}, not a transformer stack")
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    is_lm = spec.kind == ModuleKind.LANGUAGE_MODEL
    return TransformerConfig(
        num_layers=spec.num_layers if num_layers is None else num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.query_groups,
        kv_channels=spec.head_dim,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        normalization="RMSNorm" if is_lm else "LayerNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=spec.gated_mlp,
        activation_func=F.silu if spec.gated_mlp else F.gelu,
        add_bias_linear=not is_lm,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        init_method_std=init_std,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
