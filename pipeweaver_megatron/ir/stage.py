"""Stages (model chunks) and the Layout of a whole model.

[Note: stage dependencies] A stage depends on the stage holding the layer just before
each of its parts. For a part that starts a module (first layer 0), that is the stage
holding the last layer of every input module. An edge inside one module is *aligned*:
sub-microbatch k of the consumer needs sub-microbatch k of the producer. An edge across
modules is *gathering*: the consumer needs every sub-microbatch of the producer (the LM
needs all encoder outputs of its microbatch). Stages are numbered in pipeline order, so
every edge goes from a lower to a higher stage index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .errors import LayoutError


def matching_subs(aligned: bool, count: int, mine: int, sub: int) -> range:
    """Sub-microbatches of the stage at the other end of an edge that sub-microbatch
    `sub` of this stage exchanges data with: the same one over an aligned edge between
    equal counts, otherwise all `count` of them (see [Note: stage dependencies])."""
    return range(sub, sub + 1) if aligned and count == mine else range(count)


@dataclass(frozen=True, slots=True)
class Part:
    """Layers [first_layer, last_layer) of one module inside a stage."""

    module: str
    first_layer: int
    last_layer: int

    @property
    def num_layers(self) -> int:
        """Layers in this part."""
        return self.last_layer - self.first_layer


@dataclass(frozen=True, slots=True)
class Stage:
    """A virtual pipeline stage: one model chunk owned by one rank."""

    index: int
    rank: int
    parts: tuple[Part, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        """Modules this stage holds layers of, in order."""
        return tuple(p.module for p in self.parts)


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    """What the IR needs to know about a module: its size and its inputs."""

    name: str
    num_layers: int
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StageEdge:
    """Stage src feeds stage dst; aligned edges pair sub-microbatches one to one."""

    src: int
    dst: int
    aligned: bool


@dataclass(frozen=True)
class Layout:
    """All stages of a model, fixed for a training run."""

    num_ranks: int
    modules: tuple[ModuleInfo, ...]
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.num_ranks < 1:
            raise LayoutError(f"num_ranks must be >= 1, got {self.num_ranks}")
        names = [m.name for m in self.modules]
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                raise LayoutError(f"stage at position {i} has index {stage.index}")
            if not 0 <= stage.rank < self.num_ranks:
                raise LayoutError(f"stage {i}: rank {stage.rank} not in [0, {self.num_ranks})")
            if not stage.parts:
                raise LayoutError(f"stage {i} has no parts")
            for part in stage.parts:
                if part.module not in names:
                    raise LayoutError(f"stage {i}: unknown module {part.module!r}")
                if part.num_layers < 1:
                    raise LayoutError(f"stage {i}: empty part {part}")
        for module in self.modules:
            covered = 0
            for stage_index, part in self.parts_of(module.name):
                if part.first_layer != covered:
                    raise LayoutError(f"module {module.name!r}: stage {stage_index} starts at "
                                      f"layer {part.first_layer}, expected {covered}")
                covered = part.last_layer
            if covered != module.num_layers:
                raise LayoutError(f"module {module.name!r}: layers {covered}.."
                                  f"{module.num_layers} are on no stage")
            for name in module.inputs:
                if name not in names:
                    raise LayoutError(f"module {module.name!r}: unknown input {name!r}")
        for edge in self.edges:
            if edge.src >= edge.dst:
                raise LayoutError(f"stage {edge.dst} depends on stage {edge.src}, which is not "
                                  "earlier in pipeline order")

    def parts_of(self, module: str) -> list[tuple[int, Part]]:
        """(stage index, part) of a module, in layer order."""
        found = [(s.index, p) for s in self.stages for p in s.parts if p.module == module]
        return sorted(found, key=lambda item: item[1].first_layer)

    def module(self, name: str) -> ModuleInfo:
        """The module of this name."""
        return next(m for m in self.modules if m.name == name)

    def stage_of_layer(self, module: str, layer: int) -> int:
        """Index of the stage holding a module's layer."""
        for stage_index, part in self.parts_of(module):
            if part.first_layer <= layer < part.last_layer:
                return stage_index
        raise LayoutError(f"module {module!r} has no layer {layer}")

    @cached_property
    def edges(self) -> tuple[StageEdge, ...]:
        """Data dependencies between stages (see [Note: stage dependencies])."""
        found: dict[tuple[int, int], bool] = {}
        for stage in self.stages:
            for part in stage.parts:
                if part.first_layer > 0:
                    srcs = [(self.stage_of_layer(part.module, part.first_layer - 1), True)]
                else:
                    srcs = [(self.stage_of_layer(u, self.module(u).num_layers - 1), False)
                            for u in self.module(part.module).inputs]
                for src, aligned in srcs:
                    if src != stage.index:
                        key = (src, stage.index)
                        found[key] = found.get(key, True) and aligned
        return tuple(StageEdge(s, d, a) for (s, d), a in sorted(found.items()))

    def predecessors(self, stage: int) -> tuple[StageEdge, ...]:
        """Edges into a stage."""
        return tuple(e for e in self.edges if e.dst == stage)

    def successors(self, stage: int) -> tuple[StageEdge, ...]:
        """Edges out of a stage."""
        return tuple(e for e in self.edges if e.src == stage)

    def stages_of_rank(self, rank: int) -> tuple[Stage, ...]:
        """Stages a rank owns, in pipeline order (its model chunks)."""
        return tuple(s for s in self.stages if s.rank == rank)

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)

    def describe(self) -> str:
        """One line per stage: index, rank and parts."""
        lines = []
        for stage in self.stages:
            parts = ", ".join(f"{p.module}[{p.first_layer}:{p.last_layer}]" for p in stage.parts)
            lines.append(f"stage {stage.index:>3}  rank {stage.rank:>3}  {parts}")
        return "\n".join(lines)
