"""The tensors a stage sends downstream for one (microbatch, sub-microbatch), and those it
receives: the planning side's exact view of what models/lmm.py's chunks exchange, so
every P2P shape is known from the plan (pure Python, no torch).

[Note: stage messages] Tensors follow Megatron's [sequence, batch=1, hidden] layout and
are named by what they carry. A stage emits the output of its last part:

- vision encoder layers (also its last layer: the final norm lives with the projector):
  ``("hidden", (T_enc, 1, H_vision))``, T_enc the encoder tokens of the sub-microbatch's
  images, packed in image order;
- the projector (patch merger): ``("image_embeds", (T_img, H_lm))``, T_img the LM tokens
  of those images; 2-D, and never sharded by sequence parallelism (the LM's embedding
  scatters it into the sequence before any split);
- LM layers: ``("hidden", (S, 1, H_lm))``, S the microbatch's LM tokens (text + image);
  the LM's last stage emits nothing when the LM has a head (its loss), and
  ``("cond", (S, 1, H_lm))`` (the final-normed hidden states) when it only conditions a
  generator (text-to-video);
- generator (DiT) layers: ``("hidden", (T_video, 1, H_dit))``, T_video the generator tokens
  of the sub-microbatch's clips, and the whole microbatch's ``("cond", (S, 1, H_lm))``
  forwarded unchanged, so every DiT stage can cross-attend (the IR only has an edge from
  the LM to the first DiT stage); the DiT's last stage emits nothing (its loss).

With sequence parallelism, the sequence dim of "hidden" and "cond" is ceil(n / tp): each
tensor-parallel rank holds its shard of the sequence padded to a multiple of tp.

The gradient sent back upstream has exactly the specs of the forward message. A stage
is split like its first part's module; a stage holding several modules (Megatron's static
layout) is never split. Over a gathering edge a stage receives one message per producer
sub-microbatch: the LM's first stage one "image_embeds" per vision sub-microbatch (the
runtime concatenates them in sub order, which is image order since sub-microbatches are
consecutive runs of images), and the LM's last stage one "cond" gradient per DiT
sub-microbatch (the runtime sums them). A module with no instances in a microbatch
(count 0: no images, or no clips) runs no stage of its own; then nothing arrives over
its edges (the LM takes no image embeddings), or nothing comes back (the LM's "cond"
of a text-to-video microbatch without clips gets no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..config import ModelSpec, ModuleKind
from .stage import Layout, Stage, matching_subs
from ..workload import Microbatch, TokenRules


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a message: its name, its shape and its dtype's name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message a stage receives: from stage src's sub-microbatch sub."""

    src: int
    sub: int
    tensors: tuple[TensorSpec, ...]


def split_owner(model: ModelSpec, module: str) -> str:
    """The module whose sub-microbatch split a module follows (a projector follows its
    encoder)."""
    if model.module(module).kind == ModuleKind.PROJECTOR:
        return model.upstream(module)[0]
    return module


def instances(model: ModelSpec, module: str, microbatch: Microbatch) -> tuple[int, ...]:
    """Indices of the module's instances in a microbatch: images for an encoder or
    projector, clips for a generator, samples for the LM (as planner.split_batch counts
    them; the LM is never split)."""
    kind = model.module(module).kind
    if kind in (ModuleKind.VISION_ENCODER, ModuleKind.PROJECTOR):
        return tuple(range(microbatch.num_images))
    if kind == ModuleKind.GENERATOR:
        return tuple(range(microbatch.num_clips))
    return tuple(range(len(microbatch.samples)))


def stage_members(model: ModelSpec, stage: Stage, microbatch: Microbatch,
                  members: Sequence[int] | None) -> tuple[int, ...] | None:
    """members checked against the stage: None (the whole microbatch) or a tuple of
    instance indices of the stage's module; a multi-module stage takes the whole one."""
    if members is None:
        return None
    members = tuple(members)
    first = stage.parts[0].module
    every = instances(model, first, microbatch)
    if len({split_owner(model, p.module) for p in stage.parts}) > 1:
        if members != every:
            raise ValueError(f"stage {stage.index} holds several modules and is never split; "
                             f"members must be None or all of {every}, got {members}")
        return None
    if any(i not in every for i in members):
        raise ValueError(f"stage {stage.index}: members {members} are not instances of "
                         f"{first!r} in microbatch {microbatch.index} ({len(every)} of them)")
    return members


def _check_stage(model: ModelSpec, layout: Layout, stage: int) -> Stage:
    if not 0 <= stage < layout.num_stages:
        raise ValueError(f"stage {stage} not in [0, {layout.num_stages})")
    found = layout.stages[stage]
    order = model.order
    for part in found.parts:
        if part.module not in order:
            raise ValueError(f"stage {stage}: {model.name} has no module {part.module!r}")
    positions = [order.index(p.module) for p in found.parts]
    if positions != sorted(positions) or len(set(positions)) != len(positions):
        raise ValueError(f"stage {stage}: parts are not in the model's module order")
    return found


