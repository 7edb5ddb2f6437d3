"""The planner API: one call plans one global batch (PAPER.md, "Search, three phases").

plan(batch, budget, seed) (budget: wall-clock ms, or a SearchBudget of wall and CPU time and
a patience in evaluations):
1. split the batch into sub-microbatches (the layout is the offline ChunkPlan's);
2. price every (stage, microbatch, sub) once without and with full recompute (SEMU,
   subgraph reuse);
3. search: MCTS over group priorities (mcts.py); each candidate is interleaved by the
   greedy dual-queue (interleave.py), memory-optimised per layer (memopt.py) and scored
   by SEMU's simulated iteration time; a candidate whose simulated peak exceeds the
   memory capacity scores worse than every candidate that fits (and worse the larger
   its excess), so a plan that fits is always preferred;
4. return the best plan found within the budget (anytime), re-simulated in detail.

The interleaver limits live activations with the plain saved bytes ("base") or the
fully recomputed ones ("recompute"), leaving the memory optimiser to pick per-layer
strategies that fit; the better gate on the starting orders is kept for the whole
search. (A gate halfway between never won on VLM-S, VLM-M or VLM-L and cost candidates.) Everything random comes from random.Random(seed): a given seed and
evaluation count (max_evaluations) always give the same plan; a wall-clock budget may
stop a slower machine earlier.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from ..config import ModelSpec
from ..ir import Layout, Op, ScheduleTable
from ..semu import CostModel, PricedBatch, SimResult, price, simulate
from ..workload import GlobalBatch, TokenRules
from .interleave import Problem, build_problem, interleave
from .mcts import SequenceTree
from .candidates import CandidateCache, Strategy
from .memopt import MemoryPlan, optimize_memory, summarize, transformer_layers
from .partition import ChunkPlan, partition
from .submicro import SubMicrobatches, split_batch

GIB = 2**30
_INFEASIBLE = 1e6
"""Seconds added to the score of a candidate that does not fit in memory."""


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """Knobs of the per-batch search (defaults follow the paper where it gives them)."""

    reorder: bool = True
    """Phase 1, MCTS; off: the default order (microbatch, then module)."""
    fill_bubbles: bool = True
    """Phase 2 as the paper has it; off: strict 1F1B alternation in priority order."""
    memory_optimization: bool = True
    """Phase 3; off: one strategy for the whole batch, as a Megatron user would set it:
    no recompute (the interleaver keeps the plain activations within the budget) or
    every layer recomputed (it keeps the recomputed ones within), whichever is faster."""
    window: int = 4
    rollouts: int = 4
    alpha: float = 2.0
    beta: float = 0.5
    max_candidates: int = 10
    ilp_gap: float = 0.05
    ilp_nodes: int = 0
    """Branch-and-bound nodes per rank when the rounded LP relaxation is more than
    ilp_gap from its bound (0: keep the rounded solution). A work limit, not a time
    limit, so plans do not depend on the machine's speed. 200 nodes cost T2V-S seconds
    per candidate and gained nothing on VLM-M, T2V-S or T2V-L (SEMU), hence 0."""
    max_evaluations: int | None = None


@dataclass(frozen=True, kw_only=True)
class SearchBudget:
    """When one search stops: at whichever limit comes first (the best plan so far is
    returned; the final detailed simulation comes after)."""

    wall_ms: float
    """Wall-clock time from the call."""
    cpu_ms: float | None = None
    """The planner process's own CPU time (time.process_time). A planner at idle
    priority on a machine whose cores all train gets the CPU only while a rank waits:
    a CPU budget gives it the same search however busy the machine is."""
    patience: int | None = None
    """Stop after this many evaluations in a row without a gain of at least `gain`
    (deterministic: counted in evaluations, not time)."""
    gain: float = 1e-3

    def __post_init__(self) -> None:
        if self.wall_ms < 0 or (self.cpu_ms is not None and self.cpu_ms < 0):
            raise ValueError(f"search budget: wall_ms and cpu_ms must be >= 0, got "
                             f"{self.wall_ms} and {self.cpu_ms}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"search budget: patience must be >= 1, got {self.patience}")


class _Clock:
    """The budget's limits, measured from construction."""

    def __init__(self, budget: SearchBudget) -> None:
        self.budget = budget
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def over(self, evaluations: int, reserve: int = 0) -> bool:
        """True when the limits leave no room for `reserve` more evaluations at the
        average cost so far (evaluations made since construction)."""
        wall, cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0
        scale = 1 + reserve / max(evaluations, 1)
        if wall * scale >= self.budget.wall_ms / 1000:
            return True
        return self.budget.cpu_ms is not None and cpu * scale >= self.budget.cpu_ms / 1000

    def stalled(self, evaluations: int, last_gain: int) -> bool:
        patience = self.budget.patience
        return patience is not None and evaluations - last_gain >= patience


