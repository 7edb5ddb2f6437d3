"""Schedule-aware partitioning: the offline cut refined by the plans it leads to.

partition() balances each module on its own (equal SEMU time per chunk, chunk c on rank
c mod P). A pipeline is balanced across modules, though: a rank may take more of the
encoder if it takes less of the LM. Starting from partition()'s cut, a steepest-descent
search over single moves

- shift one chunk boundary of one module by one layer,
- rotate one module's chunks by one rank (chunk c on rank c + r mod P),
- one segment more or fewer for one module (its chunks rebalanced by partition()'s rule),

scores each candidate cut by the mean SEMU-predicted iteration time of a short plan of
the reference batches (the planner with a fixed evaluation count, so every rank that
cuts the layout gets the same one), takes the best move while it gains at least
MIN_GAIN, and stops at a local optimum or after MAX_ROUNDS. A cut whose static memory
does not fit, or whose plan does not fit, is never taken.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..ir import Layout
from ..semu import CostModel
from ..workload import GlobalBatch
from .partition import ChunkPlan, PartitionError, check_capacity, chunk_layout, layer_bounds

MIN_GAIN = 0.005
"""A move must shorten the predicted iteration by this share."""
MAX_ROUNDS = 12
EVALUATIONS = 8
"""Candidate schedules per plan when scoring a cut (deterministic)."""


@dataclass(frozen=True)
class Cut:
    """Per transformer module: its chunks' [lo, hi) layers and its rank rotation."""

    bounds: tuple[tuple[tuple[int, int], ...], ...]
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class CutSearch:
    """What the search did."""

    plan: ChunkPlan
    balanced_s: float
    """Mean predicted iteration time of partition()'s cut."""
    chosen_s: float
    """... and of the cut chosen."""
    scored: int
    """Cuts scored."""
    rounds: int


def search_cuts(costs: CostModel, start: ChunkPlan, batches: Sequence[GlobalBatch],
                capacity_bytes: float) -> CutSearch:
    """The best cut within single moves of `start` (see the module note)."""
    from .search import PipeWeaverPlanner, SearchSettings  # search imports partition

    model, ranks = costs.model, start.layout.num_ranks
    stacks = [n for n in model.order if model.module(n).is_transformer]
    settings = SearchSettings(max_evaluations=EVALUATIONS)
    scores: dict[Cut, float] = {}

    def chunks_of(cut: Cut) -> ChunkPlan:
        layout = chunk_layout(model, ranks, dict(zip(stacks, cut.bounds)),
                              dict(zip(stacks, cut.offsets)))
        segments = {n: len(b) // ranks for n, b in zip(stacks, cut.bounds)}
        return replace(start, layout=layout, segments=segments)

    def score(cut: Cut) -> float:
        if cut not in scores:
            try:
                plan = chunks_of(cut)
                check_capacity(costs, plan, capacity_bytes)
                planner = PipeWeaverPlanner(costs, plan, settings, capacity_bytes)
                results = [planner.plan(b, 3_600_000.0, seed=0) for b in batches]
                fits = all(r.fits for r in results)
                scores[cut] = (sum(r.predicted_iteration_time_s for r in results)
                               / len(results)) if fits else float("inf")
            except PartitionError:
                scores[cut] = float("inf")
        return scores[cut]

    def neighbours(cut: Cut) -> list[Cut]:
        out = []
        for i, name in enumerate(stacks):
            bounds = list(cut.bounds[i])
            for j in range(len(bounds) - 1):  # the boundary between chunks j and j + 1
                for step in (-1, 1):
                    edge = bounds[j][1] + step
                    if bounds[j][0] < edge < bounds[j + 1][1]:
                        moved = list(bounds)
                        moved[j], moved[j + 1] = (bounds[j][0], edge), (edge, bounds[j + 1][1])
                        out.append(_with(cut, i, bounds=tuple(moved)))
            if ranks > 1:
                out.append(_with(cut, i, offset=(cut.offsets[i] + 1) % ranks))
            layers = model.module(name).num_layers
            for segments in (len(bounds) // ranks - 1, len(bounds) // ranks + 1):
                if 1 <= segments and segments * ranks <= layers:
                    rebalanced = layer_bounds(costs, name, segments * ranks, start.sub_size,
                                              batches[0])
                    out.append(_with(cut, i, bounds=tuple(rebalanced)))
        return out

    current = _cut_of(start.layout, stacks)
    balanced = best = score(current)
    rounds = 0
    while rounds < MAX_ROUNDS:
        rounds += 1
        candidate = min(neighbours(current), key=score, default=None)
        if candidate is None or score(candidate) > best * (1 - MIN_GAIN):
            break
        current, best = candidate, score(candidate)
    return CutSearch(plan=chunks_of(current), balanced_s=balanced, chosen_s=best,
                     scored=len(scores), rounds=rounds)


def _cut_of(layout: Layout, stacks: list[str]) -> Cut:
    bounds, offsets = [], []
    for name in stacks:
        stages = [s for s in layout.stages if s.parts[0].module == name]
        bounds.append(tuple((s.parts[0].first_layer, s.parts[0].last_layer) for s in stages))
        offsets.append(stages[0].rank)
    return Cut(tuple(bounds), tuple(offsets))


def _with(cut: Cut, i: int, bounds=None, offset=None) -> Cut:
    all_bounds, offsets = list(cut.bounds), list(cut.offsets)
    if bounds is not None:
        all_bounds[i] = bounds
    if offset is not None:
        offsets[i] = offset
    return Cut(tuple(all_bounds), tuple(offsets))


__all__ = ["Cut", "CutSearch", "MIN_GAIN", "search_cuts"]
