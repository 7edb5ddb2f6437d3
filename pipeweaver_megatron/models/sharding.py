"""Layout-free sharded state dicts of LMM chunks (megatron.core.dist_checkpointing).

Megatron's torch_dist checkpoints name every tensor globally: a ShardedTensor's key,
global shape and offsets say which piece of which whole tensor a rank holds, so a
checkpoint saved at one pipeline layout (or TP size) loads at another. An LMMChunk's
sharded_state_dict is built here from megatron-core's own methods on the modules its
parts hold, so its entries are exactly those of the model megatron-core would build:

- megatron-core modules (LanguageModelEmbedding, ColumnParallelLinear, a
  MultimodalProjector, a LanguageModule part, ...) give their own sharded_state_dict
  (megatron.core.transformer.utils.sharded_state_dict_default);
- our plain containers (a LLaVA part's ``decoder``, LlavaVisionPart, the YAML parts)
  are walked as MegatronModule.sharded_state_dict walks a module: their own tensors
  through make_sharded_tensors_for_checkpoint (replicated over TP), then their children;
- a ``layers`` ModuleDict of TransformerLayers keyed by global index goes through
  TransformerBlock.sharded_state_dict itself ([Note: layers as a block]).

With the LLaVA parts the result is, tensor for tensor, what a PP-1 LLaVAModel's
sharded_state_dict gives: ``language_model.decoder.layers.mlp.linear_fc1.weight`` of
global shape [num_layers, ...] at offset (layer, ...), the TP axes of each parallel
linear, the ``_extra_state`` ShardedObjects, and no ``language_model.output_layer.
_extra_state`` (GPTModel.sharded_state_dict drops it). The YAML parts' keys follow their
chunk names (``lm.layers.self_attention.linear_qkv.weight``, ``lm.embedding...``). The
entries' dict keys are always the chunk's state_dict names (Megatron's load hands the
loaded dict to load_state_dict); a chunk may give a module's checkpoint keys another
prefix (LMMChunk.checkpoint_key_prefixes: a GPT chunk's keys are GPTModel's, without
"language_model.").

[Note: layers as a block] TransformerBlock.sharded_state_dict reads, of the block, only
its config, its layers (in order), vp_stage, pg_collection.pp, tp_group and its other
children. A part's layers were built with a config of pipeline size 1 and layer_number
= global index + 1 (models/language.py build_layers), so the block's own arithmetic
(get_transformer_layer_offset = 0) gives ``layers.<global index>.`` as the state-dict
prefix, which is the ModuleDict's key, and (0, global index, num_layers) as the PP
offset: the layers of any part are numbered as in the whole model's block. _BlockView
hands the block method exactly those attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from torch import nn

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

__all__ = ["chunk_sharded_state_dict", "part_sharded_state_dict",
           "container_sharded_state_dict"]

_OURS = __name__.rsplit(".", 2)[0]  # "pipeweaver_megatron"


def chunk_sharded_state_dict(chunk: nn.Module, prefix: str = "",
                             sharded_offsets: tuple = (), metadata: dict | None = None,
                             key_prefixes: Mapping[str, str] | None = None) -> ShardedStateDict:
    """An LMMChunk's sharded_state_dict: each part's entries under ``<prefix><module>.``
    (the chunk's state_dict names, which Megatron's load passes to load_state_dict).

    key_prefixes: the checkpoint-key prefix of a module where it is not ``<module>.``
    (a GPT chunk's "language_model" keys are GPTModel's own, prefix ""). sharded_offsets
    must be empty (as for LLaVAModel and GPTModel: a chunk is a whole model's piece, its
    pipeline offsets come from the global layer indices)."""
    if sharded_offsets:
        raise ValueError(f"an LMM chunk takes no sharded_offsets, got {sharded_offsets}")
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    result: ShardedStateDict = {}
    for part in chunk.parts:
        name = f"{prefix}{part.module}."
        key = prefix + (key_prefixes or {}).get(part.module, f"{part.module}.")
        entries = part_sharded_state_dict(getattr(chunk, part.module), key, metadata)
        result.update({name + k[len(key):]: v for k, v in entries.items()})
    return result


def part_sharded_state_dict(module: nn.Module, prefix: str,
                            metadata: dict | None = None) -> ShardedStateDict:
    """One part's entries: a megatron-core module's own sharded_state_dict, or our
    container walked as MegatronModule walks a module (see the module docstring).

    A LanguageModule part stands for a GPTModel (LLaVA's or pretrain_gpt.py's), whose
    sharded_state_dict drops the (always empty) ``output_layer._extra_state`` of old
    GPT checkpoints; so does this one."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    if hasattr(module, "sharded_state_dict"):
        result = module.sharded_state_dict(prefix=prefix, sharded_offsets=(), metadata=metadata)
    else:
        result = container_sharded_state_dict(module, prefix, (), metadata)
    if isinstance(module, LanguageModule):
        extra = result.pop(f"{prefix}output_layer._extra_state", None)
        if extra is not None and extra.data:
            raise ValueError(f"{prefix}output_layer has extra state {extra.data!r}; GPTModel "
                             "checkpoints hold none")
    return result


