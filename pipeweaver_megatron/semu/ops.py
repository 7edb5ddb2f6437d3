"""Operators of SEMU's op graphs and their classes.

Every op carries the three quantities the roofline-style latency model needs: FLOPs,
bytes moved through device memory, and bytes moved over a link. Its latency is
``overhead + max(a_f*FLOPs/F, a_m*bytes/B_mem, a_n*net_bytes/B_net)`` with the
efficiency factors of its class (see calibration.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpClass(str, enum.Enum):
    """Classes that share efficiency factors."""

    GEMM = "gemm"
    """Dense matrix multiplications (QKV, projections, MLP, LM head, projector)."""
    ATTENTION = "attention"
    """Core attention (flash / SDPA kernels), FLOPs from per-sample sequence lengths."""
    ELEMENTWISE = "elementwise"
    """Memory-bound ops: norms, activations, rotary, residual adds, embedding lookup, loss."""
    COLLECTIVE = "collective"
    """Tensor- and data-parallel all-reduce / all-gather / reduce-scatter."""
    P2P = "p2p"
    """Pipeline point-to-point transfers."""


class Phase(str, enum.Enum):
    """Which pass of a stage an op belongs to."""

    FORWARD = "forward"
    BACKWARD_INPUT = "backward_input"
    BACKWARD_WEIGHT = "backward_weight"


@dataclass(frozen=True, slots=True)
class Op:
    """One operator instance."""

    name: str
    cls: OpClass
    phase: Phase
    flops: float = 0.0
    mem_bytes: float = 0.0
    net_bytes: float = 0.0
    count: int = 1
    """Identical instances (one per layer of a part): the graph stores a layer once."""
