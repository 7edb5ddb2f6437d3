"""The auto search budget: the policy follows the measured iteration time, the cores
training leaves idle and late plans; the search honours each limit of a SearchBudget.
And SEMU's online calibration: refitted runtime terms recover a machine's measured
action times, outliers left out."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.ir import Op
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchBudget, partition, split_batch
from pipeweaver_megatron.semu import CostModel, price
from pipeweaver_megatron.semu.online import Measured, OnlineCalibration
from pipeweaver_megatron.service.budget import (CPU_SHARE, FIRST_WALL_MS, PATIENCE,
                                                BudgetPolicy, Machine)
from pipeweaver_megatron.workload import sample_workload

MODEL = load_model("tiny-vlm")
COSTS = CostModel(MODEL, get_hardware("cpu"))
BATCHES = sample_workload(MODEL, MODEL.dataset, 3, seed=11)
PLANNER = PipeWeaverPlanner(COSTS, partition(COSTS, num_ranks=2, reference=BATCHES[0]))


def steady(policy: BudgetPolicy, seconds: float, times: int = 5) -> None:
    for _ in range(times):
        policy.observe(seconds, waited_ms=0.0, late=False)


def test_a_free_core_per_worker_gets_half_the_lookahead_window_and_no_cpu_limit():
    policy = BudgetPolicy(workers=2, lookahead=2, machine=Machine(cores=8, training=4))
    assert policy.next().wall_ms == FIRST_WALL_MS and policy.next().cpu_ms is None
    steady(policy, 0.8)
    budget = policy.next()
    # a plan may take min(lookahead, workers) = 2 iterations; half of them is searched
    assert budget.wall_ms == pytest.approx(800.0) and budget.cpu_ms is None
    assert budget.patience == PATIENCE


def test_training_on_every_core_bounds_the_planner_cpu_to_a_share_of_the_iteration():
    policy = BudgetPolicy(workers=1, lookahead=2, machine=Machine(cores=2, training=2))
    steady(policy, 1.0)
    budget = policy.next()
    assert budget.cpu_ms == pytest.approx(CPU_SHARE * 1000)
    assert budget.wall_ms == pytest.approx(500.0)  # min(2, 1) iterations, half of it


def test_the_iteration_time_is_a_median_robust_to_one_slow_step():
    policy = BudgetPolicy(workers=1, lookahead=1, machine=Machine(cores=4, training=1))
    for seconds in (1.0, 1.0, 30.0, 1.0, 1.0):  # an evaluation step or a checkpoint
        policy.observe(seconds, waited_ms=0.0, late=False)
    assert policy.next().wall_ms == pytest.approx(500.0)


def test_late_plans_halve_the_budget_and_on_time_plans_grow_it_back():
    policy = BudgetPolicy(workers=1, lookahead=2, machine=Machine(cores=4, training=2))
    steady(policy, 1.0)
    full = policy.next().wall_ms
    policy.observe(1.0, waited_ms=0.0, late=True)
    assert policy.next().wall_ms == pytest.approx(full / 2)
    policy.observe(1.0, waited_ms=200.0, late=False)  # waited 20% of an iteration: slow too
    assert policy.next().wall_ms == pytest.approx(full / 4)
    steady(policy, 1.0, times=20)
    assert policy.next().wall_ms == pytest.approx(full)  # never above the rule's value


def test_without_lookahead_the_plan_is_on_the_critical_path_and_costs_little():
    policy = BudgetPolicy(workers=1, lookahead=0, machine=Machine(cores=8, training=1))
    steady(policy, 2.0)
    assert policy.next().wall_ms == pytest.approx(40.0)


def test_machine_detection_reads_the_launchers_local_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    machine = Machine.detect()
    assert machine.training == 3 and machine.cores >= 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert Machine.detect().training == 4


def test_patience_stops_the_search_after_that_many_evaluations_without_a_gain():
    hours = 3_600_000.0
    short = PLANNER.plan(BATCHES[0], SearchBudget(wall_ms=hours, patience=15), seed=3).search
    longer = PLANNER.plan(BATCHES[0], SearchBudget(wall_ms=hours, patience=60), seed=3).search
    assert 15 <= short.evaluations <= longer.evaluations
    # no improvement of 0.1% or more in the last 15 evaluations before the stop
    best = None
    for _, evaluation, seconds in short.history:
        if evaluation > short.evaluations - 15 and best is not None:
            assert (best - seconds) / best < 1e-3, short.history
        best = seconds


def test_a_cpu_budget_bounds_the_search_whatever_the_wall_budget():
    started = time.process_time()
    result = PLANNER.plan(BATCHES[1], SearchBudget(wall_ms=3_600_000.0, cpu_ms=30.0), seed=3)
    used_ms = (time.process_time() - started) * 1000
    free = PLANNER.plan(BATCHES[1], SearchBudget(wall_ms=600.0), seed=3)
    assert result.search.evaluations < free.search.evaluations
    assert used_ms < 30.0 + 400.0  # the limit, plus pricing and the final simulation


def test_a_budget_with_a_negative_limit_is_refused():
    with pytest.raises(ValueError, match="cpu_ms"):
        SearchBudget(wall_ms=10.0, cpu_ms=-1.0)
    with pytest.raises(ValueError, match="patience"):
        SearchBudget(wall_ms=10.0, patience=0)


# -- SEMU calibrated online (semu/online.py) ------------------------------------------


def synthetic_measurement(result, calibration, overhead_s: float, scale: float,
                          outside_s: float, spoil: int = 0) -> Measured:
    """What a machine `scale` times slower than SEMU's raw compute, with `overhead_s` per
    action, measures for a plan SEMU predicted with `calibration`; `spoil` actions take
    50x as long (a preempted rank)."""
    actions = {}
    for acts, starts, ends in zip(result.actions, result.starts, result.ends):
        for action, start, end in zip(acts, starts, ends):
            kind = "+".join(PLANNER.layout.stages[action.stage].modules)
            terms, phase = calibration.runtime_terms(kind), 0 if action.op == Op.F else 1
            raw = (end - start - terms.overhead_s[phase]) / terms.scale[phase]
            actions[str(action)] = overhead_s + scale * raw
    for label in sorted(actions)[:spoil]:
        actions[label] *= 50
    return Measured(actions, outside_s)


def planner_for(calibration) -> PipeWeaverPlanner:
    """The worker's planner after a refit: the same chunks, priced with `calibration`."""
    return PipeWeaverPlanner(CostModel(MODEL, get_hardware("cpu"), calibration=calibration),
                             PLANNER.chunks)


