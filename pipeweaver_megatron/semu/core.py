"""The event core: in-order compute streams with asynchronous point-to-point arrivals.

Each rank runs its actions in order on one stream; an action starts when its stream is
free and every input has arrived (producer end + transfer delay). Transfers overlap with
compute and do not contend with one another, so the only shared resources are the
streams and the schedule is a DAG: processing completion events in dependency order
gives exactly the times an event heap ordered by (time, seq) would, deterministically
and without the heap. A table that cannot finish raises (validate() explains why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class Timeline:
    """Start and end of every action, indexed like the input."""

    start: list[float]
    end: list[float]
    rank_end: list[float]
    """When each rank's last action ends (0 for an idle rank)."""


class StuckSchedule(RuntimeError):
    """No rank can make progress: the table deadlocks or depends on a later action."""


def run_streams(order: Sequence[Sequence[int]], duration: Sequence[float],
                deps: Sequence[Sequence[tuple[int, float]]]) -> Timeline:
    """order[r]: action indices of rank r in stream order; deps[i]: (producer, delay)."""
    n = len(duration)
    end: list[float | None] = [None] * n
    start = [0.0] * n
    free = [0.0] * len(order)
    pointer = [0] * len(order)
    remaining = sum(len(o) for o in order)
    while remaining:
        progressed = False
        for rank, actions in enumerate(order):
            p, t_free, count = pointer[rank], free[rank], len(actions)
            while p < count:
                i = actions[p]
                t = t_free
                for j, delay in deps[i]:
                    done = end[j]
                    if done is None:
                        break
                    if done + delay > t:
                        t = done + delay
                else:
                    start[i] = t
                    t_free = end[i] = t + duration[i]
                    p += 1
                    continue
                break
            if p != pointer[rank]:
                remaining -= p - pointer[rank]
                pointer[rank], free[rank] = p, t_free
                progressed = True
        if not progressed:
            stuck = [r for r, actions in enumerate(order) if pointer[r] < len(actions)]
            raise StuckSchedule(f"ranks {stuck} cannot progress; run ir.validate for details")
    return Timeline(start=start, end=[e or 0.0 for e in end], rank_end=free)
