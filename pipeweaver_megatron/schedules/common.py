"""What every baseline generator shares: its signature and the table it returns."""

from __future__ import annotations

from typing import Protocol

from ..ir import Action, Layout, Op, ScheduleTable
from .errors import ScheduleError


class BaselineGenerator(Protocol):
    """One signature for every baseline: a Layout and a microbatch count in, a table out."""

    def __call__(self, layout: Layout, num_microbatches: int, group_size: int = 0) -> ScheduleTable:
        ...


def chunk_stages(layout: Layout) -> list[list[int]]:
    """Per rank, the stage index of each of its model chunks, in chunk order."""
    chunks = [[s.index for s in layout.stages_of_rank(r)] for r in range(layout.num_ranks)]
    if len({len(c) for c in chunks}) != 1:
        raise ScheduleError("every rank must own the same number of model chunks; got "
                            f"{[len(c) for c in chunks]}")
    return chunks


def forward(stage: int, microbatch: int) -> Action:
    """A forward action without sub-microbatches."""
    return Action(Op.F, stage, microbatch)


def backward(stage: int, microbatch: int) -> Action:
    """A backward action without sub-microbatches."""
    return Action(Op.B, stage, microbatch)


def make_table(name: str, layout: Layout, num_microbatches: int,
               ranks: list[list[Action]], **metadata: object) -> ScheduleTable:
    """Freeze a generator's per-rank lists into a ScheduleTable."""
    if num_microbatches < 1:
        raise ScheduleError(f"need at least one microbatch, got {num_microbatches}")
    return ScheduleTable(layout=layout, num_microbatches=num_microbatches,
                         ranks=tuple(tuple(r) for r in ranks), name=name,
                         metadata=tuple(sorted(metadata.items())))
