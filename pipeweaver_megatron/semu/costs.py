"""The cost model: op latencies from the roofline with calibrated factors, and the cost
of a stage on one (sub-)microbatch, built once per structure and shape (reuse).

[Note: subgraph reuse] A stage's cost depends only on its structure (per part: module,
layer count, whether it holds the module's input or output layers), the shape signature
of each part's module (sorted sequence lengths), TP/SP, the memory strategy, and the
hardware and calibration of the CostModel. Equal keys share one entry, whether they
come from another rank or segment (spatial reuse: equal chunks of one module on
different stages) or another microbatch, candidate schedule or iteration (temporal
reuse: the same shapes again). With reuse off every request rebuilds and re-prices the
graph, which gives identical numbers more slowly. The runtime terms of the calibration
(per chunk kind overhead and scale, refitted online by semu/online.py) come last: each
entry is kept before them too, so `recalibrated` re-applies new terms to every stage
priced so far without building a graph again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from ..config import HardwareProfile, ModelSpec, ModuleKind
from ..ir import Layout, Part
from .calibration import Calibration
from .graph import Parallel, PartGraph, part_graph
from .memory import StaticMemory, static_memory
from .ops import Op, OpClass, Phase
from .shapes import ModuleShape

_EMPTY = ModuleShape(())


@dataclass(frozen=True, kw_only=True, slots=True)
class StageCost:
    """Time and memory of one stage for one (sub-)microbatch on one TP rank."""

    forward_s: float
    backward_input_s: float
    backward_weight_s: float
    recompute_s: float
    """Extra forward before the backward when every layer is recomputed (0 otherwise)."""
    saved_bytes: float
    """Activations held from the forward's start to the backward's end."""
    output_bytes: float
    """The P2P payload this stage sends downstream (and receives back as a gradient)."""
    model_flops: float
    """Useful forward FLOPs of all TP ranks."""

    @property
    def backward_s(self) -> float:
        """Backward including recompute."""
        return self.backward_input_s + self.backward_weight_s + self.recompute_s


@dataclass
class ReuseStats:
    """Hit and miss counters of the stage-cost cache."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class CostModel:
    """Prices ops and stages for one model on one hardware profile."""

    model: ModelSpec
    hardware: HardwareProfile
    calibration: Calibration | None = None
    reuse: bool = True
    tp: int = 0
    """TP size; 0 takes the model's."""
    sequence_parallel: bool | None = None
    stats: ReuseStats = field(default_factory=ReuseStats)
    _cache: dict = field(default_factory=dict, repr=False)
    _shape_ids: dict = field(default_factory=dict, repr=False)
    _static: dict = field(default_factory=dict, repr=False)
    _raw: dict = field(default_factory=dict, repr=False)
    """stage_key -> the StageCost before the runtime terms (shared by recalibrated)."""

    def __post_init__(self) -> None:
        self.calibration = self.calibration or Calibration(hardware=self.hardware.name)
        par = self.model.parallel
        sp = par.sequence_parallel if self.sequence_parallel is None else self.sequence_parallel
        cal = self.calibration
        self.parallel = Parallel(tp=self.tp or par.tp, sequence_parallel=sp,
                                 dtype_bytes=self.hardware.dtype_bytes,
                                 causal_fraction=cal.causal_fraction,
                                 local_spec=self.hardware.layer_spec == "local")
        self.roofline = replace(self.hardware,
                                peak_flops=cal.peak_flops or self.hardware.peak_flops,
                                memory_bandwidth=cal.memory_bandwidth or self.hardware.memory_bandwidth)
        """The hardware with the calibration's measured peaks: what op latencies use."""
        self._factors = {c: cal.factor(c) for c in OpClass}
        self._layer = {m.name: cal.layer(m.kind.value) for m in self.model.modules}
        self._module_layers = {m.name: m.num_layers for m in self.model.modules}

    def op_latency(self, op: Op) -> float:
        """overhead + max(a_f*FLOPs/F, a_m*bytes/B_mem, a_n*net/B_net) for one instance."""
        return self._factors[op.cls].latency(op.flops, op.mem_bytes, op.net_bytes,
                                             self.roofline)

    def structure(self, parts: Sequence[Part]) -> tuple:
        """The structural half of a stage key: per part module, layers, input, output."""
        return tuple((p.module, p.num_layers, p.first_layer == 0,
                      p.last_layer == self._module_layers[p.module]) for p in parts)

    def shape_id(self, shape: ModuleShape) -> int:
        """A small integer naming a shape signature, so keys hash cheaply."""
        return self._shape_ids.setdefault(shape.signature, len(self._shape_ids))

    def stage_key(self, parts: Sequence[Part], shapes: Mapping[str, ModuleShape],
                  recompute: bool) -> tuple:
        """Structure + shape signature (see [Note: subgraph reuse])."""
        return (self.structure(parts),
                tuple(self.shape_id(shapes.get(p.module, _EMPTY)) for p in parts), recompute)

    def cached(self, key: tuple) -> StageCost | None:
        """A cached cost by stage_key (counted as a hit), or None (nothing counted)."""
        if not self.reuse:
            return None
        found = self._cache.get(key)
        if found is not None:
            self.stats.hits += 1
        return found

    def stage_cost(self, parts: Sequence[Part], shapes: Mapping[str, ModuleShape],
                   recompute: bool = False, key: tuple | None = None) -> StageCost:
        """Cost of a stage's parts on one (sub-)microbatch; key may be given precomputed
        (stage_key's value) by callers that price many stages."""
        if not self.reuse:
            self.stats.misses += 1
            return self._build(parts, shapes, recompute)
        key = key or self.stage_key(parts, shapes, recompute)
        cost = self._cache.get(key)
        if cost is None:
            self.stats.misses += 1
            raw = self._raw.get(key)
            if raw is None:
                raw = self._raw[key] = self._build_raw(parts, shapes, recompute)
            cost = self._cache[key] = self._with_terms(raw, parts)
        else:
            self.stats.hits += 1
        return cost

    def recalibrated(self, calibration: Calibration) -> "CostModel":
        """This model with other runtime terms (action overheads and scales, per chunk
        kind, iteration overhead): it shares the graphs priced so far, which those terms
        do not change. Any other difference in the calibration is an error."""
        same = replace(calibration, action_overhead_s=self.calibration.action_overhead_s,
                       action_scale=self.calibration.action_scale,
                       chunk_runtime=self.calibration.chunk_runtime,
                       iteration_overhead_s=self.calibration.iteration_overhead_s)
        if same != self.calibration:
            raise ValueError("recalibrated: the calibrations differ beyond their runtime terms")
        out = CostModel(self.model, self.hardware, calibration, self.reuse, self.tp,
                        self.sequence_parallel)
        out._raw, out._shape_ids, out._static = self._raw, self._shape_ids, self._static
        return out

    def static_memory(self, layout: Layout, distributed_optimizer: bool = True) -> list[StaticMemory]:
        """Weights, gradients and optimizer state per pipeline rank (cached per layout)."""
        key = (id(layout), distributed_optimizer)
        found = self._static.get(key)
        if found is None or found[0] is not layout:
            found = self._static[key] = (layout, static_memory(
                self.model, layout, self.parallel.tp, self.hardware.dtype_bytes,
                distributed_optimizer))
        return found[1]

    def graphs(self, parts: Sequence[Part], shapes: Mapping[str, ModuleShape]) -> list[PartGraph]:
        """The op graph of every part."""
        return [part_graph(self.model, p.module, p.first_layer, p.last_layer,
                           shapes.get(p.module, _EMPTY), self.parallel) for p in parts]

    def _output_bytes(self, parts: Sequence[Part], graphs: Sequence[PartGraph],
                      shapes: Mapping[str, ModuleShape]) -> float:
        """The payload a stage sends downstream, as ir.messages shapes it: the last
        part's output over the sequence (each TP rank's ceil(n / tp) rows under sequence
        parallelism; the projector's merged tokens whole), and the cond a DiT stage
        passes on where the shapes hold the LM's (the whole microbatch's)."""
        found = next(((p, g) for p, g in zip(reversed(parts), reversed(graphs))
                      if g.output_tokens), None)
        if found is None:
            return 0.0
        part, graph = found
        shard = self.parallel.seq_shard
        spec = self.model.module(part.module)
        rows = graph.output_tokens if spec.kind == ModuleKind.PROJECTOR else \
            -(-graph.output_tokens // shard)
        out = rows * graph.output_hidden
        if spec.kind == ModuleKind.GENERATOR and part.last_layer < spec.num_layers:
            lm = self.model.language_model  # a sub-microbatch's shapes hold its modules only
            if lm.name in shapes:
                out += -(-shapes[lm.name].tokens // shard) * lm.hidden_size
        return float(self.parallel.dtype_bytes * out)

    def _build(self, parts: Sequence[Part], shapes: Mapping[str, ModuleShape],
               recompute: bool) -> StageCost:
        return self._with_terms(self._build_raw(parts, shapes, recompute), parts)

    def _build_raw(self, parts: Sequence[Part], shapes: Mapping[str, ModuleShape],
                   recompute: bool) -> StageCost:
        """A stage's cost before the calibration's runtime terms."""
        times = {Phase.FORWARD: 0.0, Phase.BACKWARD_INPUT: 0.0, Phase.BACKWARD_WEIGHT: 0.0}
        again, saved, flops = 0.0, 0.0, 0.0
        graphs = self.graphs(parts, shapes)
        for part, graph in zip(parts, graphs):
            layer = self._layer[part.module]
            inside = {id(op) for op in graph.layer_ops}
            for op in graph.ops:
                latency = op.count * self.op_latency(op)
                if id(op) in inside:
                    phase = layer.forward if op.phase == Phase.FORWARD else layer.backward
                    latency *= phase.scale(op.cls)
                times[op.phase] += latency
            times[Phase.FORWARD] += layer.forward.overhead_s * graph.layers
            times[Phase.BACKWARD_INPUT] += layer.backward.overhead_s * graph.layers
            if recompute:
                again += sum(op.count * self.op_latency(op) * layer.forward.scale(op.cls)
                             for op in graph.layer_forward) + layer.forward.overhead_s * graph.layers
            saved += graph.checkpoint_bytes if recompute else graph.saved_bytes
            flops += graph.model_flops
        return StageCost(forward_s=times[Phase.FORWARD],
                         backward_input_s=times[Phase.BACKWARD_INPUT],
                         backward_weight_s=times[Phase.BACKWARD_WEIGHT], recompute_s=again,
                         saved_bytes=saved, output_bytes=self._output_bytes(parts, graphs, shapes),
                         model_flops=flops)

    def _with_terms(self, raw: StageCost, parts: Sequence[Part]) -> StageCost:
        """The calibration's runtime terms of the stage's chunk kind applied to raw."""
        terms = self.calibration.runtime_terms("+".join(p.module for p in parts))
        forward_extra, backward_extra = terms.overhead_s
        forward_scale, backward_scale = terms.scale
        return replace(raw, forward_s=raw.forward_s * forward_scale + forward_extra,
                       backward_input_s=raw.backward_input_s * backward_scale + backward_extra,
                       backward_weight_s=raw.backward_weight_s * backward_scale,
                       recompute_s=raw.recompute_s * forward_scale)
