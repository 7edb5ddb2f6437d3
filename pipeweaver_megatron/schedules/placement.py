"""Megatron's static placement of an LMM onto pipeline stages.

Megatron-LM puts the whole vision encoder and the projector on the first pipeline stage
together with the first LM layers, and splits the remaining layers (the rest of the LM,
then a generator if any) into stages of roughly equal parameter count. With interleaving
(vp > 1), model chunk c of rank r is stage c*P + r.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelSpec
from ..ir import Layout, ModuleInfo, Part, Stage
from .errors import ScheduleError


@dataclass(frozen=True, slots=True)
class _Unit:
    module: str
    layer: int
    weight: int


def module_infos(model: ModelSpec) -> tuple[ModuleInfo, ...]:
    """The IR's view of the model's modules, in topological order."""
    return tuple(ModuleInfo(n, model.module(n).num_layers, model.upstream(n))
                 for n in model.order)


def megatron_layout(model: ModelSpec, pp: int, vp: int = 1) -> Layout:
    """Stages of Megatron's static placement for pp ranks with vp chunks each."""
    num_stages = pp * vp
    units = _units(model)
    lm = model.language_model.name
    order = list(model.order)
    forced = [u for u in units if order.index(u.module) < order.index(lm)]
    rest = units[len(forced):]
    if len(rest) < num_stages:
        raise ScheduleError(f"{num_stages} stages (pp={pp} x vp={vp}) need at least "
                            f"{num_stages} LM/generator layers, the model has {len(rest)}")
    bounds = balanced_partition([u.weight for u in rest], num_stages,
                                first_extra=sum(u.weight for u in forced))
    stages = []
    for index, (lo, hi) in enumerate(bounds):
        members = (forced if index == 0 else []) + rest[lo:hi]
        stages.append(Stage(index, index % pp, _parts(members)))
    return Layout(pp, module_infos(model), tuple(stages))


def _units(model: ModelSpec) -> list[_Unit]:
    units = []
    for name in model.order:
        for layer in range(model.module(name).num_layers):
            units.append(_Unit(name, layer, model.part_params(name, layer, layer + 1)))
    return units


def _parts(units: list[_Unit]) -> tuple[Part, ...]:
    parts: list[Part] = []
    for unit in units:
        if parts and parts[-1].module == unit.module and parts[-1].last_layer == unit.layer:
            parts[-1] = Part(unit.module, parts[-1].first_layer, unit.layer + 1)
        else:
            parts.append(Part(unit.module, unit.layer, unit.layer + 1))
    return tuple(parts)


def balanced_partition(weights: list[int], parts: int, first_extra: int = 0) -> list[tuple[int, int]]:
    """Split weights into `parts` non-empty consecutive runs; the first run also carries
    first_extra. First the heaviest run is made as light as possible (M*), then, among
    splits with every run <= M*, the sum of squared loads is minimised so that the runs
    other than the heaviest are balanced too. Returns [lo, hi) index pairs."""
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def load(j: int, i: int) -> int:
        return prefix[i] - prefix[j] + (first_extra if j == 0 else 0)

    cap = _split(len(weights), parts, load, lambda acc, run: max(acc, run), 0)[0]
    total, cuts = _split(len(weights), parts, load,
                         lambda acc, run: acc + run * run if run <= cap else float("inf"), 0)
    assert total != float("inf")
    return cuts


def _split(n: int, parts: int, load, combine, start) -> tuple[float, list[tuple[int, int]]]:
    """Exact DP over the cut positions of n items into `parts` non-empty runs, minimising
    combine(accumulated, run load) folded over the runs."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = start
    for p in range(1, parts + 1):
        for i in range(p, n - (parts - p) + 1):
            for j in range(p - 1, i):
                if best[p - 1][j] == inf:
                    continue
                value = combine(best[p - 1][j], load(j, i))
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    bounds, hi = [], n
    for p in range(parts, 0, -1):
        lo = cut[p][hi]
        bounds.append((lo, hi))
        hi = lo
    return best[parts][n], bounds[::-1]