@dataclass(frozen=True, kw_only=True)
class SearchStats:
    evaluations: int
    elapsed_ms: float
    gate: str
    history: tuple[tuple[float, int, float], ...]
    """(elapsed ms, evaluations, best predicted iteration time) at every improvement."""

    def to_dict(self) -> dict:
        return {"candidates_evaluated": self.evaluations, "elapsed_ms": self.elapsed_ms,
                "gate": self.gate,
                "best_score_history": [{"elapsed_ms": t, "evaluations": n, "iteration_time_s": s}
                                       for t, n, s in self.history]}


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """Everything the runtime and the user need about one planned batch."""

    layout: Layout
    sub_microbatches: SubMicrobatches
    table: ScheduleTable
    memory: MemoryPlan
    simulation: SimResult
    """The predicted timeline and per-rank memory (with per-action detail)."""
    lower_bound_s: float
    """Busiest rank's compute without recompute + gradient reduction + optimizer step."""
    balance_bound_s: float
    """All ranks' compute without recompute / ranks + the slowest gradient reduction and
    optimizer step: the bound of a perfectly balanced partition (below lower_bound_s
    by the partition's imbalance)."""
    capacity_bytes: float
    search: SearchStats

    @property
    def predicted_iteration_time_s(self) -> float:
        return self.simulation.iteration_time_s

    @property
    def peak_memory_gib(self) -> list[float]:
        return self.simulation.peak_memory_gib

    @property
    def fits(self) -> bool:
        return max(self.simulation.peak_memory_bytes) <= self.capacity_bytes

    def to_dict(self) -> dict:
        return {"schedule": self.table.to_json(),
                "predicted_iteration_time_s": self.predicted_iteration_time_s,
                "lower_bound_s": self.lower_bound_s, "balance_bound_s": self.balance_bound_s,
                "peak_memory_gib": self.peak_memory_gib,
                "capacity_gib": self.capacity_bytes / GIB,
                "bubble_ratio": self.simulation.bubble_ratio, "mfu": self.simulation.mfu,
                "sub_microbatches": {m: list(c) for m, c in self.sub_microbatches.counts.items()},
                "memory_strategy": summarize(self.memory),
                "search": self.search.to_dict()}


@dataclass
class _Batch:
    """One batch's fixed inputs to every candidate evaluation."""

    subs: SubMicrobatches
    base: PricedBatch
    full: PricedBatch
    problem: Problem
    budget: list[float]
    cache: CandidateCache
    gate: str
    evaluations: int = 0
    last: SimResult | None = None
    best: tuple[float, tuple, object, object] = (math.inf, (), None, None)
    """(score, sequence, memory plan, table) of the best candidate so far."""
    history: list = field(default_factory=list)
    gain: float = 1e-3
    """The budget's smallest gain that counts as progress."""
    last_gain: int = 0
    """Evaluation count at the last gain of at least `gain`."""


