"""Segment reordering by Monte Carlo tree search (PAPER.md, search phase 1).

A sequence of groups (a microbatch's segments of one module; the paper's pruning gives
all segments of one modality in one microbatch one priority, in a fixed order) is built
position by position; a group's position is its priority. Each tree node is a prefix.
One search iteration:
- selection: from the root, while a node has no untried child, descend to the child with
  the highest UCB  s^alpha + beta * sqrt(ln N_parent / N_child), where s in (0, 1] is
  the child's best score (reference time / best simulated time);
- expansion: add one untried child;
- rollouts: complete the child's prefix several times at random and score each
  completion (interleave, memory optimisation, SEMU);
- backpropagation: every node on the path keeps the best score below it.
Children of a prefix are the first `window` groups not yet placed, in the default order
(microbatch order), which keeps the tree to orders a few places away from the default;
on small instances a window covering every group makes the search exhaustive.
Each sequence is scored once (repeats are looked up, and rollouts redraw to avoid them).
The search is anytime: it stops when `stop()` says so and returns the best sequence seen.
Everything random comes from the caller's random.Random, so a seed fixes the search.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

Evaluate = Callable[[tuple[int, ...]], float]
"""Score a complete sequence: simulated iteration time in seconds (lower is better)."""


@dataclass
class _Node:
    prefix: tuple[int, ...]
    untried: list[int]
    children: list["_Node"] = field(default_factory=list)
    visits: int = 0
    best: float = 0.0
    """Best normalised score seen below this node (higher is better)."""
    done: bool = False
    """Every sequence below this node has been scored."""


@dataclass(frozen=True, kw_only=True)
class TreeResult:
    """Best sequence found, its time, and how the search went."""

    sequence: tuple[int, ...]
    time_s: float
    evaluations: int
    history: tuple[tuple[int, float], ...]
    """(evaluation count, best time) at every improvement."""


class SequenceTree:
    """MCTS over priority sequences of `size` groups with precedence `before`."""

    def __init__(self, size: int, evaluate: Evaluate, rng: random.Random,
                 before: Sequence[Sequence[int]] = (), window: int = 4, rollouts: int = 4,
                 alpha: float = 2.0, beta: float = 0.5) -> None:
        self.size, self.evaluate, self.rng = size, evaluate, rng
        self.window, self.rollouts, self.alpha, self.beta = window, rollouts, alpha, beta
        self.needs = [set(b) for b in before] if before else [set() for _ in range(size)]
        self.root = _Node((), self._allowed(()))
        self.best: tuple[tuple[int, ...], float] = ((), math.inf)
        self.reference = 0.0
        self.evaluations = 0
        self.seen: dict[tuple[int, ...], float] = {}
        self.history: list[tuple[int, float]] = []

    def _allowed(self, prefix: tuple[int, ...]) -> list[int]:
        """The next `window` unplaced groups (default order) whose predecessors are placed."""
        placed = set(prefix)
        out = []
        for g in range(self.size):
            if g not in placed and self.needs[g] <= placed:
                out.append(g)
                if len(out) == self.window:
                    break
        return out

    def score(self, sequence: tuple[int, ...]) -> float:
        """Evaluate a complete sequence (once: repeats are looked up), keep the best;
        returns its normalised score."""
        if sequence in self.seen:
            return self.seen[sequence]
        time = self.evaluate(sequence)
        self.evaluations += 1
        if time < self.best[1]:
            self.best = (sequence, time)
            self.history.append((self.evaluations, time))
        if not self.reference:
            self.reference = time
        value = self.seen[sequence] = (self.reference / time if time > 0 and math.isfinite(time)
                                       else 0.0)
        return value

    def rollout(self, prefix: tuple[int, ...], attempts: int = 4) -> tuple[int, ...]:
        """A random completion drawn from each position's allowed groups; a few draws
        are tried to find one not scored yet."""
        for _ in range(attempts):
            sequence = list(prefix)
            while len(sequence) < self.size:
                sequence.append(self.rng.choice(self._allowed(tuple(sequence))))
            if tuple(sequence) not in self.seen:
                break
        return tuple(sequence)

    def run(self, stop: Callable[[], bool]) -> TreeResult:
        """Seed with the default order, then iterate until stop() or the tree is done."""
        self.root.best = self.score(tuple(self._default()))
        self.root.visits = 1
        while not stop() and not self.root.done:
            path = self._select()
            node = path[-1]
            if node.untried:
                group = node.untried.pop(self.rng.randrange(len(node.untried)))
                prefix = node.prefix + (group,)
                child = _Node(prefix, self._allowed(prefix) if len(prefix) < self.size else [])
                node.children.append(child)
                path.append(child)
                node = child
            single = self._single_path(node.prefix)
            runs = 1 if single else self.rollouts
            value = max(self.score(self.rollout(node.prefix)) for _ in range(runs))
            if single:
                node.done, node.untried = True, []
            for n in reversed(path):
                n.visits += 1
                n.best = max(n.best, value)
                if not n.done and not n.untried and n.children:
                    n.done = all(c.done for c in n.children)
        sequence, time = self.best
        return TreeResult(sequence=sequence, time_s=time, evaluations=self.evaluations,
                          history=tuple(self.history))

    def _default(self) -> list[int]:
        sequence: list[int] = []
        while len(sequence) < self.size:
            sequence.append(self._allowed(tuple(sequence))[0])
        return sequence

    def _single_path(self, prefix: tuple[int, ...]) -> bool:
        """Only one completion exists below this prefix."""
        while len(prefix) < self.size:
            allowed = self._allowed(prefix)
            if len(allowed) > 1:
                return False
            prefix += (allowed[0],)
        return True

    def _select(self) -> list[_Node]:
        path = [self.root]
        node = self.root
        while not node.untried and node.children:
            open_children = [c for c in node.children if not c.done]
            if not open_children:
                break
            log_n = math.log(max(node.visits, 1))
            node = max(open_children, key=lambda c: (c.best ** self.alpha
                                                     + self.beta * math.sqrt(log_n / max(c.visits, 1))))
            path.append(node)
        return path
