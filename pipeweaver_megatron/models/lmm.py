"""LMM model chunks on megatron-core building blocks, for any Stage of a Layout.

An LMMChunk holds the parts of one stage (or, for the single-process reference, every
layer of the model) and chains them: vision encoder -> projector -> LM -> DiT. Its
parameters are named ``<module>.<what>`` with layers under ``<module>.layers.<global
index>`` (``vision.patch_embed.weight``, ``vision.layers.3.self_attention.linear_qkv.weight``,
``projector.merger.encoder.linear_fc1.weight``, ``lm.embedding.word_embeddings.weight``,
``lm.layers.7.mlp.linear_fc2.weight``, ``lm.final_norm.weight``, ``lm.output_layer.weight``,
``dit.layers.2.cross_attention.linear_kv.weight``, ``dit.output.weight``), so any stage's
chunk loads its tensors from the reference's state_dict by name and gradients compare by
name. Every layer (and every embedding or head) is initialised from a seed of (seed,
module, layer), so chunks built with the same seed already hold the reference's weights.

[Note: chunk forward] ``chunk(inputs, data) -> ChunkResult(outputs, loss, num_tokens)``:

- inputs: the received tensors by name, as ir.messages.stage_inputs describes them.
  Over a gathering edge the runtime passes "image_embeds" of all the microbatch's vision
  sub-microbatches concatenated in sub order (image order); a text-only microbatch
  passes none. The LM's last stage sums the "cond" gradients of all DiT sub-microbatches.
- data: models.data.select(microbatch_data, stage's first module, members), i.e. the
  stage's sub-microbatch (the text is always the whole microbatch's).
- outputs: exactly ir.messages.stage_outputs (names, order, shapes); never views
  (Megatron's deallocate_output_tensor may free them after sending). Backward: the
  runtime calls torch.autograd.backward(outputs, their gradients) (or the loss's
  backward) and sends each input's .grad upstream, splitting a concatenated
  "image_embeds" gradient back into its messages' rows. An input that reached no output
  (the cond of a microbatch without clips) gets no .grad: send zeros.
- loss: on a chunk ending a module with a head, the sum of per-token losses (LM: masked
  cross-entropy; DiT: squared error averaged over each token's features) and
  num_tokens the tokens in it, Megatron's (loss, num_tokens) convention, so pipeline
  and reference sum identically; otherwise None and 0.

Runs under megatron-core's parallel_state with tensor parallelism tp. Layer spec: use_te
True is megatron-core's Transformer Engine spec, False the local spec with SDPAttention
(CPU + gloo or CUDA + NCCL alike), None (the default) TE when models.te_usable(). load_from
shards a tp=1 reference for each TP rank and reads either spec's parameter names
([Note: TE parameter names]). sequence_parallel (with tp > 1) runs every module
sequence-parallel, its hidden states and messages being each rank's rows
([Note: sequence parallelism in the chunks] in models/sequence_parallel.py); gradients of
parameters marked ``sequence_parallel`` are then partial over tensor parallelism until
all_reduce_sequence_parallel_grads. Build chunks on the host and move them with
``.to(device)``; data follows with MicrobatchData.to.

[Note: LLaVA chunks] With ``recipe=`` (a models.llava.LlavaRecipe) the parts are
megatron-core's LLaVAModel as pretrain_vlm.py builds it (models/llava.py): the model's
modules must be "vision_model" (vision_encoder), "vision_projection" (projector) and
"language_model", parameters carry LLaVAModel.state_dict()'s names with global layer
indices (``vision_model.conv1.weight``,
``vision_model.decoder.layers.1.mlp.linear_fc1.weight``,
``vision_projection.encoder.linear_fc1.weight``,
``language_model.embedding.word_embeddings.weight``,
``language_model.decoder.layers.3.self_attention.linear_qkv.weight``,
``language_model.decoder.final_layernorm.weight``, ``language_model.output_layer.weight``),
so a PP-1 LLaVAModel's state_dict loads by name. The recipe's configs and layer specs
decide dtype, dropout and Transformer Engine (params_dtype, dropout and use_te are not
used; seed still seeds every layer's initialisation); data comes from
models.llava_data.llava_microbatch. The language config's sequence_parallel runs the LM
sequence-parallel ([Note: LLaVA sequence parallelism] in models/llava.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.utils import make_viewless_tensor

from ..config import ModelSpec, ModuleKind
from ..ir import Layout, Part
from .data import MicrobatchData
from .dit import DiTPart
from .language import LanguageModelPart
from .layer_specs import local_name, te_usable
from .vision import ProjectorPart, VisionEncoderPart

if TYPE_CHECKING:
    from .llava import LlavaRecipe


class ChunkResult(NamedTuple):
    """What a chunk's forward returns (see [Note: chunk forward])."""

    outputs: dict[str, Tensor]
    loss: Tensor | None
    num_tokens: int