class PipeWeaverPlanner:
    """Plans batches for one model: the chunk layout is cut once, at construction."""

    def __init__(self, costs: CostModel, chunks: ChunkPlan | None = None,
                 settings: SearchSettings = SearchSettings(),
                 capacity_bytes: float | None = None) -> None:
        self.costs, self.settings = costs, settings
        self.capacity = capacity_bytes or costs.hardware.memory_capacity
        self.chunks = chunks or partition(costs, capacity_bytes=self.capacity)
        self.layout = self.chunks.layout
        self.rules = TokenRules.from_model(costs.model)
        self.layers = transformer_layers(costs.model, self.layout)
        self.static = [s.total_bytes for s in costs.static_memory(self.layout)]

    @property
    def model(self) -> ModelSpec:
        return self.costs.model

    def plan(self, batch: GlobalBatch, budget_ms: float | SearchBudget = 1000.0,
             seed: int = 0) -> PlanResult:
        """budget_ms: wall-clock milliseconds, or a SearchBudget."""
        started = time.perf_counter()
        budget = budget_ms if isinstance(budget_ms, SearchBudget) else SearchBudget(
            wall_ms=budget_ms)
        clock = _Clock(budget)
        unbounded = self.settings.max_evaluations is None
        subs = split_batch(self.model, batch, self.rules, self.chunks.sub_size)
        every = range(self.layout.num_stages)
        base = price(self.costs, self.layout, subs.shapes)
        full = price(self.costs, self.layout, subs.shapes, recompute=every)
        capacity = [self.capacity - s for s in self.static]
        count = len(batch.microbatches)
        gates = {"base": None, "recompute": _saved(full)}
        cache = CandidateCache(self.costs.hardware.host_bandwidth, self.settings.max_candidates)
        state = None
        for gate_name, gate in gates.items():
            problem = build_problem(self.costs, self.layout, subs.counts, base.costs, count, gate)
            for start in starting_orders(problem)[:2 if self.settings.reorder else 1]:
                if state is not None and unbounded and clock.over(1):
                    break  # out of time: keep the best start found so far
                trial = _Batch(subs, base, full, problem, list(capacity), cache, gate_name,
                               gain=budget.gain)
                self._fit_budget(trial, start, started)
                if state is None or trial.best[0] < state[2].best[0]:
                    state = (gate_name, start, trial)
        gate_name, start, work = state
        work.history = [(h[0], 0, h[2]) for h in work.history[-1:]]
        work.evaluations = work.last_gain = 0
        if self.settings.reorder:
            limit = self.settings.max_evaluations

            def stop() -> bool:
                if limit is not None:
                    return work.evaluations >= limit
                # Leave time for the final interleave and detailed simulation (about two
                # candidates); the starting orders count as evaluations made.
                return (clock.over(work.evaluations + len(gates), reserve=2)
                        or clock.stalled(work.evaluations, work.last_gain))

            tree = SequenceTree(len(start),
                                lambda seq: self._evaluate(work, tuple(start[i] for i in seq), started),
                                random.Random(seed), before=_precedence(work.problem, start),
                                window=self.settings.window, rollouts=self.settings.rollouts,
                                alpha=self.settings.alpha, beta=self.settings.beta)
            tree.run(stop)
        _, _, memory, table = work.best
        detailed = simulate(self.costs, table, subs.shapes, priced=memory.priced)
        lower, balance = _lower_bound(work.problem, detailed)
        stats = SearchStats(evaluations=work.evaluations,
                            elapsed_ms=(time.perf_counter() - started) * 1000, gate=gate_name,
                            history=tuple(work.history))
        return PlanResult(layout=self.layout, sub_microbatches=subs, table=table, memory=memory,
                          simulation=detailed, lower_bound_s=lower, balance_bound_s=balance,
                          capacity_bytes=self.capacity, search=stats)

    def _fit_budget(self, work: _Batch, default: tuple[int, ...], started: float) -> None:
        """Evaluate a starting order; where SEMU's peak (which also counts P2P receive
        buffers) exceeds the capacity, shrink that rank's activation budget and retry."""
        for _ in range(4):
            self._evaluate(work, default, started)
            peaks = work.last.peak_memory_bytes
            over = [max(0.0, peak - self.capacity) for peak in peaks]
            if not any(over):
                return
            work.budget = [b - 1.02 * o for b, o in zip(work.budget, over)]
            work.best = (math.inf, (), None, None)

    def _evaluate(self, work: _Batch, sequence: tuple[int, ...], started: float) -> float:
        """Interleave, optimise memory, simulate; the score is the iteration time,
        or, for a candidate over the memory capacity, a penalty that ranks it behind every
        candidate that fits and grows with the excess."""
        table = interleave(work.problem, sequence, work.budget,
                           fill_bubbles=self.settings.fill_bubbles).table
        memory = self._memory(table, work)
        result = work.last = simulate(self.costs, table, work.subs.shapes, priced=memory.priced,
                                      detail=False)
        excess = max(0.0, max(result.peak_memory_bytes) / self.capacity - 1)
        score = result.iteration_time_s * (1 + 10 * excess)
        if excess > 0:
            score += _INFEASIBLE
        work.evaluations += 1
        if score < work.best[0] * (1 - work.gain):
            work.last_gain = work.evaluations
        if score < work.best[0]:
            work.best = (score, sequence, memory, table)
            work.history.append(((time.perf_counter() - started) * 1000, work.evaluations,
                                 result.iteration_time_s))
        return score

    def _memory(self, table: ScheduleTable, work: _Batch) -> MemoryPlan:
        if self.settings.memory_optimization:
            return optimize_memory(table, work.base, work.full, self.layers, work.budget,
                                   self.costs.hardware, max_candidates=self.settings.max_candidates,
                                   gap=self.settings.ilp_gap, cache=work.cache,
                                   time_limit_s=60.0, max_nodes=self.settings.ilp_nodes)
        if work.gate == "base":
            return _uniform(work.base, {}, table.layout.num_ranks)
        every = {(a.stage, a.microbatch, a.sub): Strategy(recompute_layers=self.layers[a.stage],
                                                          offload_layers=0)
                 for actions in table.ranks for a in actions if a.op == Op.F and self.layers[a.stage]}
        return _uniform(work.full, every, table.layout.num_ranks)


