"""Megatron-Core's interleaved 1F1B (forward_backward_pipelining_with_interleaving).

Each rank owns V model chunks; chunk c of rank r is stage c*P + r. Microbatches are
taken in groups of G = microbatch_group_size_per_vp_stage (default P): a rank runs the
forwards of group g on chunk 0, then on chunk 1, ..., then moves to the next group; the
last group takes all remaining microbatches. That order of (microbatch, chunk) pairs is
the *virtual microbatch* sequence. Rank r runs
    W = min(2*(P - r - 1) + (V - 1)*G, V*M)
warm-up forwards, then alternates forward k + W and backward k, then the remaining
backwards. Backward k runs chunk V-1-c of the k-th virtual microbatch (m, c).
"""

from __future__ import annotations

from ..ir import Layout, ScheduleTable
from .common import backward, chunk_stages, forward, make_table
from .errors import ScheduleError


def virtual_microbatches(num_microbatches: int, num_chunks: int, group_size: int) -> list[tuple[int, int]]:
    """The (microbatch, chunk) order of forward passes on every rank."""
    order = []
    for start in range(0, num_microbatches, group_size):
        last_group = start + group_size >= num_microbatches
        stop = num_microbatches if last_group else start + group_size
        order += [(m, c) for c in range(num_chunks) for m in range(start, stop)]
        if last_group:
            break
    return order


def check_group_size(num_ranks: int, num_microbatches: int, group_size: int) -> None:
    """Megatron's constraints on microbatch_group_size_per_vp_stage."""
    if not num_ranks <= group_size <= num_microbatches:
        raise ScheduleError(f"microbatch group size {group_size} must lie in [pp={num_ranks}, "
                            f"microbatches={num_microbatches}]")
    remainder = num_microbatches % group_size
    if 0 < remainder < num_ranks:
        raise ScheduleError(f"{num_microbatches} microbatches leave a last group of {remainder} "
                            f"(< pp={num_ranks}) with group size {group_size}: Megatron rejects "
                            "this because it adds dependency bubbles")


def megatron_interleaved(layout: Layout, num_microbatches: int, group_size: int = 0) -> ScheduleTable:
    """Interleaved 1F1B for a layout with V >= 2 chunks per rank."""
    chunks = chunk_stages(layout)
    num_ranks, num_chunks, m = layout.num_ranks, len(chunks[0]), num_microbatches
    if num_chunks < 2:
        raise ScheduleError("megatron-interleaved needs at least 2 model chunks per rank "
                            "(vp >= 2); use megatron-1f1b")
    for rank, stages in enumerate(chunks):
        if stages != [c * num_ranks + rank for c in range(num_chunks)]:
            raise ScheduleError(f"rank {rank} owns stages {stages}; interleaving needs chunk c "
                                f"of rank r to be stage c*P + r")
    group = group_size or num_ranks
    check_group_size(num_ranks, m, group)
    order = virtual_microbatches(m, num_chunks, group)
    total = len(order)
    ranks = []
    for rank, stages in enumerate(chunks):
        warmup = min(2 * (num_ranks - rank - 1) + (num_chunks - 1) * group, total)

        def fwd(k: int):
            mb, c = order[k]
            return forward(stages[c], mb)

        def bwd(k: int):
            mb, c = order[k]
            return backward(stages[num_chunks - 1 - c], mb)

        actions = [fwd(k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [fwd(k + warmup), bwd(k)]
        actions += [bwd(k) for k in range(total - warmup, total)]
        ranks.append(actions)
    return make_table("megatron-interleaved", layout, m, ranks, microbatch_group_size=group)
