"""Random valid per-rank orders of a table's actions (baselines for search, test input)."""

from __future__ import annotations

import random
from dataclasses import replace

from .table import ScheduleTable
from .validate import dependencies


def random_order(table: ScheduleTable, rng: random.Random) -> ScheduleTable:
    """A random topological order of the table's actions, split by rank: always valid,
    with the table's sub-microbatch counts."""
    actions = [a for r in table.ranks for a in r]
    deps = {a: dependencies(table, a) for a in actions}
    users: dict = {a: [] for a in actions}
    for a, found in deps.items():
        for d in found:
            users[d].append(a)
    waiting = {a: len(found) for a, found in deps.items()}
    ready = [a for a, n in waiting.items() if n == 0]
    ranks: list[list] = [[] for _ in table.ranks]
    while ready:
        a = ready.pop(rng.randrange(len(ready)))
        ranks[table.layout.stages[a.stage].rank].append(a)
        for u in users[a]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    return replace(table, ranks=tuple(map(tuple, ranks)), name="random")
