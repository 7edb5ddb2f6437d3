"""Other explorers of PipeWeaver's reordering space, for the search benchmarks.

PipeWeaverPlanner.plan builds a SequenceTree (planner/mcts.py) over group priority
sequences and runs it until its budget stops it. `explorer(kind)` swaps that class, for
the duration of a `with` block, for one that explores the same space (the same allowed
next groups, the same precedence, the same starting orders, the same scoring: interleave,
memory ILP, SEMU) differently:
- "mcts": the planner's own tree;
- "random": independent random sequences, each position drawn uniformly from its allowed
  groups (MCTS's rollout from the root);
- "dfs": sequences in depth-first order of the tree (default order first, then changes
  at the end of the sequence first).
Every explorer records the score of every sequence it evaluated (`Recorded.times`),
so a benchmark can read the spread between the best and the worst schedule.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

from pipeweaver_megatron.planner import mcts, search

KINDS = ("mcts", "random", "dfs")
INFEASIBLE_S = 1e5
"""Scores above this carry the planner's out-of-memory penalty."""


class Recorded(mcts.SequenceTree):
    """The planner's MCTS, keeping every evaluated score."""

    created: list["Recorded"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []
        inner = self.evaluate

        def evaluate(sequence: tuple[int, ...]) -> float:
            seconds = inner(sequence)
            self.times.append(seconds)
            return seconds

        self.evaluate = evaluate
        Recorded.created.append(self)

    def feasible_times(self) -> list[float]:
        return [t for t in self.times if t < INFEASIBLE_S]


class RandomSearch(Recorded):
    """Independent random sequences until stopped."""

    def run(self, stop: Callable[[], bool]) -> mcts.TreeResult:
        self.score(tuple(self._default()))
        while not stop():
            self.score(self.rollout(()))
        return self._result()

    def _result(self) -> mcts.TreeResult:
        sequence, time = self.best
        return mcts.TreeResult(sequence=sequence, time_s=time, evaluations=self.evaluations,
                               history=tuple(self.history))


class DepthFirstSearch(RandomSearch):
    """Every sequence of the tree in depth-first order until stopped."""

    def run(self, stop: Callable[[], bool]) -> mcts.TreeResult:
        for sequence in self._leaves(()):
            if stop():
                break
            self.score(sequence)
        return self._result()

    def _leaves(self, prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if len(prefix) == self.size:
            yield prefix
            return
        for group in self._allowed(prefix):
            yield from self._leaves(prefix + (group,))


CLASSES = {"mcts": Recorded, "random": RandomSearch, "dfs": DepthFirstSearch}


@contextlib.contextmanager
def explorer(kind: str) -> Iterator[list[Recorded]]:
    """Plans made inside the block explore with `kind`; yields the explorers created."""
    original = search.SequenceTree
    Recorded.created = []
    search.SequenceTree = CLASSES[kind]
    try:
        yield Recorded.created
    finally:
        search.SequenceTree = original


def spread(times: list[float]) -> float:
    """Worst over best of the feasible times, minus one (nan without two of them)."""
    ok = [t for t in times if t < INFEASIBLE_S]
    return max(ok) / min(ok) - 1 if len(ok) > 1 else math.nan