def check_parts(model: ModelSpec, parts: tuple[Part, ...]) -> None:
    """Parts must be non-empty layer ranges of distinct modules that chain: each part
    after the first starts its module and follows the end of one of its inputs."""
    if not parts:
        raise ValueError("a chunk needs at least one part")
    for part in parts:
        spec = model.module(part.module)
        if not 0 <= part.first_layer < part.last_layer <= spec.num_layers:
            raise ValueError(f"part {part} is not a layer range of {part.module!r} "
                             f"({spec.num_layers} layers)")
    for before, after in zip(parts, parts[1:]):
        if (after.first_layer != 0 or before.module not in model.upstream(after.module)
                or before.last_layer != model.module(before.module).num_layers):
            raise ValueError(f"parts {before} and {after} do not chain ({after.module!r} must "
                             f"start right after all of {before.module!r})")


class LMMChunk(nn.Module):
    """The parts of one stage as one module (see the module docstring)."""

    def __init__(self, model: ModelSpec, parts: tuple[Part, ...], *, tp: int = 1,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 dropout: float = 0.0, seed: int = 0, use_te: bool | None = None,
                 recipe: LlavaRecipe | None = None) -> None:
        super().__init__()
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("parallel_state is not initialised; call init_single_process "
                               "or init_parallel first")
        world = parallel_state.get_tensor_model_parallel_world_size()
        if world != tp:
            raise ValueError(f"tp={tp} but parallel_state has tensor-parallel size {world}")
        parts = tuple(parts)
        check_parts(model, parts)
        self.model, self.parts, self.tp, self.recipe = model, parts, tp, recipe
        self.use_te = te_usable() if use_te is None else use_te
        self.sequence_parallel = sequence_parallel and tp > 1
        options = dict(tp=tp, params_dtype=params_dtype, dropout=dropout, seed=seed,
                       use_te=self.use_te, sequence_parallel=self.sequence_parallel)
        if recipe is not None and sequence_parallel:
            raise ValueError("LLaVA chunks take sequence parallelism from the recipe's "
                             "language config, not from sequence_parallel=")
        if recipe is not None:
            _check_recipe(model, recipe, tp)
        for part in parts:
            if hasattr(self, part.module):
                raise ValueError(f"module name {part.module!r} clashes with an attribute of "
                                 "nn.Module")
            if recipe is None:
                built = _build_part(model, part, options)
            else:
                from .llava import llava_part
                built = llava_part(recipe, model.module(part.module).kind.value,
                                   part.first_layer, part.last_layer, seed=seed)
            self.add_module(part.module, built)

    @property
    def pre_process(self) -> bool:
        """The chunk starts a module, so it embeds that module's input from the data."""
        return self.parts[0].first_layer == 0

    @property
    def post_process(self) -> bool:
        """The chunk ends a module with a head, so it computes a loss."""
        last = self.parts[-1]
        spec = self.model.module(last.module)
        return (last.last_layer == spec.num_layers and self.model.has_head(last.module)
                and spec.kind in (ModuleKind.LANGUAGE_MODEL, ModuleKind.GENERATOR))

    def expected_inputs(self) -> tuple[str, ...]:
        """Names of the tensors the chunk's first part consumes ("image_embeds" may be
        absent for a microbatch without images)."""
        part = self.parts[0]
        kind = self.model.module(part.module).kind
        if kind == ModuleKind.GENERATOR:
            return ("hidden", "cond") if part.first_layer else ("cond",)
        if kind == ModuleKind.LANGUAGE_MODEL and part.first_layer == 0:
            return ("image_embeds",) if self.model.upstream(part.module) else ()
        if kind == ModuleKind.VISION_ENCODER and part.first_layer == 0:
            return ()
        return ("hidden",)

    def set_input_tensor(self, inputs: Mapping[str, Tensor] | None) -> None:
        """Megatron's protocol: the received tensors for the next forward."""
        self.input_tensors = dict(inputs or {})

    def forward(self, inputs: Mapping[str, Tensor], data: MicrobatchData) -> ChunkResult:
        """Run the parts in order (see [Note: chunk forward])."""
        unexpected = set(inputs) - set(self.expected_inputs())
        if unexpected:
            raise ValueError(f"chunk {self.describe()} does not take {sorted(unexpected)}; it "
                             f"takes {list(self.expected_inputs())}")
        flow, loss, tokens = dict(inputs), None, 0
        for part in self.parts:
            flow, loss, tokens = getattr(self, part.module)(flow, data)
        outputs = {name: make_viewless_tensor(t, requires_grad=t.requires_grad, keep_graph=True)
                   for name, t in flow.items()}
        return ChunkResult(outputs, loss, tokens)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False) -> dict:
        """Megatron's torch-format checkpoint hook (MegatronModule's): the state_dict."""
        return self.state_dict(prefix=prefix, keep_vars=keep_vars)

    checkpoint_key_prefixes: ClassVar[Mapping[str, str]] = {}
    """Modules whose torch_dist checkpoint keys take another prefix than ``<module>.``
    (a chunk of a single-model script: {"language_model": ""}, GPTModel's own keys)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Megatron's torch_dist checkpoint hook: layout-free ShardedTensors named as the
        whole model's (models/sharding.py; with a recipe, a PP-1 LLaVAModel's)."""
        from .sharding import chunk_sharded_state_dict

        return chunk_sharded_state_dict(self, prefix, sharded_offsets, metadata,
                                        self.checkpoint_key_prefixes)

    def describe(self) -> str:
        """The parts as text, e.g. ``vision[0:8]+projector[0:1]+lm[0:2]``."""
        return "+".join(f"{p.module}[{p.first_layer}:{p.last_layer}]" for p in self.parts)

    def load_from(self, reference: Mapping[str, Tensor]) -> LMMChunk:
        """Copy this chunk's tensors from a whole-model (tp=1) state_dict by name (local
        or Transformer Engine names, either way); with tensor parallelism each rank takes
        its shard. Returns self."""
        rank = parallel_state.get_tensor_model_parallel_rank()
        own = dict(self.named_parameters())
        by_local = {local_name(k): v for k, v in reference.items()}
        with torch.no_grad():
            for name, tensor in self.state_dict(keep_vars=True).items():
                if not isinstance(tensor, Tensor) or name.endswith("_extra_state"):
                    continue  # megatron's and TE's _extra_state entries
                if local_name(name) not in by_local:
                    raise KeyError(f"the reference has no tensor {name!r}")
                full = by_local[local_name(name)]
                param = own.get(name, tensor)
                part = shard(full, param, self._gated(name), rank, self.tp)
                if part.shape != tensor.shape:
                    raise ValueError(f"{name}: reference shard {tuple(part.shape)} does not fit "
                                     f"{tuple(tensor.shape)}")
                tensor.copy_(part)
        return self

    def _gated(self, name: str) -> bool:
        module = name.split(".", 1)[0]
        if self.recipe is not None:
            from .llava import recipe_config
            gated = recipe_config(self.recipe, module).gated_linear_unit
            return gated and (".mlp.linear_fc1." in name or name.startswith(
                f"{module}.encoder.linear_fc1."))
        return self.model.module(module).gated_mlp and ".mlp.linear_fc1." in name