def stage_outputs(model: ModelSpec, layout: Layout, stage: int, microbatch: Microbatch,
                  members: Sequence[int] | None, rules: TokenRules, dtype: str, tp: int = 1,
                  sequence_parallel: bool = False) -> tuple[TensorSpec, ...]:
    """The tensors a stage sends downstream for one (microbatch, sub-microbatch) (see
    [Note: stage messages]); members: instance indices (images or clips of the
    microbatch) of the sub-microbatch for the stage's module, None for all."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    found = _check_stage(model, layout, stage)
    chosen = stage_members(model, found, microbatch, members)
    last = found.parts[-1]
    spec = model.module(last.module)
    split = split_owner(model, last.module) == split_owner(model, found.parts[0].module)
    picked = instances(model, last.module, microbatch) if chosen is None or not split else chosen

    def seq(n: int) -> int:
        return math.ceil(n / tp) if sequence_parallel else n

    def lm_cond() -> TensorSpec:
        lm = model.language_model
        return TensorSpec("cond", (seq(microbatch.lm_tokens(rules)), 1, lm.hidden_size), dtype)

    more = last.last_layer < spec.num_layers
    if spec.kind == ModuleKind.VISION_ENCODER:
        images = microbatch.images
        tokens = sum(rules.encoder_tokens(images[i]) for i in picked)
        return (TensorSpec("hidden", (seq(tokens), 1, spec.hidden_size), dtype),)
    if spec.kind == ModuleKind.PROJECTOR:
        images = microbatch.images
        tokens = sum(rules.image_lm_tokens(images[i]) for i in picked)
        return (TensorSpec("image_embeds", (tokens, spec.hidden_size), dtype),)
    if spec.kind == ModuleKind.LANGUAGE_MODEL:
        if more:
            shape = (seq(microbatch.lm_tokens(rules)), 1, spec.hidden_size)
            return (TensorSpec("hidden", shape, dtype),)
        return () if model.has_head(spec.name) else (lm_cond(),)
    if more:
        clips = microbatch.clips
        tokens = sum(rules.generator_tokens(clips[i]) for i in picked)
        return (TensorSpec("hidden", (seq(tokens), 1, spec.hidden_size), dtype), lm_cond())
    return ()


def stage_inputs(model: ModelSpec, layout: Layout, stage: int, microbatch: Microbatch,
                 members: Sequence[int] | None, rules: TokenRules, dtype: str, tp: int = 1,
                 sequence_parallel: bool = False,
                 subs: Mapping[str, Sequence[Sequence[int]]] | None = None,
                 ) -> tuple[Incoming, ...]:
    """The messages a stage receives for one (microbatch, sub-microbatch): per
    predecessor edge, one per matching producer sub-microbatch (ir.matching_subs), in
    edge then sub order.

    subs: per module, the members of each of this microbatch's sub-microbatches
    (planner.SubMicrobatches.members[module][m]); a module not listed has one
    sub-microbatch holding every instance. members must be one of the stage's module's.
    """
    found = _check_stage(model, layout, stage)
    subs = subs or {}

    def subs_of(module: str) -> list[tuple[int, ...] | None]:
        listed = subs.get(module)
        return [None] if listed is None else [tuple(s) for s in listed]

    mine = subs_of(found.parts[0].module)
    key = None if members is None else tuple(members)
    if key is None and len(mine) == 1:
        index = 0
    elif key in mine:
        index = mine.index(key)
    elif key is not None and mine == [None] and key == instances(model, found.parts[0].module,
                                                                 microbatch):
        index = 0
    else:
        raise ValueError(f"stage {stage}: members {key} are none of module "
                         f"{found.parts[0].module!r}'s sub-microbatches {mine}")
    received: list[Incoming] = []
    for edge in layout.predecessors(stage):
        theirs = subs_of(layout.stages[edge.src].parts[0].module)
        if edge.aligned and len(theirs) != len(mine):
            raise ValueError(f"aligned edge {edge.src} -> {stage}: {len(theirs)} producer and "
                             f"{len(mine)} consumer sub-microbatches; a module's stages must be "
                             "split alike")
        for j in matching_subs(edge.aligned, len(theirs), len(mine), index):
            tensors = stage_outputs(model, layout, edge.src, microbatch, theirs[j], rules, dtype,
                                    tp, sequence_parallel)
            received.append(Incoming(edge.src, j, tensors))
    return tuple(received)


def merged_inputs(received: Sequence[Incoming]) -> tuple[TensorSpec, ...]:
    """What a chunk's forward is given: the received tensors by name, "image_embeds" of
    several messages concatenated along dim 0 in message order (see [Note: stage
    messages]); any other name must arrive once."""
    merged: dict[str, TensorSpec] = {}
    for message in received:
        for tensor in message.tensors:
            seen = merged.get(tensor.name)
            if seen is None:
                merged[tensor.name] = tensor
            elif tensor.name == "image_embeds" and seen.shape[1:] == tensor.shape[1:]:
                merged[tensor.name] = TensorSpec(
                    seen.name, (seen.shape[0] + tensor.shape[0],) + seen.shape[1:], seen.dtype)
            else:
                raise ValueError(f"tensor {tensor.name!r} arrives in more than one message")
    return tuple(merged.values())
