"""Offline chunk partitioner: modality-aware chunks fixed for the whole training run.

For each module i (PAPER.md, "Chunk partitioner"):
- B_i, the sub-microbatch size: the smallest size whose throughput (instances per
  second through one layer, priced by SEMU) keeps >= 95% of the best over the sizes
  tried. Encoders and generators split by instances (images, clips); the LM takes whole
  microbatches (B = 1).
- T_i, the latency of the whole module on one sub-microbatch of size B_i (forward +
  backward); with T_1 the smallest, module i gets K_i = floor(T_i / T_1) segments, i.e.
  P * K_i chunks of consecutive layers (at most one layer per chunk), balanced by SEMU's
  per-layer cost (the first layer carries the input weights, the last the output head),
  chunk c on rank c mod P.
- The projector rides on the last chunk of its encoder; stages of different modules are
  never mixed otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..config import ModelSpec, ModuleKind
from ..ir import Layout, Part, Stage
from ..schedules.placement import balanced_partition, module_infos
from ..semu import CostModel, ModuleShape, microbatch_shapes
from ..workload import GlobalBatch, TokenRules

EFFICIENCY = 0.95
"""Fraction of the best throughput the chosen sub-microbatch size must keep."""


class PartitionError(ValueError):
    """The model cannot be cut as asked (too few layers, memory)."""


@dataclass(frozen=True, kw_only=True)
class ChunkPlan:
    """The partitioner's decision and the Layout it builds."""

    layout: Layout
    sub_size: dict[str, int]
    """B_i: instances per sub-microbatch (images, clips; 1 microbatch for the LM)."""
    segments: dict[str, int]
    """K_i: segments (rows of P chunks) per module."""
    latency_s: dict[str, float]
    """T_i: forward + backward of the whole module on one sub-microbatch of size B_i."""


Reference = dict[str, ModuleShape]
"""Per module, a typical instance (encoders, generators) or microbatch (LM) shape."""


