"""PlannerService: plans upcoming global batches in side processes, ahead of training.

The training side calls `submit(i, batch)` (never blocks: it records the batch and wakes
the collector, pool.py) some iterations ahead, and later `get(i)`, which waits at most
timeout_ms for the worker's plan and otherwise serves the fallback plan (Megatron's
schedule on Megatron's placement) for that batch. A plan is served only after the
parent checked it (wire.read_plan); a crashed or hung worker is restarted and the
iteration it held falls back; the plan of iteration i always uses seed + i.

[Note: spawn and __main__] spawn would re-import the parent's __main__ (the training
script) in each worker; the pool hides it while a worker starts (pool.py, [Note: a
worker imports the planner only]), so a worker imports the planning side alone and never
runs the user's script.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import ModelSpec
from ..ir import Layout
from ..ir.plan import IterationPlan
from ..planner.partition import ChunkPlan, partition
from ..planner.systems import PIPEWEAVER
from ..workload import GlobalBatch
from .fallback import static_plan, baseline_layout, fallback_plan
from .budget import BudgetPolicy, Machine
from .pool import Board, Entry, WorkerPool
from .settings import Outcome, ServiceError, ServiceSettings, ServiceStats
from .worker import Measurement, make_costs
from ..semu.online import Measured
from ..semu import CostModel

log = logging.getLogger("pipeweaver.service")


@dataclass(frozen=True)
class RunLayout:
    """The run's layout as cut_layout cuts it once per run."""

    costs: CostModel | None
    """The cost model the chunks were cut with (pipeweaver), else None."""
    chunks: ChunkPlan | None
    """PipeWeaver's chunk partition (pipeweaver), else None."""
    layout: Layout


def cut_layout(settings: ServiceSettings, model: ModelSpec, pp: int) -> RunLayout:
    """The run's layout: PipeWeaver's chunk partition of the reference batch, or the
    baseline schedule's placement. The service cuts it when it starts; Megatron-LM's
    argument parser cuts the same one to set the virtual stages."""
    if settings.schedule == PIPEWEAVER:
        costs = make_costs(settings, model)
        chunks = partition(costs, num_ranks=pp, reference=settings.reference,
                           search=settings.partition == "searched")
        return RunLayout(costs, chunks, chunks.layout)
    return RunLayout(None, None, baseline_layout(model, settings.schedule, pp))