def _lower_bound(problem: Problem, result: SimResult) -> tuple[float, float]:
    """Busiest rank's compute without recompute + its gradient reduction and optimizer
    step (SEMU's lower bound, memory-agnostic), and the perfect-balance bound."""
    busy = [0.0] * problem.num_ranks
    for rank, seconds in zip(problem.rank, problem.duration):
        busy[rank] += seconds
    tail = [d + o for d, o in zip(result.dp_time_s, result.optimizer_time_s)]
    return (max(b + t for b, t in zip(busy, tail)),
            sum(busy) / problem.num_ranks + max(tail))


def _saved(priced: PricedBatch) -> list:
    """Saved bytes per (stage, microbatch, sub)."""
    return [[[c.saved_bytes for c in per_mb] for per_mb in per_stage] for per_stage in priced.costs]


def _uniform(priced: PricedBatch, strategies: dict, ranks: int) -> MemoryPlan:
    """One strategy for the whole batch (the ablation's steps before phase 3)."""
    return MemoryPlan(strategies=strategies, priced=priced, added_s=0.0, feasible=(True,) * ranks,
                      method=("none",) * ranks, solve_ms=(0.0,) * ranks)


def starting_orders(problem: Problem) -> list[tuple[int, ...]]:
    """Group sequences to start from: microbatch order, and (a reordering, so only with
    reorder on) the heaviest microbatches first: a short drain, as the last microbatches
    through the pipeline are the lightest. A microbatch's groups stay together, in
    module order."""
    work = [0.0] * problem.num_microbatches
    for action, seconds in zip(problem.actions, problem.duration):
        work[action.microbatch] += seconds
    groups = range(len(problem.groups))
    heavy = sorted(groups, key=lambda g: (-work[problem.groups[g][0]], g))
    return [tuple(groups), tuple(heavy)]


def _precedence(problem: Problem, order: tuple[int, ...]) -> list[list[int]]:
    """In the tree's indices (positions in `order`): a microbatch's groups keep module
    order (the encoder's before the LM's)."""
    earlier: dict[int, list[int]] = {}
    needs: list[list[int]] = []
    for index, g in enumerate(order):
        m = problem.groups[g][0]
        needs.append(list(earlier.get(m, ())))
        earlier.setdefault(m, []).append(index)
    return needs