def test_online_fit_recovers_the_runtime_terms_and_ignores_outliers():
    online = OnlineCalibration(COSTS.calibration)
    for key, batch in enumerate(BATCHES * 2):  # as a worker: each plan priced with the last fit
        used = online.current
        result = planner_for(used).plan(batch, SearchBudget(wall_ms=50.0), seed=key)
        online.planned(key, result.simulation, PLANNER.layout)
        fitted = online.measured(key, synthetic_measurement(result.simulation, used, 0.002,
                                                            3.0, 0.05, spoil=3))
        assert fitted is not None and online.fits == key + 1
    assert fitted.action_scale == pytest.approx((3.0, 3.0), rel=0.01)
    assert fitted.action_overhead_s == pytest.approx((0.002, 0.002), rel=0.05)
    assert fitted.iteration_overhead_s == pytest.approx(0.05)
    for terms in fitted.chunk_runtime.values():  # kinds with enough actions of their own
        assert terms.scale == pytest.approx((3.0, 3.0), rel=0.01)


def test_online_fit_needs_the_plan_it_measures():
    online = OnlineCalibration(COSTS.calibration)
    assert online.measured(7, Measured({"0F0": 0.1}, 0.0)) is None  # another worker's plan
    result = PLANNER.plan(BATCHES[0], SearchBudget(wall_ms=20.0), seed=1)
    online.planned(7, result.simulation, PLANNER.layout)
    assert online.measured(7, Measured({}, 0.0)) is None  # nothing matched
    assert online.current is COSTS.calibration


def test_recalibrated_costs_reuse_the_priced_graphs_and_equal_a_fresh_model():
    """New runtime terms on a model that priced batches already: every stage cost equals
    that of a model built with them from scratch, without pricing a graph again."""
    online = OnlineCalibration(COSTS.calibration)
    result = PLANNER.plan(BATCHES[0], SearchBudget(wall_ms=50.0), seed=2)
    online.planned(0, result.simulation, PLANNER.layout)
    fitted = online.measured(0, synthetic_measurement(result.simulation, COSTS.calibration,
                                                      0.003, 2.5, 0.0))
    warm = CostModel(MODEL, get_hardware("cpu"))
    layout, shapes = PLANNER.layout, split_batch(MODEL, BATCHES[1], PLANNER.rules,
                                                 PLANNER.chunks.sub_size).shapes
    price(warm, layout, shapes)
    graphs = len(warm._raw)
    reused = warm.recalibrated(fitted)
    fresh = CostModel(MODEL, get_hardware("cpu"), calibration=fitted)
    assert price(reused, layout, shapes).costs == price(fresh, layout, shapes).costs
    assert len(reused._raw) == graphs  # nothing priced from scratch
    with pytest.raises(ValueError, match="beyond their runtime terms"):
        warm.recalibrated(replace(fitted, peak_flops=1e12))
