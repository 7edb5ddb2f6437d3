"""Per-layer memory strategies of one stage and the candidate set of a forward/backward
pair (PAPER.md, search phase 3, the offline half).

[Note: strategy costs] A Strategy recomputes j of a stage's L transformer layers and
offloads o of the other L - j to host memory. Its cost is interpolated between two SEMU
prices of the same (stage, microbatch, sub): `base` (no recompute) and `full` (every
layer recomputed), with every transformer layer of the stage counted as equal:
- recompute_s = j/L * full.recompute_s;
- saved_bytes = base.saved_bytes - (j + o)/L * (base.saved_bytes - full.saved_bytes)
  (an offloaded layer frees what recomputing it frees; its checkpoint stays);
- the o/L * (base - full) offloaded bytes are copied out during the forward and back
  during the backward at hardware.host_bandwidth; a copy longer than the compute it
  overlaps extends it: forward_s grows by max(0, copy - forward_s), the backward by
  max(0, copy - backward_s) (its recompute included; booked in recompute_s so that
  SEMU's backward_s includes it).
Approximations: layers of different modules in one stage (Megatron's stage 0) are
averaged; host copies of different stages on one rank do not share bandwidth; the
projector and a module's input/output ops are never recomputed or offloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..semu import StageCost


@dataclass(frozen=True, slots=True)
class Strategy:
    """How one stage treats one (sub-)microbatch's activations."""

    recompute_layers: int = 0
    """Transformer layers whose activations are dropped and recomputed in the backward."""
    offload_layers: int = 0
    """Transformer layers whose activations are kept in host memory until the backward."""

    def __post_init__(self) -> None:
        if self.recompute_layers < 0 or self.offload_layers < 0:
            raise ValueError(f"negative layer counts in {self}")

    @property
    def trivial(self) -> bool:
        """Keeps every activation on the device (the fastest strategy)."""
        return not (self.recompute_layers or self.offload_layers)


KEEP = Strategy()


def _interpolate(base: StageCost, full: StageCost, layers: int, j: np.ndarray, o: np.ndarray,
                 host_bandwidth: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(extra forward s, recompute s, saved bytes) of strategies (j, o): [Note: strategy
    costs]; the one place these formulas live."""
    share = (base.saved_bytes - full.saved_bytes) / layers
    again = j / layers * full.recompute_s
    saved = np.where(j + o == layers, full.saved_bytes, base.saved_bytes - (j + o) * share)
    copy = o * share / host_bandwidth if host_bandwidth > 0 else np.zeros_like(again)
    forward = np.maximum(0.0, copy - base.forward_s)
    backward = np.maximum(0.0, copy - (base.backward_s + again))
    return forward, again + backward, saved


def strategy_cost(base: StageCost, full: StageCost, layers: int, strategy: Strategy,
                  host_bandwidth: float) -> StageCost:
    """The StageCost of one strategy, ready for semu.simulate (see [Note: strategy costs])."""
    j, o = strategy.recompute_layers, strategy.offload_layers
    if j + o > layers:
        raise ValueError(f"{strategy} exceeds the stage's {layers} transformer layers")
    if o and host_bandwidth <= 0:
        raise ValueError("offloading needs hardware with host_bandwidth > 0")
    if strategy.trivial:
        return base
    extra, again, saved = _interpolate(base, full, layers, np.array([j]), np.array([o]),
                                       host_bandwidth)
    return replace(base, forward_s=base.forward_s + float(extra[0]),
                   recompute_s=float(again[0]), saved_bytes=float(saved[0]))


def reduce_candidates(time_s: np.ndarray, saved: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` (>= 2) candidates, fastest first with memory strictly
    falling: index 0 (the caller's no-change option, never slower or smaller than any
    other) is kept; the rest are the Pareto front of (time, memory) (a candidate slower
    and not smaller than another is dropped), cut to its fastest and smallest members
    and the fastest of limit - 2 equal-width memory buckets between them (the
    multiple-choice-knapsack reduction)."""
    if limit < 2:
        raise ValueError(f"keep at least 2 candidates, got {limit}")
    order = np.lexsort((saved[1:], time_s[1:])) + 1
    order = np.concatenate(([0], order))
    level = np.minimum.accumulate(saved[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = saved[order[1:]] < level[:-1]
    front = order[keep]
    if len(front) <= limit:
        return front
    if limit == 2:
        return front[[0, -1]]
    low, high = saved[front[-1]], saved[front[0]]
    width = (high - low) / (limit - 2)
    bucket = np.minimum(((saved[front] - low) // width).astype(np.int64), limit - 3)
    _, first = np.unique(bucket, return_index=True)  # the front's first is the fastest
    chosen = np.union1d(first, [0, len(front) - 1])
    return front[chosen]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Candidates:
    """The kept strategies of one pair, fastest first, saved bytes strictly falling."""

    strategies: tuple[Strategy, ...]
    costs: tuple[StageCost, ...]
    extra_s: np.ndarray
    """Time added over the fastest (candidate 0, no change): 0 first, non-decreasing."""
    saved: np.ndarray
    """Device bytes held from the forward's start to the backward's end."""


class CandidateCache:
    """Candidates priced once per distinct (base, full, layers): pairs of equal shapes,
    and repeated calls during a search, share one entry."""

    def __init__(self, host_bandwidth: float, max_candidates: int = 10) -> None:
        if max_candidates < 2:
            raise ValueError(f"max_candidates must be >= 2, got {max_candidates}")
        self.host_bandwidth = host_bandwidth
        self.max_candidates = max_candidates
        self._entries: dict[tuple[StageCost, StageCost, int], Candidates] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, base: StageCost, full: StageCost, layers: int) -> Candidates:
        """The candidates of a pair priced `base` without and `full` with recompute."""
        key = (base, full, layers)
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = self._build(base, full, layers)
        return found

    def _build(self, base: StageCost, full: StageCost, layers: int) -> Candidates:
        if layers <= 0 or base.saved_bytes <= full.saved_bytes:
            return Candidates(strategies=(KEEP,), costs=(base,), extra_s=np.zeros(1),
                              saved=np.array([base.saved_bytes]))
        j, o = np.arange(layers + 1), np.zeros(layers + 1, dtype=np.int64)
        if self.host_bandwidth > 0:
            j, o = (a.ravel() for a in np.indices((layers + 1, layers + 1)))
            j, o = j[j + o <= layers], o[j + o <= layers]
        extra, again, saved = _interpolate(base, full, layers, j, o, self.host_bandwidth)
        time_s = extra + again
        kept = reduce_candidates(time_s, saved, self.max_candidates)
        strategies = tuple(Strategy(int(j[i]), int(o[i])) for i in kept)
        costs = tuple(base if s.trivial else
                      replace(base, forward_s=base.forward_s + float(extra[i]),
                              recompute_s=float(again[i]), saved_bytes=float(saved[i]))
                      for s, i in zip(strategies, kept))
        return Candidates(strategies=strategies, costs=costs, extra_s=time_s[kept] - time_s[0],
                          saved=saved[kept])
