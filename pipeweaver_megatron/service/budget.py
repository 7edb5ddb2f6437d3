"""The search budget of each planned batch when --pipeweaver-search-budget-ms is auto.

A plan for iteration i is submitted when training starts iteration i - lookahead and is
needed when it starts i; with W workers each plans one batch in W iterations' time. So
the wall-clock window is min(lookahead, W) iterations, of which the policy spends half
(the rest absorbs jitter and the queue at start-up). Where the node has a free core per
worker, that is the whole budget: planning costs training nothing. Where training uses
every core, the workers (idle priority) run only while a rank waits, so the search also
gets a CPU budget, a small share of the iteration: the plan is then as good however busy
the machine is, and the CPU it takes from training stays bounded. Every search also
stops once it has not improved for `patience` evaluations (planner/search.py).

Feedback: a plan that came late, or that training waited for, halves the budget; each
plan that was on time grows it back by a quarter, up to the rules above. Iteration times
are the median of the last few measured (robust to an evaluation step or a checkpoint).
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from dataclasses import dataclass

from ..planner.search import SearchBudget

FIRST_WALL_MS = 200.0
"""Wall budget before any iteration was measured."""
FIRST_CPU_MS = 40.0
"""CPU budget before any iteration was measured (training on every core)."""
MIN_MS, MAX_WALL_MS = 5.0, 10_000.0
WINDOW_SHARE = 0.5
"""Of the iterations a plan may take (min(lookahead, workers)), the share searched."""
CPU_SHARE = 0.03
"""CPU budget as a share of the iteration time when no core is free for the workers."""
NO_LOOKAHEAD_SHARE = 0.02
"""With lookahead 0 the plan is on the critical path: this share of the iteration."""
PATIENCE = 100
"""Evaluations without a 0.1% gain after which a search stops."""
LATE_SHARE = 0.05
"""A wait for the plan longer than this share of the iteration counts as late."""
HISTORY = 5


@dataclass(frozen=True)
class Machine:
    """What the node offers the planner workers."""

    cores: int
    """Cores this process may run on."""
    training: int
    """Training processes on the node."""

    @property
    def idle(self) -> int:
        return max(0, self.cores - self.training)

    @classmethod
    def detect(cls) -> "Machine":
        """This node: the process's CPU affinity and torchrun's LOCAL_WORLD_SIZE (SLURM's
        SLURM_NTASKS_PER_NODE under srun; 1 when neither is set)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
        try:
            training = int(str(local).split("(")[0]) if local else 1
        except ValueError:
            training = 1
        return cls(cores=cores, training=max(training, 1))


class BudgetPolicy:
    """Budgets for the service's tasks (see the module note); not thread-safe: the
    service calls it under its board's lock."""

    def __init__(self, workers: int, lookahead: int, machine: Machine) -> None:
        if workers < 1 or lookahead < 0:
            raise ValueError(f"workers must be >= 1 and lookahead >= 0, got {workers} and "
                             f"{lookahead}")
        self.workers, self.lookahead, self.machine = workers, lookahead, machine
        self.contended = machine.idle < workers
        self.scale = 1.0
        self._times: deque[float] = deque(maxlen=HISTORY)

    @property
    def iteration_s(self) -> float | None:
        return statistics.median(self._times) if self._times else None

    def observe(self, busy_s: float, waited_ms: float, late: bool) -> None:
        """One trained iteration: its time without the wait for its plan, that wait,
        and whether its plan was late (served as the fallback for lateness)."""
        if busy_s > 0:
            self._times.append(busy_s)
        step = self.iteration_s
        slow = late or (step is not None and waited_ms / 1000 > LATE_SHARE * step)
        self.scale = max(self.scale * 0.5, 0.01) if slow else min(self.scale * 1.25, 1.0)

    def next(self) -> SearchBudget:
        """The budget of the next batch handed to a worker."""
        step = self.iteration_s
        if step is None:
            wall = FIRST_WALL_MS
            cpu = FIRST_CPU_MS if self.contended else None
        else:
            share = (WINDOW_SHARE * min(self.lookahead, self.workers) if self.lookahead
                     else NO_LOOKAHEAD_SHARE)
            wall = share * step * 1000
            cpu = min(CPU_SHARE * step * 1000, wall) if self.contended else None
        wall = _clamp(wall * self.scale, MAX_WALL_MS)
        cpu = None if cpu is None else _clamp(cpu * self.scale, wall)
        return SearchBudget(wall_ms=wall, cpu_ms=cpu, patience=PATIENCE)


def _clamp(ms: float, upper: float) -> float:
    return min(max(ms, MIN_MS), upper)


__all__ = ["BudgetPolicy", "Machine"]
