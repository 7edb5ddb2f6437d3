"""Per-layer memory optimisation: strategy costs against SEMU, the candidate reduction,
the per-rank selection against brute force, and plans checked by independent replay and
by semu.simulate."""

from __future__ import annotations

import itertools
import json
from dataclasses import fields, replace
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Op
from pipeweaver_megatron.planner import partition
from pipeweaver_megatron.planner.candidates import (CandidateCache, Candidates, Strategy,
                                                    reduce_candidates, strategy_cost)
from pipeweaver_megatron.planner.memopt import (optimize_memory, select, summarize,
                                                transformer_layers)
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import CostModel, batch_shapes, price, simulate
from pipeweaver_megatron.workload import TokenRules, sample_workload


@lru_cache(maxsize=None)
def megatron_case(name: str = "vlm-s", offload: bool = False, seed: int = 0):
    """A Megatron 1F1B table of one sampled batch, priced without and with recompute."""
    model = load_model(name)
    hardware = get_hardware(model.hardware)
    if not offload:
        hardware = replace(hardware, host_bandwidth=0.0)
    costs = CostModel(model, hardware)
    batch = sample_workload(model, "obelics", 1, seed)[0]
    shapes = batch_shapes(model, batch, TokenRules.from_model(model))
    table = build_baseline(model, "megatron-1f1b", len(batch.microbatches))
    everything = range(len(table.layout.stages))
    base = price(costs, table.layout, shapes)
    full = price(costs, table.layout, shapes, recompute=everything)
    return costs, table, shapes, base, full, transformer_layers(model, table.layout)


def replay(table, priced, rank):
    """Saved bytes live at every forward of a rank, by walking its order."""
    live, loads = {}, []
    for a in table.ranks[rank]:
        key = (a.stage, a.microbatch, a.sub)
        if a.op is Op.F:
            live[key] = priced.costs[a.stage][a.microbatch][a.sub].saved_bytes
            loads.append(sum(live.values()))
        else:
            live.pop(key, None)
    return loads


def peak_saved(table, priced):
    return [max(replay(table, priced, r), default=0.0) for r in range(len(table.ranks))]


# ---- strategy costs ------------------------------------------------------------------

def test_transformer_layers_match_semu_graphs():
    costs = CostModel(load_model("vlm-s"), get_hardware("H800"))
    layout = partition(costs).layout
    shapes = batch_shapes(costs.model, sample_workload(costs.model, "obelics", 1, 0)[0],
                          TokenRules.from_model(costs.model))
    counted = transformer_layers(costs.model, layout)
    for stage in layout.stages:
        mine = {p.module: shapes[p.module][0][0] for p in stage.parts}
        assert counted[stage.index] == sum(g.layers for g in costs.graphs(stage.parts, mine))
    assert any(len(s.parts) > 1 for s in layout.stages)  # a projector rides along somewhere


