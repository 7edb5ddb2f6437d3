"""GPipe: every forward of the iteration, then every backward.

Each rank runs its chunks' forwards microbatch by microbatch (chunks in pipeline order),
then the backwards microbatch by microbatch (chunks in reverse order), as
torch.distributed.pipelining's ScheduleGPipe does for one chunk per rank.
"""

from __future__ import annotations

from ..ir import Layout, ScheduleTable
from .common import backward, chunk_stages, forward, make_table


def gpipe(layout: Layout, num_microbatches: int, group_size: int = 0) -> ScheduleTable:
    """GPipe schedule for any layout (group_size is ignored)."""
    ranks = []
    for stages in chunk_stages(layout) if num_microbatches > 0 else []:
        actions = [forward(s, m) for m in range(num_microbatches) for s in stages]
        actions += [backward(s, m) for m in range(num_microbatches) for s in reversed(stages)]
        ranks.append(actions)
    return make_table("gpipe", layout, num_microbatches, ranks)