class PlannerService:
    """One per pipeline-parallel group. Use as a context manager, or start() / close()."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        run = settings.resolve()
        self.model, self.rules, self.pp, self.tp = run.model, run.rules, run.pp, run.tp
        self.sequence_parallel = run.sequence_parallel
        self.chunks = None
        """The run's ChunkPlan (pipeweaver), cut once in start()."""
        self.costs = None
        """The run's cost model (pipeweaver), for the static-order fallback."""
        self.layout = None
        self._board = Board()
        if settings.budget_ms is None and settings.max_evaluations is None:
            self._board.policy = BudgetPolicy(settings.workers, settings.lookahead,
                                              Machine.detect())
        self._pool: WorkerPool | None = None
        self._state = "new"

    def start(self) -> "PlannerService":
        """Cut the run's chunks (here, once), spawn the workers and wait until they are
        ready; raises ServiceError when they cannot plan."""
        if self._state != "new":
            raise ServiceError(f"start() on a {self._state} service")
        s = self.settings
        cut = cut_layout(s, self.model, self.pp)
        self.costs, self.chunks, self.layout = cut.costs, cut.chunks, cut.layout
        self._state = "running"
        self._pool = WorkerPool(s, self.chunks, self.layout, self.tp, self._board)
        deadline = time.monotonic() + s.startup_timeout_s
        board = self._board
        with board.cond:
            while not self._pool.all_ready() and board.broken is None:
                if not board.cond.wait(max(0.0, deadline - time.monotonic())):
                    board.broken = f"not ready after {s.startup_timeout_s:g} s"
            error = board.broken
        if error is not None:
            self.close()
            raise ServiceError(f"planner workers failed to start: {error}")
        return self

    def submit(self, iteration: int, batch: GlobalBatch, urgent: bool = False) -> None:
        """Queue a batch for planning (non-blocking); an urgent one goes before the
        batches already waiting (an evaluation step, needed before them)."""
        board = self._board
        with board.cond:
            if self._state != "running":
                raise ServiceError(f"submit() on a {self._state} service")
            if iteration in board.entries:
                raise ValueError(f"iteration {iteration} was already submitted")
            entry = board.entries[iteration] = Entry(iteration, batch, time.perf_counter())
            if board.broken is not None:
                entry.failure = "planner died"
            elif urgent:
                board.pending.appendleft(iteration)
            else:
                board.pending.append(iteration)
        self._pool.wake()

    def get(self, iteration: int) -> Outcome:
        """The plan of a submitted iteration: the planner's if it is (or becomes, within
        timeout_ms) ready and valid, else the fallback plan for its batch (logged)."""
        started = time.perf_counter()
        deadline = started + self.settings.timeout_ms / 1000
        board = self._board
        with board.cond:
            entry = board.entries.get(iteration)
            if entry is None:
                raise KeyError(f"iteration {iteration} was not submitted, or was already taken")
            while not entry.done:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                board.cond.wait(left)
            waited = (time.perf_counter() - started) * 1000
            del board.entries[iteration]
            if iteration in board.pending:
                board.pending.remove(iteration)
            plan = entry.plan
            reason = None if plan is not None else entry.failure or "late"
            if plan is not None:
                board.planned += 1
            else:
                board.fallbacks[reason.split(":")[0]] += 1
        if plan is not None:
            return Outcome(iteration=iteration, plan=plan, source="planner",
                           predicted=entry.predicted, budget=entry.budget, search=entry.search,
                           latency_ms=(entry.ready - entry.submitted) * 1000, waited_ms=waited)
        s = self.settings
        plan, name = self.fallback(entry.batch)
        log.warning("iteration %d: %s fallback (%s)", iteration, name,
                    f"late: no plan after {s.timeout_ms:g} ms" if reason == "late" else reason)
        return Outcome(iteration=iteration, plan=plan, source="fallback", reason=reason,
                       latency_ms=(time.perf_counter() - entry.submitted) * 1000, waited_ms=waited)

    def observe(self, busy_s: float, waited_ms: float, late: bool) -> None:
        """A trained iteration's time without the wait for its plan, that wait, and
        whether the plan was late: the auto budget follows them (nothing without it)."""
        with self._board.cond:
            if self._board.policy is not None:
                self._board.policy.observe(busy_s, waited_ms, late)

    def measured(self, key: int, measured: Measured) -> None:
        """A trained iteration's measured times, for the workers' online calibration
        (never blocks: each worker gets them when next idle)."""
        with self._board.cond:
            if self._state != "running" or self._pool is None:
                return
            self._pool.measured(Measurement(key, measured))
        self._pool.wake()

    def fallback(self, batch: GlobalBatch) -> tuple[IterationPlan, str]:
        """The plan of `batch` without the search, and its name: the static order of the
        run's chunks (they follow the run's own layout), or the fallback schedule."""
        s = self.settings
        if self.chunks is not None:
            return static_plan(self.costs, self.chunks, batch, self.rules, self.tp,
                               s.dtype, self.sequence_parallel), "static-order"
        return fallback_plan(self.model, batch, self.rules, s.fallback, self.pp, self.tp,
                             s.dtype, self.sequence_parallel), s.fallback

    def stats(self) -> ServiceStats:
        board = self._board
        with board.cond:
            return ServiceStats(planned=board.planned, fallbacks=dict(board.fallbacks),
                                restarts=board.restarts, discarded=board.discarded)

    def close(self) -> None:
        """Stop the collector and the workers (idempotent)."""
        with self._board.cond:
            if self._state == "closed":
                return
            self._state = "closed"
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "PlannerService":
        return self.start() if self._state == "new" else self

    def __exit__(self, *exc) -> None:
        self.close()