def shard(full: Tensor, param: Tensor, gated: bool, rank: int, world: int) -> Tensor:
    """A tensor-parallel rank's piece of a whole tensor, as megatron-core splits it
    (partition_dim of a tensor_model_parallel parameter; a gated fc1 splits its gate and
    up halves separately)."""
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if gated:
        halves = full.chunk(2, dim=dim)
        return torch.cat([h.chunk(world, dim=dim)[rank] for h in halves], dim=dim)
    return full.chunk(world, dim=dim)[rank]


def _check_recipe(model: ModelSpec, recipe: LlavaRecipe, tp: int) -> None:
    """The model's modules are LLaVA's, with the recipe's layers ([Note: LLaVA chunks])."""
    from .llava import LANGUAGE_MODEL, VISION_MODEL, VISION_PROJECTION, recipe_config

    names = {ModuleKind.VISION_ENCODER: VISION_MODEL, ModuleKind.PROJECTOR: VISION_PROJECTION,
             ModuleKind.LANGUAGE_MODEL: LANGUAGE_MODEL}
    for module in model.modules:
        if names.get(module.kind) != module.name:
            raise ValueError(f"a LLaVA recipe needs modules {sorted(names.values())}; "
                             f"{model.name} has {module.kind.value} {module.name!r}")
        config = recipe_config(recipe, module.name)
        if module.kind != ModuleKind.PROJECTOR and config.num_layers != module.num_layers:
            raise ValueError(f"{module.name!r} has {module.num_layers} layers in the model "
                             f"spec, {config.num_layers} in the recipe")
        if config.tensor_model_parallel_size != tp:
            raise ValueError(f"{module.name!r}: tp={tp} but the recipe's config has "
                             f"tensor_model_parallel_size {config.tensor_model_parallel_size}")
        if config.context_parallel_size != 1:
            raise ValueError(f"{module.name!r}: LLaVA chunks run without context parallelism")
        if config.sequence_parallel and module.kind != ModuleKind.LANGUAGE_MODEL:
            raise ValueError(f"{module.name!r}: only the LM runs sequence-parallel "
                             "(pretrain_vlm.py turns it off for the ViT and the projector)")


def _build_part(model: ModelSpec, part: Part, options: dict) -> nn.Module:
    kind = model.module(part.module).kind
    if kind == ModuleKind.PROJECTOR:
        return ProjectorPart(model, part.module, **options)
    builder = {ModuleKind.VISION_ENCODER: VisionEncoderPart,
               ModuleKind.LANGUAGE_MODEL: LanguageModelPart,
               ModuleKind.GENERATOR: DiTPart}[kind]
    return builder(model, part.module, part.first_layer, part.last_layer, **options)


def build_reference(model: ModelSpec, **options) -> LMMChunk:
    """One chunk holding every layer of the model: the single-process reference.
    options: LMMChunk's keyword options (recipe= for LLaVA)."""
    parts = tuple(Part(name, 0, model.module(name).num_layers) for name in model.order)
    return LMMChunk(model, parts, **options)


def stage_chunk(model: ModelSpec, layout: Layout, stage: int, **options) -> LMMChunk:
    """The chunk of one stage of a layout. options: LMMChunk's keyword options (recipe=
    for LLaVA)."""
    return LMMChunk(model, layout.stages[stage].parts, **options)