@pytest.mark.parametrize("offload", [False, True])
def test_strategy_costs_interpolate_between_semu_prices(offload):
    costs, table, _, base, full, layers = megatron_case(offload=offload)
    bandwidth = costs.hardware.host_bandwidth
    for s, per_mb in enumerate(base.costs):
        b, f, n = per_mb[0][0], full.costs[s][0][0], layers[s]
        assert strategy_cost(b, f, n, Strategy(), bandwidth) == b
        top = strategy_cost(b, f, n, Strategy(n, 0), bandwidth)
        for field in fields(top):
            assert getattr(top, field.name) == pytest.approx(getattr(f, field.name), rel=1e-12)
        steps = [strategy_cost(b, f, n, Strategy(j, 0), bandwidth) for j in range(n + 1)]
        assert all(x.saved_bytes >= y.saved_bytes for x, y in zip(steps, steps[1:]))
        assert all(x.backward_s <= y.backward_s for x, y in zip(steps, steps[1:]))
        assert steps[n // 2].forward_s == b.forward_s
        if offload:
            moved = strategy_cost(b, f, n, Strategy(0, n), bandwidth)
            copy = (b.saved_bytes - f.saved_bytes) / bandwidth
            assert moved.saved_bytes == f.saved_bytes
            assert moved.forward_s == pytest.approx(max(b.forward_s, copy))
            assert moved.backward_s == pytest.approx(max(b.backward_s, copy))
        else:
            with pytest.raises(ValueError):
                strategy_cost(b, f, n, Strategy(0, 1), bandwidth)


def test_candidates_are_shared_and_start_with_keeping_everything():
    costs, table, _, base, full, layers = megatron_case(offload=True)
    cache = CandidateCache(costs.hardware.host_bandwidth, 6)
    distinct = set()
    for s, per_mb in enumerate(base.costs):
        for m, subs in enumerate(per_mb):
            for k, cost in enumerate(subs):
                found = cache.get(cost, full.costs[s][m][k], layers[s])
                distinct.add((cost, full.costs[s][m][k], layers[s]))
                assert found.costs[0] is cost and found.strategies[0] == Strategy()
                assert len(found.costs) <= 6 and found.extra_s[0] == 0
                assert np.all(np.diff(found.saved) < 0) and np.all(np.diff(found.extra_s) >= 0)
                times = [c.forward_s + c.backward_s - cost.forward_s - cost.backward_s
                         for c in found.costs]
                assert times == pytest.approx(list(found.extra_s), abs=1e-12)
    assert len(cache) == len(distinct) < sum(len(subs) for per_mb in base.costs for subs in per_mb)


@given(st.lists(st.floats(0, 10), min_size=1, max_size=60),
       st.lists(st.floats(0, 10), min_size=1, max_size=60), st.integers(2, 12), st.booleans())
def test_reduction_keeps_fastest_smallest_and_a_fast_one_per_bucket(times, sizes, limit, front):
    if front:  # mostly one long Pareto front, as layer-by-layer strategies give
        times, sizes = sorted(times), sorted(sizes, reverse=True)
    time_s = np.array([0.0] + times[:len(sizes)])
    saved = np.array([11.0] + sizes[:len(times)])
    kept = reduce_candidates(time_s, saved, limit)
    assert kept[0] == 0 and len(kept) <= limit and len(set(kept)) == len(kept)
    assert np.all(np.diff(saved[kept]) < 0) and np.all(np.diff(time_s[kept][1:]) > 0)
    assert saved[kept[-1]] == saved.min()
    assert time_s[kept[-1]] == time_s[saved == saved.min()].min()
    width = (saved[kept[0]] - saved[kept[-1]]) / (limit - 2) if limit > 2 else np.inf
    for i in range(1, len(time_s)):
        dominated = (time_s <= time_s[i]) & (saved <= saved[i]) & \
            ((time_s < time_s[i]) | (saved < saved[i]))
        if i in kept:
            assert not dominated[1:].any()
        else:  # a kept candidate is as fast and at most one bucket larger
            near = (time_s[kept] <= time_s[i]) & (saved[kept] <= saved[i] + width + 1e-9)
            assert near.any()


# ---- selection against brute force ---------------------------------------------------

@st.composite
def instances(draw):
    pairs = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 5))
    cands, lo, hi = [], [], []
    for _ in range(pairs):
        k = draw(st.integers(1, 4))
        steps = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 9)),
                              min_size=k - 1, max_size=k - 1))
        extra = np.cumsum([0.0] + [t * 1e-3 for t, _ in steps])
        saved = 10.0 * 2**30 - np.cumsum([0.0] + [m * 2**28 for _, m in steps])
        cands.append(Candidates(strategies=tuple(Strategy(j) for j in range(k)), costs=(),
                                extra_s=extra, saved=saved))
        a = draw(st.integers(0, rows - 1))
        lo.append(a)
        hi.append(draw(st.integers(a + 1, rows)))
    excess = np.array([draw(st.integers(1, 24)) * 2**28 * 0.5 for _ in range(rows)])
    return cands, np.array(lo), np.array(hi), excess


@settings(max_examples=150, deadline=None)
@given(instances())
def test_selection_fits_and_is_within_gap_of_brute_force(instance):
    cands, lo, hi, excess = instance
    best = None
    for choice in itertools.product(*(range(len(c.saved)) for c in cands)):
        saving = np.zeros(len(excess))
        for p, c in enumerate(choice):
            saving[lo[p]:hi[p]] += cands[p].saved[0] - cands[p].saved[c]
        if np.all(saving >= excess):
            cost = sum(cands[p].extra_s[c] for p, c in enumerate(choice))
            best = cost if best is None else min(best, cost)
    got = select(cands, lo, hi, excess, gap=0.05, time_limit_s=5.0)
    hurried = select(cands, lo, hi, excess, gap=0.05, time_limit_s=0.0)  # the greedy alone
    assert got.feasible == hurried.feasible == (best is not None)
    if best is None:
        assert list(got.choice) == [len(c.saved) - 1 for c in cands]
        return
    assert hurried.method != "ilp"
    for answer in (got, hurried):
        saving = np.zeros(len(excess))
        for p, c in enumerate(answer.choice):
            saving[lo[p]:hi[p]] += cands[p].saved[0] - cands[p].saved[c]
        assert np.all(saving >= excess)
        cost = sum(cands[p].extra_s[c] for p, c in enumerate(answer.choice))
        assert cost == pytest.approx(answer.added_s) and cost >= best - 1e-12
    assert got.added_s <= best * 1.05 + 1e-12


