"""Single-process megatron-core on CPU: gloo world, parallel_state, RNG, and layers.

Tests and benchmarks build real megatron-core transformer layers without CUDA:

    init_single_process(seed=0)
    layer = build_layer(load_model("tiny-vlm").module("lm"))
    ...
    teardown()

Multi-process callers initialise torch.distributed themselves and call
init_parallel(tp, pp, seed, dev).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..config import ModuleSpec
from .host_collectives import use_host_buffers
from .layer_specs import layer_spec
from .rng import seed_model_parallel
from .transformer_config import transformer_config


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 0,
                  dev: torch.device | None = None) -> None:
    """parallel_state for an initialised torch.distributed world, and the RNG seeds.

    dev is the device the layers will run on (the host when None); it decides whether
    megatron's CUDA RNG tracker or the CPU one is seeded.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_single_process "
                           "or dist.init_process_group first")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)
    elif parallel_state.get_tensor_model_parallel_world_size() != tp:
        raise RuntimeError(f"parallel_state already holds TP "
                           f"{parallel_state.get_tensor_model_parallel_world_size()}, not {tp}")
    host = torch.device(torch.cpu.current_device())
    seed_model_parallel(seed, host if dev is None else dev)
    if tp > 1 and (dev is None or dev.type == "cpu"):
        use_host_buffers()  # sequence parallelism's gathers on the host (host_collectives.py)


def init_single_process(seed: int = 0) -> None:
    """A gloo world of one process (in-memory store, no port) with TP = PP = 1."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_parallel(1, 1, seed)


def teardown() -> None:
    """Undo init_single_process / init_parallel (parallel_state, then the process group)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def build_layer(module_spec: ModuleSpec, tp: int = 1, *, layer_number: int = 1,
                params_dtype: torch.dtype = torch.float32, dropout: float = 0.0,
                use_te: bool | None = None) -> TransformerLayer:
    """One megatron-core TransformerLayer of a transformer module, weights on the host.

    The config comes from transformer_config(module_spec, ...) with num_layers=1; the
    attention is causal for the LM and bidirectional for encoders and generators.
    parallel_state must be initialised with tensor-parallel size tp. Move the layer
    with ``.to(dev)`` to run it elsewhere.
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("parallel_state is not initialised; call init_single_process first")
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world != tp:
        raise ValueError(f"tp={tp} but parallel_state has tensor-parallel size {world}")
    config = transformer_config(module_spec, tp=tp, num_layers=1, params_dtype=params_dtype,
                                dropout=dropout)
    spec = layer_spec(use_te, causal=module_spec.causal)
    layer = build_module(spec, config=config, layer_number=layer_number)
    assert isinstance(layer, TransformerLayer)
    return layer
