"""Online sub-microbatch partitioner: split each microbatch's encoder (and generator)
instances into uniform sub-microbatches.

A microbatch with N_i instances of module i becomes M_i = ceil(N_i / B_i) sub-microbatches
of near-equal size (sizes differ by at most one), keeping the instances' order, so the
runtime can scatter every encoder output back to its place in the LM sequence. A
microbatch without images creates no encoder work (M = 0); the LM always takes the whole
microbatch (M = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelSpec, ModuleKind
from ..semu import ModuleShape, microbatch_shapes
from ..workload import GlobalBatch, TokenRules


@dataclass(frozen=True, kw_only=True)
class SubMicrobatches:
    """Per module: counts per microbatch, shapes per (microbatch, sub), and which
    instances (image or clip indices within the microbatch) each sub-microbatch holds."""

    counts: dict[str, tuple[int, ...]]
    shapes: dict[str, list[list[ModuleShape]]]
    members: dict[str, list[list[tuple[int, ...]]]]


def split_evenly(count: int, size: int) -> list[range]:
    """ceil(count/size) consecutive runs whose lengths differ by at most one."""
    if count == 0:
        return []
    pieces = math.ceil(count / size)
    base, extra = divmod(count, pieces)
    runs, start = [], 0
    for k in range(pieces):
        length = base + (1 if k < extra else 0)
        runs.append(range(start, start + length))
        start += length
    return runs


def split_batch(model: ModelSpec, batch: GlobalBatch, rules: TokenRules,
                sub_size: dict[str, int]) -> SubMicrobatches:
    """Sub-microbatches of every module for one global batch."""
    counts: dict[str, list[int]] = {n: [] for n in model.order}
    shapes: dict[str, list[list[ModuleShape]]] = {n: [] for n in model.order}
    members: dict[str, list[list[tuple[int, ...]]]] = {n: [] for n in model.order}
    for microbatch in batch.microbatches:
        whole = microbatch_shapes(model, microbatch, rules)
        for name in model.order:
            module = model.module(name)
            shape = whole.get(name, ModuleShape(()))
            if module.kind == ModuleKind.LANGUAGE_MODEL:
                runs = [range(len(shape.seqs))]
            else:
                owner = name if module.kind != ModuleKind.PROJECTOR else model.upstream(name)[0]
                runs = split_evenly(len(shape.seqs), sub_size.get(owner, 1))
            counts[name].append(len(runs))
            members[name].append([tuple(r) for r in runs])
            shapes[name].append([
                ModuleShape(tuple(shape.seqs[i] for i in r),
                            tuple(shape.cond[i] for i in r) if shape.cond else ())
                for r in runs])
    return SubMicrobatches(counts={n: tuple(c) for n, c in counts.items()}, shapes=shapes,
                           members=members)