# ---- whole plans ---------------------------------------------------------------------

def test_generous_budget_changes_nothing_and_runs_no_solver():
    costs, table, _, base, full, layers = megatron_case()
    top = max(peak_saved(table, base))
    plan = optimize_memory(table, base, full, layers, [top] * len(table.ranks), costs.hardware)
    assert plan.strategies == {} and plan.priced is base and plan.added_s == 0
    assert set(plan.method) == {"none"} and all(plan.feasible)
    tight = optimize_memory(table, base, full, layers, [0.9 * top] * len(table.ranks),
                            costs.hardware)
    assert tight.strategies and tight.added_s > 0  # the same check does see pressure


@pytest.mark.parametrize("offload,fraction", [(False, 0.7), (False, 0.45), (True, 0.45)])
def test_plan_fits_every_forward_by_replay(offload, fraction):
    costs, table, _, base, full, layers = megatron_case(offload=offload)
    budget = [fraction * p for p in peak_saved(table, base)]
    cache = CandidateCache(costs.hardware.host_bandwidth)
    plan = optimize_memory(table, base, full, layers, budget, costs.hardware, cache=cache)
    assert all(plan.feasible) and plan.strategies
    for rank in range(len(table.ranks)):
        assert max(replay(table, plan.priced, rank)) <= budget[rank] * (1 + 1e-9)
    added = 0.0
    for (s, m, k), strategy in plan.strategies.items():
        b, f = base.costs[s][m][k], full.costs[s][m][k]
        expected = strategy_cost(b, f, layers[s], strategy, costs.hardware.host_bandwidth)
        assert plan.priced.costs[s][m][k] == expected
        assert strategy.offload_layers == 0 or offload
        added += expected.forward_s + expected.backward_s - b.forward_s - b.backward_s
    assert added == pytest.approx(plan.added_s)
    if not offload:
        assert "ilp" in plan.method  # the solver ran and its answer was kept
    entries = len(cache)
    optimize_memory(table, base, full, layers, budget, costs.hardware, cache=cache)
    assert len(cache) == entries
    report = json.loads(json.dumps(summarize(plan)))
    assert sum(s["changed"] for s in report["stages"]) == len(plan.strategies)
    assert sum(s["recompute_layers"] for s in report["stages"]) == \
        sum(v.recompute_layers for v in plan.strategies.values())


def test_impossible_budget_is_reported_with_the_smallest_choice():
    costs, table, _, base, full, layers = megatron_case()
    smallest = [min(replay(table, full, r)) for r in range(len(table.ranks))]
    budget = [float("inf")] * len(table.ranks)
    budget[1] = 0.5 * smallest[1]
    plan = optimize_memory(table, base, full, layers, budget, costs.hardware)
    assert plan.feasible == tuple(r != 1 for r in range(len(table.ranks)))
    assert plan.method[1] == "none"
    for a in table.ranks[1]:
        if a.op is Op.F and layers[a.stage]:
            assert plan.strategies[(a.stage, a.microbatch, a.sub)] == Strategy(layers[a.stage], 0)


def test_simulated_peak_stays_under_capacity():
    costs, table, shapes, base, full, layers = megatron_case()
    static = [s.total_bytes for s in costs.static_memory(table.layout)]
    # Room for every P2P message at once: received activations and gradients.
    buffers = 2 * sum(c.output_bytes for per_mb in base.costs for subs in per_mb for c in subs)
    capacity = [st + buffers + 0.6 * p for st, p in zip(static, peak_saved(table, base))]
    before = simulate(costs, table, shapes, priced=base)
    assert any(p > c for p, c in zip(before.peak_memory_bytes, capacity))
    budget = [c - st - buffers for c, st in zip(capacity, static)]
    plan = optimize_memory(table, base, full, layers, budget, costs.hardware)
    after = simulate(costs, table, shapes, priced=plan.priced)
    assert all(plan.feasible)
    assert all(p <= c for p, c in zip(after.peak_memory_bytes, capacity))
    assert after.iteration_time_s > before.iteration_time_s
