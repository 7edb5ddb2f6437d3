"""Megatron-Core's non-interleaved 1F1B (forward_backward_pipelining_without_interleaving).

Rank r of P runs min(P - r - 1, M) warm-up forwards, then alternates one forward and
one backward until every forward ran, then the remaining backwards (cool-down).
"""

from __future__ import annotations

from ..ir import Layout, ScheduleTable
from .common import backward, chunk_stages, forward, make_table
from .errors import ScheduleError


def megatron_1f1b(layout: Layout, num_microbatches: int, group_size: int = 0) -> ScheduleTable:
    """1F1B for a layout with one stage per rank (group_size is ignored)."""
    chunks = chunk_stages(layout)
    if len(chunks[0]) != 1:
        raise ScheduleError(f"megatron-1f1b needs one model chunk per rank, the layout has "
                            f"{len(chunks[0])}; use megatron-interleaved")
    num_ranks, m = layout.num_ranks, num_microbatches
    ranks = []
    for rank, (stage,) in enumerate(chunks):
        warmup = min(num_ranks - rank - 1, m)
        actions = [forward(stage, i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [forward(stage, warmup + i), backward(stage, i)]
        actions += [backward(stage, i) for i in range(m - warmup, m)]
        ranks.append(actions)
    return make_table("megatron-1f1b", layout, m, ranks)
