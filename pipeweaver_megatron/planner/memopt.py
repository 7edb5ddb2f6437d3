"""Per-layer memory optimisation (PAPER.md, search phase 3, the online half).

Every forward/backward pair (stage, microbatch, sub) of a schedule picks one of its
candidate strategies (planner.candidates: recompute or offload some of the stage's
layers, costed as in [Note: strategy costs]) so that on every rank the activations of
the live pairs fit the rank's budget at each forward's start, adding the least time.

[Note: liveness] On one rank pair p is live at forward position i (the i-th forward of
the rank's order) if p's F is at or before i and p's B after it. Memory grows only at a
forward, so the forwards directly followed by a backward (or ending the order) are the
peaks; a choice that fits at the peaks fits at every forward. Every candidate holds at
most what the fastest holds, so only the peaks where the all-fastest choice exceeds the
budget ("rows") constrain anything, and only the pairs live at a row ("involved pairs")
may change. Pair p is live at the consecutive rows [lo_p, hi_p).

Per rank: if the all-fastest choice fits, nothing runs ('none'). Otherwise a greedy
(repeatedly, at the row furthest over budget, upgrade the live pairs with the best bytes
saved per added second) gives a feasible warm start ('greedy'), and HiGHS solves the ILP
(binary x_pc, at most one non-fastest candidate per pair, one row per peak, minimise
added seconds) to within `gap` ('ilp', see [Note: LP first]); the greedy's answer stays
when HiGHS fails or runs out of time without a better one. A rank that cannot fit even
with every involved pair at its smallest candidate gets that choice, is marked
infeasible and reports 'none'. The budget covers saved activations only: callers leave
room for P2P buffers (semu.simulate counts those too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Sequence

import highspy
import numpy as np

from ..config import HardwareProfile, ModelSpec
from ..ir import Layout, Op, ScheduleTable
from ..semu import PricedBatch, StageCost
from .candidates import CandidateCache, Candidates, Strategy

Method = Literal["none", "greedy", "ilp"]
Key = tuple[int, int, int]
"""(stage, microbatch, sub) of a forward/backward pair."""

_UNIT = 2.0**30
"""Bytes per ILP row unit (GiB keeps HiGHS's tolerances meaningful)."""
_TOL = 1.0
"""Bytes of rounding error a fitting choice may show in float sums."""
_PAD = 1e30
"""Cost and -saving of the padding after a pair's last candidate."""
_LP_TOL = 1e-7
"""HiGHS's primal feasibility tolerance, in _UNIT."""


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """One candidate per pair, the costs that result, and how each rank was solved."""

    strategies: dict[Key, Strategy]
    """Only pairs that changed (absent: keep every activation on the device)."""
    priced: PricedBatch
    """The input costs with the strategies applied: semu.simulate(..., priced=...)."""
    added_s: float
    """Compute time added over all ranks (sum over pairs of the chosen extra time)."""
    feasible: tuple[bool, ...]
    method: tuple[Method, ...]
    solve_ms: tuple[float, ...]
    """Wall time of each rank's selection."""


@dataclass(frozen=True, kw_only=True)
class Selection:
    """One rank's choice: candidate index per involved pair."""

    choice: np.ndarray
    added_s: float
    feasible: bool
    method: Method


def transformer_layers(model: ModelSpec, layout: Layout) -> tuple[int, ...]:
    """Transformer layers per stage (a projector counts 0): optimize_memory's `layers`."""
    return tuple(sum(p.num_layers for p in s.parts if model.module(p.module).is_transformer)
                 for s in layout.stages)


def optimize_memory(table: ScheduleTable, base: PricedBatch, full: PricedBatch,
                    layers: Sequence[int], budget_bytes: Sequence[float],
                    hardware: HardwareProfile, max_candidates: int = 10, gap: float = 0.05,
                    time_limit_s: float = 0.2, cache: CandidateCache | None = None,
                    max_nodes: int | None = None) -> MemoryPlan:
    """Choose a strategy per pair so every rank's live activations fit budget_bytes (the
    capacity minus the rank's static memory); full is price(..., recompute=every stage).
    A cache may be shared across calls with the same hardware and max_candidates (it
    grows with every distinct stage cost: one per batch or search is the intended life).
    """
    if len(budget_bytes) != len(table.ranks) or len(layers) != len(table.layout.stages):
        raise ValueError(f"need a budget per rank ({len(table.ranks)}) and a layer count "
                         f"per stage ({len(table.layout.stages)})")
    if cache is None:
        cache = CandidateCache(hardware.host_bandwidth, max_candidates)
    elif (cache.host_bandwidth, cache.max_candidates) != (hardware.host_bandwidth, max_candidates):
        raise ValueError("the candidate cache was built for other settings")
    strategies: dict[Key, Strategy] = {}
    changed: dict[Key, StageCost] = {}
    added, feasible, methods, spent = 0.0, [], [], []
    for rank, actions in enumerate(table.ranks):
        start = time.perf_counter()
        keys, last = _pairs(actions)
        saved = np.array([base.costs[s][m][k].saved_bytes for s, m, k in keys])
        load = _loads(saved, last)
        peak = np.zeros(len(keys), dtype=bool)
        peak[last - 1] = True
        rows = np.flatnonzero(peak & (load > budget_bytes[rank]))
        lo = np.searchsorted(rows, np.arange(len(keys)))
        hi = np.searchsorted(rows, last)
        involved = np.flatnonzero(hi > lo)
        cands = [cache.get(base.costs[s][m][k], full.costs[s][m][k], layers[s])
                 for s, m, k in (keys[p] for p in involved)]
        excess = load[rows] - budget_bytes[rank]
        picked = select(cands, lo[involved], hi[involved], excess, gap, time_limit_s, max_nodes)
        for p, cand, c in zip(involved, cands, picked.choice):
            if c:
                strategies[keys[p]] = cand.strategies[c]
                changed[keys[p]] = cand.costs[c]
        added += picked.added_s
        feasible.append(picked.feasible)
        methods.append(picked.method)
        spent.append(1e3 * (time.perf_counter() - start))
    return MemoryPlan(strategies=strategies, priced=_apply(base, changed), added_s=added,
                      feasible=tuple(feasible), method=tuple(methods), solve_ms=tuple(spent))


def select(cands: Sequence[Candidates], lo: np.ndarray, hi: np.ndarray, excess: np.ndarray,
           gap: float = 0.05, time_limit_s: float = 0.2, max_nodes: int | None = None) -> Selection:
    """Pick a candidate per involved pair so that at every violated row r the live pairs
    (lo_p <= r < hi_p) save at least excess[r] bytes over their fastest candidates
    (each pair's candidates as planner.candidates orders them: fastest first)."""
    pairs = np.arange(len(cands))
    if not len(excess):
        return Selection(choice=np.zeros(len(cands), dtype=np.int64), added_s=0.0,
                         feasible=True, method="none")
    width = max(len(c.saved) for c in cands)
    extra = np.full((len(cands), width), _PAD)  # padding: never worth choosing
    save = np.full((len(cands), width), -_PAD)
    for p, c in enumerate(cands):
        extra[p, :len(c.saved)] = c.extra_s
        save[p, :len(c.saved)] = c.saved[0] - c.saved
    last = np.array([len(c.saved) - 1 for c in cands], dtype=np.int64)
    if not _fits(save[pairs, last], lo, hi, excess):
        return Selection(choice=last, added_s=float(extra[pairs, last].sum()),
                         feasible=False, method="none")
    choice = _greedy(extra, save, lo, hi, excess)
    method: Method = "greedy"
    if extra[pairs, choice].sum() > 0:
        found = _ilp(extra, save, last, lo, hi, excess, choice, gap, time_limit_s, max_nodes)
        if found is not None and extra[pairs, found].sum() <= extra[pairs, choice].sum():
            choice, method = found, "ilp"
    return Selection(choice=choice, added_s=float(extra[pairs, choice].sum()), feasible=True,
                     method=method)


def summarize(plan: MemoryPlan) -> dict:
    """A JSON-able report: per stage the pairs changed and the layers they recompute and
    offload, plus the per-rank outcome."""
    stages = []
    for s, per_mb in enumerate(plan.priced.costs):
        mine = [v for (stage, _, _), v in plan.strategies.items() if stage == s]
        stages.append({"stage": s, "pairs": sum(len(subs) for subs in per_mb),
                       "changed": len(mine),
                       "recompute_layers": sum(v.recompute_layers for v in mine),
                       "offload_layers": sum(v.offload_layers for v in mine)})
    return {"added_s": plan.added_s, "feasible": list(plan.feasible),
            "method": list(plan.method), "solve_ms": list(plan.solve_ms), "stages": stages}


def _pairs(actions) -> tuple[list[Key], np.ndarray]:
    """Pairs in forward order and, per pair, the forwards run before its backward."""
    keys: list[Key] = []
    index: dict[Key, int] = {}
    last: list[int] = []
    for a in actions:
        key = (a.stage, a.microbatch, a.sub)
        if a.op is Op.F:
            index[key] = len(keys)
            keys.append(key)
            last.append(-1)
        elif key in index:
            last[index[key]] = len(keys)
    ends = np.array(last, dtype=np.int64)
    ends[ends < 0] = len(keys)
    return keys, ends


def _loads(saved: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Bytes live at every forward position (see [Note: liveness])."""
    n = len(saved)
    delta = saved - np.bincount(last, weights=saved, minlength=n + 1)[:n]
    return np.cumsum(delta)


def _cover(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, rows: int) -> np.ndarray:
    """Per row, the sum of values over the pairs live at it."""
    delta = np.bincount(lo, weights=values, minlength=rows + 1)
    delta -= np.bincount(hi, weights=values, minlength=rows + 1)
    return np.cumsum(delta)[:rows]


def _fits(saving: np.ndarray, lo: np.ndarray, hi: np.ndarray, excess: np.ndarray) -> bool:
    """Whether pairs saving these bytes cover every row's excess (up to rounding)."""
    return bool((_cover(saving, lo, hi, len(excess)) >= excess - _TOL).all())


def _greedy(extra, save, lo, hi, excess) -> np.ndarray:
    """Fix the row furthest over budget with the moves of best bytes saved (up to what
    it lacks) per second added, until every row fits; needs a feasible instance."""
    choice = np.zeros(len(lo), dtype=np.int64)
    short = excess.astype(float).copy()
    while True:
        r = int(np.argmax(short))
        if short[r] <= _TOL:
            break
        live = np.flatnonzero((lo <= r) & (hi > r))
        now = choice[live]
        gain = save[live] - save[live, now][:, None]
        cost = extra[live] - extra[live, now][:, None]
        score = np.where(gain > 0, np.minimum(gain, short[r]) / np.maximum(cost, 1e-12), -1.0)
        best = score.argmax(axis=1)
        top = score[np.arange(len(live)), best]
        order = np.argsort(-top, kind="stable")
        order = order[top[order] >= 0]
        if not len(order):  # only rounding left over: the instance is feasible
            break
        # Take the best move of each live pair, best first, until the row fits: the
        # one-move-at-a-time greedy would mostly pick the same ones at this row.
        gained = gain[order, best[order]]
        order = order[:int(np.searchsorted(np.cumsum(gained), short[r] - _TOL)) + 1]
        for q in order:
            p = live[q]
            short[lo[p]:hi[p]] -= gain[q, best[q]]
            choice[p] = best[q]
    return _relax(extra, save, lo, hi, short, choice)


def _relax(extra, save, lo, hi, short, choice) -> np.ndarray:
    """Undo over-protection: costliest first, move each pair to its fastest candidate
    that the slack (-short) of every row it is live at still allows."""
    for p in np.argsort(-extra[np.arange(len(lo)), choice], kind="stable"):
        now = choice[p]
        if not now:
            continue
        room = save[p, now] + short[lo[p]:hi[p]].max() - _TOL
        c = int(np.argmax(save[p, :now + 1] >= room))
        if c < now and save[p, c] >= room:
            short[lo[p]:hi[p]] += save[p, now] - save[p, c]
            choice[p] = c
    return choice


def _ilp(extra, save, last, lo, hi, excess, warm, gap, time_limit_s,
         max_nodes: int | None = None) -> np.ndarray | None:
    """The ILP with HiGHS; None when it finds nothing feasible in time.

    [Note: LP first] The LP relaxation takes milliseconds and leaves few pairs
    fractional; rounding each pair up to its cheapest candidate that saves at least the
    LP's savings stays feasible. When the better of that and the warm start is within
    `gap` of the LP bound it is returned (the usual case on real batches); otherwise
    branch and bound starts from it for the time left, or for at most max_nodes nodes
    (a work limit, so the result does not depend on the machine's speed; 0 skips branch
    and bound).
    """
    began = time.perf_counter()
    pairs, rows = len(lo), len(excess)
    every = np.arange(pairs)
    pair = np.repeat(every, last)
    cand = np.arange(len(pair)) - np.repeat(np.cumsum(last) - last, last) + 1
    lp = _model(extra, save, lo, hi, excess, pair, cand)
    # [Note: quiet HiGHS] highspy.Highs prints a banner to stdout on first use, which would
    # corrupt JSON printed by the CLI; the core class it wraps does not.
    solver = getattr(highspy, "_Highs", highspy.Highs)()
    # Presolve is off: the LP needs none, and with a MIP start HiGHS 1.16's presolve can
    # report a wrong "optimal" incumbent (seen on a 5-pair instance).
    for name, value in (("output_flag", False), ("mip_rel_gap", gap), ("presolve", "off"),
                        ("time_limit", time_limit_s)):
        solver.setOptionValue(name, value)
    if solver.passModel(lp) != highspy.HighsStatus.kOk or solver.run() != highspy.HighsStatus.kOk \
            or solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    bound = solver.getInfo().objective_function_value / 1e3
    x = np.asarray(solver.getSolution().col_value)[:len(pair)]
    floor = np.bincount(pair, x * save[pair, cand], minlength=pairs) - _LP_TOL * _UNIT
    rounded = np.argmax(save >= floor[:, None], axis=1)
    short = excess - _cover(save[every, rounded], lo, hi, rows)
    options = [warm]
    if short.max() <= _TOL:  # else the LP met a row only within HiGHS's tolerance
        options.append(_relax(extra, save, lo, hi, short, rounded))
    best = min(options, key=lambda c: extra[every, c].sum())
    cost = extra[every, best].sum()
    left = time_limit_s - (time.perf_counter() - began)
    if cost - bound <= gap * cost or left <= 0 or max_nodes == 0:
        return best
    if max_nodes is not None:
        solver.setOptionValue("mip_max_nodes", max_nodes)
    hint = highspy.HighsSolution()
    hint.col_value = np.concatenate(((cand == best[pair]).astype(float),
                                     _cover(save[every, best] / _UNIT, lo, hi, rows)))
    hint.value_valid = True
    solver.setOptionValue("time_limit", left)
    integer = np.full(len(pair), int(highspy.HighsVarType.kInteger), dtype=np.uint8)
    if solver.changeColsIntegrality(len(pair), np.arange(len(pair), dtype=np.int32), integer) \
            != highspy.HighsStatus.kOk or solver.setSolution(hint) != highspy.HighsStatus.kOk \
            or solver.run() != highspy.HighsStatus.kOk \
            or not solver.getSolution().value_valid:
        return best
    chosen = np.asarray(solver.getSolution().col_value)[:len(pair)] > 0.5
    found = np.zeros(pairs, dtype=np.int64)
    found[pair[chosen]] = cand[chosen]
    if not _fits(save[every, found], lo, hi, excess) \
            or extra[every, found].sum() > cost:
        return best
    return found


def _model(extra, save, lo, hi, excess, pair, cand) -> highspy.HighsLp:
    """The ILP in flow form, sparse however long pairs live.

    Columns: x_pc for the non-fastest candidates (cost in ms), then z_r >= excess_r,
    what the live pairs save at violated row r (bytes in _UNIT). Rows: z_r - z_{r-1} =
    savings of the pairs whose interval starts at r - savings of those ending there
    (so z_r sums the pairs live at r), then one choice row per pair (sum_c x_pc <= 1).
    """
    rows, pairs, n = len(excess), len(lo), len(pair)
    value = save[pair, cand] / _UNIT
    inside = hi[pair] < rows
    z = np.arange(rows)
    col = np.concatenate((np.arange(n), np.flatnonzero(inside), np.arange(n), n + z, n + z[:-1]))
    row = np.concatenate((lo[pair], hi[pair][inside], rows + pair, z, z[1:]))
    val = np.concatenate((-value, value[inside], np.ones(n), np.ones(rows), -np.ones(rows - 1)))
    order = np.lexsort((row, col))
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n + rows, rows + pairs
    lp.col_cost_ = np.concatenate((extra[pair, cand] * 1e3, np.zeros(rows)))
    lp.col_lower_ = np.concatenate((np.zeros(n), excess / _UNIT))
    lp.col_upper_ = np.concatenate((np.ones(n), np.full(rows, inf)))
    lp.row_lower_ = np.concatenate((np.zeros(rows), np.full(pairs, -inf)))
    lp.row_upper_ = np.concatenate((np.zeros(rows), np.ones(pairs)))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.searchsorted(col[order], np.arange(n + rows + 1)).astype(np.int32)
    lp.a_matrix_.index_ = row[order].astype(np.int32)
    lp.a_matrix_.value_ = val[order]
    return lp


def _apply(base: PricedBatch, changed: dict[Key, StageCost]) -> PricedBatch:
    """base with the changed (stage, microbatch, sub) costs replaced."""
    if not changed:
        return base
    costs = [list(list(subs) for subs in per_mb) if any(k[0] == s for k in changed) else per_mb
             for s, per_mb in enumerate(base.costs)]
    for (s, m, k), cost in changed.items():
        costs[s][m][k] = cost
    return PricedBatch(tuple(tuple(tuple(subs) for subs in per_mb) for per_mb in costs))