def container_sharded_state_dict(module: nn.Module, prefix: str = "",
                                 sharded_offsets: tuple = (),
                                 metadata: dict | None = None) -> ShardedStateDict:
    """MegatronModule.sharded_state_dict for one of our plain nn.Module containers:
    its own tensors replicated over TP, then every child: a ``layers`` ModuleDict as a
    TransformerBlock's layers, another container of ours recursively, anything else by
    sharded_state_dict_default (its own method, or its state_dict replicated)."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    own: dict[str, Any] = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    result = make_sharded_tensors_for_checkpoint(
        own, prefix, sharded_offsets=sharded_offsets, tp_group=tp_group,
        dp_cp_group=metadata["dp_cp_group"])
    for name, child in module.named_children():
        if name == "layers" and isinstance(child, nn.ModuleDict):
            result.update(layers_sharded_state_dict(child, prefix, metadata))
        elif not hasattr(child, "sharded_state_dict") and type(child).__module__.startswith(
                f"{_OURS}."):
            result.update(container_sharded_state_dict(child, f"{prefix}{name}.",
                                                       sharded_offsets, metadata))
        else:
            result.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets,
                                                     metadata, tp_group=tp_group))
    return result


def layers_sharded_state_dict(layers: nn.ModuleDict, prefix: str,
                              metadata: dict) -> ShardedStateDict:
    """TransformerBlock.sharded_state_dict of layers keyed by global index, under
    ``<prefix>layers.`` ([Note: layers as a block])."""
    modules = list(layers.values())
    for key, layer in layers.items():
        if not isinstance(layer, TransformerLayer):
            raise TypeError(f"{prefix}layers.{key} is a {type(layer).__name__}, not a "
                            "megatron-core TransformerLayer")
        if layer.layer_number != int(key) + 1 or layer.config.pipeline_model_parallel_size != 1:
            raise ValueError(f"{prefix}layers.{key} has layer_number {layer.layer_number} and "
                             f"pipeline size {layer.config.pipeline_model_parallel_size}; "
                             "layers are built numbered globally at pipeline size 1")
    if not modules:
        return {}
    view = _BlockView(config=modules[0].config, layers=modules,
                      tp_group=parallel_state.get_tensor_model_parallel_group(),
                      pg_collection=_PipelineGroups(
                          pp=parallel_state.get_pipeline_model_parallel_group()))
    return TransformerBlock.sharded_state_dict(view, prefix, (), metadata)  # type: ignore[arg-type]


@dataclass
class _PipelineGroups:
    """The part of a ProcessGroupCollection that TransformerBlock.sharded_state_dict reads."""

    pp: Any


@dataclass
class _BlockView:
    """What TransformerBlock.sharded_state_dict reads of a block ([Note: layers as a
    block]): no children besides the layers (a part's final norm is its own child)."""

    config: TransformerConfig
    layers: list[TransformerLayer]
    tp_group: Any
    pg_collection: _PipelineGroups
    vp_stage: int | None = None

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        """None: the block's other modules are the container's (walked there)."""
        return iter(())
