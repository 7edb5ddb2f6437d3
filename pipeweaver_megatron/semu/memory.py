"""Static memory per pipeline rank: weights, gradients and optimizer state.

Megatron mixed precision keeps per parameter: the training copy (dtype_bytes), an fp32
main gradient (4), and Adam's fp32 master weight, momentum and variance (12). The
distributed optimizer shards the optimizer state and master weights over data-parallel
ranks (Megatron-LM docs, "Distributed Optimizer"). Everything is per TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelSpec
from ..ir import Layout

GRAD_BYTES = 4
OPTIMIZER_BYTES = 12
ADAM_TRAFFIC_BYTES = 34
"""Bytes read and written per parameter by one Adam step (p, g, m, v in fp32 + copy)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StaticMemory:
    """Memory that does not depend on the schedule, for one rank."""

    params: float
    """Parameters held by one TP rank of this pipeline rank."""
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


def rank_params(model: ModelSpec, layout: Layout, tp: int) -> list[float]:
    """Parameters per pipeline rank, per TP rank."""
    totals = [0.0] * layout.num_ranks
    for stage in layout.stages:
        for part in stage.parts:
            totals[stage.rank] += model.part_params(part.module, part.first_layer,
                                                    part.last_layer) / tp
    return totals


def static_memory(model: ModelSpec, layout: Layout, tp: int, dtype_bytes: int,
                  distributed_optimizer: bool = True) -> list[StaticMemory]:
    """Weights, gradients and optimizer state of every pipeline rank."""
    shards = model.parallel.dp if distributed_optimizer else 1
    return [StaticMemory(params=p, weight_bytes=p * dtype_bytes, grad_bytes=p * GRAD_BYTES,
                         optimizer_bytes=p * OPTIMIZER_BYTES / shards)
            for p in rank_params(model, layout, tp)]
