"""LMM chunks on megatron-core blocks (torch and megatron-core are imported here).

So far: a scaled_dot_product_attention core attention with packed sequences and GQA,
layer specs (local + SDPA, or Transformer Engine on CUDA), the TransformerConfig of a
module, RoPE that runs off CUDA, and single-process CPU setup to build and run real layers.
"""

from .attention import SDPAttention
from .cpu_setup import build_layer, init_parallel, init_single_process, teardown
from .layer_specs import layer_spec, te_usable
from .rng import CpuRNGStatesTracker, seed_model_parallel
from .rotary import PortableRotaryEmbedding, rotary_embedding
from .transformer_config import transformer_config

__all__ = [
    "SDPAttention", "build_layer", "init_parallel", "init_single_process", "teardown",
    "layer_spec", "te_usable", "CpuRNGStatesTracker", "seed_model_parallel",
    "PortableRotaryEmbedding", "rotary_embedding", "transformer_config",
]

# LMM chunks (vision encoder, projector, LM, DiT) and their synthetic data.
from .data import MicrobatchData, microbatch_data, select  # noqa: E402
from .lmm import ChunkResult, LMMChunk, build_reference, stage_chunk  # noqa: E402

__all__ += ["MicrobatchData", "microbatch_data", "select", "ChunkResult", "LMMChunk",
            "build_reference", "stage_chunk"]