def reference_shapes(model: ModelSpec, batch: GlobalBatch) -> Reference:
    """Typical shapes of a sample of the training data: the median instance of every
    encoder and generator, the median microbatch of the LM."""
    rules = TokenRules.from_model(model)
    shapes = [microbatch_shapes(model, mb, rules) for mb in batch.microbatches]
    out: Reference = {}
    for name in model.order:
        found = [sh[name] for sh in shapes if name in sh and sh[name].seqs]
        if not found:
            continue
        if model.module(name).kind == ModuleKind.LANGUAGE_MODEL:
            out[name] = sorted(found, key=lambda sh: sh.tokens)[len(found) // 2]
            continue
        instances = sorted((seq, sh.cond[i] if sh.cond else None)
                           for sh in found for i, seq in enumerate(sh.seqs))
        seq, cond = instances[len(instances) // 2]
        out[name] = ModuleShape((seq,), (cond,) if cond is not None else ())
    return out


def unit_shape(model: ModelSpec, name: str, size: int,
               reference: Reference | None = None) -> ModuleShape:
    """A representative shape of `size` instances (or one microbatch for the LM): from
    the reference when it has the module, else the largest the config allows."""
    module = model.module(name)
    typical = (reference or {}).get(name)
    if typical is not None:
        if module.kind == ModuleKind.LANGUAGE_MODEL:
            return typical
        return ModuleShape(typical.seqs * size, typical.cond * size)
    if module.kind in (ModuleKind.VISION_ENCODER, ModuleKind.PROJECTOR):
        encoder = module if module.image else model.module(model.upstream(name)[0])
        rule = encoder.image
        return ModuleShape((rule.encoder_tokens(rule.image_size, rule.image_size),) * size)
    if module.kind == ModuleKind.GENERATOR:
        rule = module.video
        seconds = rule.max_seconds_per_microbatch / rule.max_clips_per_microbatch
        return ModuleShape((rule.tokens(seconds),) * size, (64,) * size)
    return ModuleShape((model.parallel.microbatch_tokens,))


def max_instances(model: ModelSpec, name: str) -> int:
    module = model.module(name)
    if module.kind == ModuleKind.VISION_ENCODER:
        return model.parallel.max_images_per_microbatch
    if module.kind == ModuleKind.GENERATOR:
        return module.video.max_clips_per_microbatch
    return 1


def choose_sub_size(costs: CostModel, name: str, reference: Reference | None = None) -> int:
    """B_i: smallest power-of-two size within EFFICIENCY of the best throughput."""
    model, limit = costs.model, max_instances(costs.model, name)
    sizes = sorted({min(2 ** k, limit) for k in range(0, limit.bit_length() + 1)})
    throughput = {}
    for size in sizes:
        cost = costs.stage_cost((Part(name, 1, 2),), {name: unit_shape(model, name, size, reference)})
        throughput[size] = size / (cost.forward_s + cost.backward_s)
    best = max(throughput.values())
    return min(s for s in sizes if throughput[s] >= EFFICIENCY * best)


def partition(costs: CostModel, num_ranks: int | None = None,
              capacity_bytes: float | None = None, reference: GlobalBatch | None = None,
              search: bool = False) -> ChunkPlan:
    """Cut every transformer module into P*K_i chunks; the projector joins its encoder.

    Latencies come from typical shapes of `reference` (a sample of the training data:
    in a text-to-video model the LM only reads captions) or, without it, from the
    largest shapes the config allows. Raises PartitionError when a rank's weights, gradients and optimizer state alone
    exceed capacity_bytes (default: the hardware's memory). search: refine the cut
    across modules by the plans of `reference` (cut_search.py; needs a reference)."""
    model = costs.model
    ranks = num_ranks or model.parallel.pp
    stacks = [n for n in model.order if model.module(n).is_transformer]
    typical = reference_shapes(model, reference) if reference is not None else None
    sizes = {n: choose_sub_size(costs, n, typical) for n in stacks}
    latency = {}
    for name in stacks:
        layers = model.module(name).num_layers
        cost = costs.stage_cost((Part(name, 0, layers),),
                                {name: unit_shape(model, name, sizes[name], typical)})
        latency[name] = cost.forward_s + cost.backward_s
    fastest = min(latency.values())
    segments = {}
    for name in stacks:
        layers = model.module(name).num_layers
        if layers < ranks:
            raise PartitionError(f"module {name!r} has {layers} layers, fewer than pp={ranks}")
        segments[name] = max(1, min(int(latency[name] // fastest), layers // ranks))
    layout = chunk_layout(model, ranks, {
        name: _layer_bounds(costs, name, ranks * segments[name],
                            unit_shape(model, name, sizes[name], typical)) for name in stacks})
    plan = ChunkPlan(layout=layout, sub_size=sizes, segments=segments, latency_s=latency)
    capacity = capacity_bytes or costs.hardware.memory_capacity
    check_capacity(costs, plan, capacity)
    if search and reference is not None:
        from .cut_search import search_cuts

        return search_cuts(costs, plan, [reference], capacity).plan
    return plan


def chunk_layout(model: ModelSpec, ranks: int, bounds: Mapping[str, Sequence[tuple[int, int]]],
                 offsets: Mapping[str, int] | None = None) -> Layout:
    """The layout of chunks cut at `bounds` ([lo, hi) layers per transformer module, in
    pipeline order): chunk c of a module on rank (c + its offset) mod ranks, the
    projector on its encoder's last chunk."""
    stages: list[Stage] = []
    for name, runs in bounds.items():
        offset = (offsets or {}).get(name, 0)
        for c, (lo, hi) in enumerate(runs):
            parts = [Part(name, lo, hi)]
            if c == len(runs) - 1:
                parts += [Part(p, 0, 1) for p in model.downstream(name)
                          if model.module(p).kind == ModuleKind.PROJECTOR]
            stages.append(Stage(len(stages), (c + offset) % ranks, tuple(parts)))
    return Layout(ranks, module_infos(model), tuple(stages))


def layer_bounds(costs: CostModel, name: str, chunks: int, sub_size: dict[str, int],
                 reference: GlobalBatch | None) -> list[tuple[int, int]]:
    """partition()'s balanced [lo, hi) layer runs of one module cut into `chunks`."""
    typical = reference_shapes(costs.model, reference) if reference is not None else None
    return _layer_bounds(costs, name, chunks,
                         unit_shape(costs.model, name, sub_size[name], typical))


def _layer_bounds(costs: CostModel, name: str, chunks: int, unit: ModuleShape) -> list[tuple[int, int]]:
    """Consecutive layer runs balanced by SEMU's per-layer time."""
    layers = costs.model.module(name).num_layers
    shape = {name: unit}

    # A chunk pays the runtime's per-action overhead once, not once per layer.
    fixed = sum(costs.calibration.runtime_terms(name).overhead_s)

    def micros(lo: int) -> int:
        cost = costs.stage_cost((Part(name, lo, lo + 1),), shape)
        return max(1, round((cost.forward_s + cost.backward_s - fixed) * 1e6))

    middle = micros(1) if layers > 2 else 0
    weights = [micros(0)] + [middle] * (layers - 2) + ([micros(layers - 1)] if layers > 1 else [])
    return balanced_partition(weights, chunks)


def check_capacity(costs: CostModel, plan: ChunkPlan, capacity_bytes: float) -> None:
    """Fail clearly when the weights and optimizer state alone exceed a rank's memory."""
    for rank, static in enumerate(costs.static_memory(plan.layout)):
        if static.total_bytes > capacity_bytes:
            raise PartitionError(
                f"rank {rank} needs {static.total_bytes / 2**30:.1f} GiB for weights, "
                f"gradients and optimizer state, more than {capacity_bytes / 2**30:.1f} GiB")
