"""The planner service: plans arrive ahead of training and equal in-process plans;
crashes, hangs, bad plans and lateness fall back for exactly the iteration concerned;
the prefetching iterator keeps the planner ahead without dropping a batch."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import pytest

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.planner import (PipeWeaverPlanner, SearchSettings, check_plan, partition,
                                         split_batch)
from pipeweaver_megatron.planner.iteration import plan_iteration
from pipeweaver_megatron.semu import CostModel, simulate
from pipeweaver_megatron.service import (PlannerService, PrefetchingIterator, ServiceSettings,
                                         baseline_table, fallback_plan)
from pipeweaver_megatron.workload import GlobalBatch, TokenRules, sample_workload

TINY = load_model("tiny-vlm")
TINY_BATCHES = sample_workload(TINY, None, 8, 0)
VLM_S = load_model("vlm-s")
VLM_S_BATCHES = [replace(b, microbatches=b.microbatches[:8])  # 8 of 64: seconds, not minutes
                 for b in sample_workload(VLM_S, None, 2, 0)]


def settings(**kw) -> ServiceSettings:
    base = dict(model="tiny-vlm", hardware="cpu", budget_ms=100, timeout_ms=20_000,
                reference=TINY_BATCHES[0], seed=5)
    return ServiceSettings(**{**base, **kw})


def in_process(model, batches: list[GlobalBatch], seed: int, evaluations: int) -> list[str]:
    costs = CostModel(model, get_hardware("cpu"))
    chunks = partition(costs, num_ranks=model.parallel.pp, reference=batches[0])
    planner = PipeWeaverPlanner(costs, chunks, SearchSettings(max_evaluations=evaluations))
    rules, hashes = TokenRules.from_model(model), []
    for i, batch in enumerate(batches):
        result = planner.plan(batch, 3_600_000, seed + i)
        plan = plan_iteration(model, result.table, batch, rules, "float32", model.parallel.tp,
                              result.sub_microbatches.members, result.simulation,
                              result.memory.strategies)
        hashes.append(plan.content_hash)
    return hashes


def run(service: PlannerService, batches, lookahead: int, pause_s: float = 0.0) -> list:
    outcomes = []
    for i, batch in PrefetchingIterator(batches, service, lookahead):
        outcomes.append(service.get(i))
        assert outcomes[-1].plan.batch.sample_ids == batch.sample_ids
        time.sleep(pause_s)
    return outcomes


@pytest.mark.parametrize("name, batches, workers", [("tiny-vlm", TINY_BATCHES[:4], 2),
                                                     ("vlm-s", VLM_S_BATCHES, 1)])
def test_plans_equal_in_process_plans_with_the_same_seed(name, batches, workers):
    model = load_model(name)
    with PlannerService(settings(model=name, workers=workers, max_evaluations=3,
                                 reference=batches[0])) as service:
        outcomes = run(service, batches, lookahead=len(batches))
        assert service.stats().planned == len(batches)
    assert [o.source for o in outcomes] == ["planner"] * len(batches)
    assert [o.plan.content_hash for o in outcomes] == in_process(model, batches, 5, 3)
    for o in outcomes:
        check_plan(o.plan.execution, o.plan.table)


def test_baseline_schedules_run_through_the_same_path():
    with PlannerService(settings(schedule="megatron-interleaved")) as service:
        outcomes = run(service, TINY_BATCHES[:2], lookahead=1)
    rules = TokenRules.from_model(TINY)
    assert [o.source for o in outcomes] == ["planner"] * 2
    assert [o.plan.content_hash for o in outcomes] == [
        fallback_plan(TINY, b, rules, "megatron-interleaved", 4).content_hash
        for b in TINY_BATCHES[:2]]


def test_lookahead_plans_are_ready_before_they_are_needed():
    with PlannerService(settings()) as service:
        outcomes = run(service, TINY_BATCHES, lookahead=2, pause_s=0.25)
    assert all(o.source == "planner" for o in outcomes)
    ready = sum(o.waited_ms < 2.0 for o in outcomes)
    assert ready >= len(outcomes) - 2, [round(o.waited_ms) for o in outcomes]


def test_an_urgent_batch_is_planned_before_the_batches_waiting():
    """An evaluation step (urgent) goes before the training batches already queued."""
    with PlannerService(settings(workers=1)) as service:
        submitted = {}
        for key, batch, urgent in [(0, TINY_BATCHES[0], False), (1, TINY_BATCHES[1], False),
                                   (2, TINY_BATCHES[2], False), (99, TINY_BATCHES[3], True)]:
            submitted[key] = time.perf_counter()
            service.submit(key, batch, urgent=urgent)
        ready = {}
        for key in (99, 0, 1, 2):
            outcome = service.get(key)
            assert outcome.source == "planner"
            ready[key] = submitted[key] + outcome.latency_ms / 1000
    assert ready[99] < ready[1] < ready[2], ready  # queued last, planned before 1 and 2


@pytest.mark.parametrize("fault, reason, restarts", [
    ("planner-crash", "planner died", 1), ("planner-hang", "hung", 1),
    ("bad-plan", "invalid plan: ", 0), ("bad-samples", "invalid plan: missing samples", 0)])
def test_a_fault_falls_back_for_its_iteration_only(fault, reason, restarts, caplog):
    with PlannerService(settings(max_evaluations=3, hang_ms=1500, faults={2: fault})) as service:
        outcomes = run(service, TINY_BATCHES[:5], lookahead=1)
        stats = service.stats()
        layout = service.layout
    assert [o.source for o in outcomes] == ["planner"] * 2 + ["fallback"] + ["planner"] * 2
    assert outcomes[2].reason.startswith(reason)
    assert stats.restarts == restarts and stats.planned == 4
    assert sum(stats.fallbacks.values()) == 1
    fallback = outcomes[2].plan
    check_plan(fallback.execution, fallback.table)
    # the run's chunks follow its own layout, so the fallback (static order) keeps it
    assert fallback.table.layout == layout != baseline_table(TINY, "megatron-1f1b", 8, 4).layout
    assert any("iteration 2" in r.getMessage() and r.name == "pipeweaver.service"
               for r in caplog.records)


def test_a_late_plan_falls_back_without_waiting_longer_than_the_timeout():
    timeout_ms = 50
    with PlannerService(settings(budget_ms=300, timeout_ms=timeout_ms)) as service:
        outcomes, spent = [], []
        for i, batch in PrefetchingIterator(TINY_BATCHES[:3], service, lookahead=0):
            started = time.perf_counter()
            outcomes.append(service.get(i))
            spent.append((time.perf_counter() - started) * 1000)
        assert service.stats().fallbacks == {"late": 3}
    assert [(o.source, o.reason) for o in outcomes] == [("fallback", "late")] * 3
    assert max(o.waited_ms for o in outcomes) <= timeout_ms + 30
    assert max(spent) <= timeout_ms + 250, spent  # + building the fallback plan


class Recorder:
    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, iteration: int, batch: GlobalBatch) -> None:
        self.submitted.append(iteration)


@pytest.mark.parametrize("lookahead", [0, 1, 3, 20])
def test_prefetching_yields_every_batch_once_in_order(lookahead):
    batches = [GlobalBatch(iteration=i, microbatches=()) for i in range(7)]
    recorder = Recorder()
    seen = []
    for i, batch in PrefetchingIterator(iter(batches), recorder, lookahead, start=10):
        seen.append((i, batch.iteration))
        assert recorder.submitted[-1] == min(i + lookahead, 16)  # always `lookahead` ahead
    assert seen == [(10 + i, i) for i in range(7)]
    assert recorder.submitted == list(range(10, 17))


def test_fallback_plans_are_valid_and_their_tables_cached():
    rules = TokenRules.from_model(TINY)
    for schedule in ("megatron-1f1b", "megatron-interleaved"):
        plan = fallback_plan(TINY, TINY_BATCHES[0], rules, schedule, pp=4, tp=1, dtype="float32")
        check_plan(plan.execution, plan.table)
        assert plan.table.num_microbatches == len(TINY_BATCHES[0].microbatches)
        again = fallback_plan(TINY, TINY_BATCHES[1], rules, schedule, pp=4, tp=1, dtype="float32")
        assert again.table is plan.table
    assert len(plan.table.layout.stages) == 4 * TINY.parallel.vp


def test_settings_are_checked():
    with pytest.raises(ValueError, match="fallback"):
        settings(fallback="gpipe")
    with pytest.raises(ValueError, match="unknown faults"):
        settings(faults={1: "meteor"})
    with pytest.raises(ValueError, match="workers"):
        settings(workers=0)


def test_the_service_imports_neither_torch_nor_megatron():
    code = ("import pipeweaver_megatron.service, sys\n"
            "assert not any(m.split('.')[0] in ('torch', 'megatron') for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _simulate(costs, plan, sub_size):
    """SEMU's detailed prediction of a served plan with `costs`."""
    shapes = split_batch(TINY, plan.batch, TokenRules.from_model(TINY), sub_size).shapes
    return simulate(costs, plan.table, shapes, detail=True)


def test_measured_iterations_recalibrate_the_workers_and_auto_budgets_follow_them():
    """Online calibration through the service: the worker refits SEMU from an
    iteration's measured compute times (here twice SEMU's, plus 1 ms per action) and the
    next plan is priced with the fit; the auto budget follows the observed iterations."""
    from pipeweaver_megatron.semu.online import Measured

    with PlannerService(settings(budget_ms=None, online_calibration=True)) as service:
        sub_size = service.chunks.sub_size
        service.submit(0, TINY_BATCHES[0])
        service.submit(1, TINY_BATCHES[1])
        first = service.get(0)
        assert first.source == "planner" and first.search["calibration_fits"] == 0
        assert first.budget is not None and first.budget.patience
        predicted = _simulate(service.costs, first.plan, sub_size)  # as the worker did
        assert predicted.iteration_time_s == pytest.approx(first.predicted[0])
        measured = {str(a): 0.001 + 2 * (e - s) for acts, ss, es in
                    zip(predicted.actions, predicted.starts, predicted.ends)
                    for a, s, e in zip(acts, ss, es)}
        board = service._board  # plan 1 must be made before the fit lands
        with board.cond:
            board.cond.wait_for(lambda: board.entries[1].done, timeout=60)
        service.observe(2.0, waited_ms=0.0, late=False)
        service.measured(0, Measured(measured, 0.01))
        service.submit(2, TINY_BATCHES[2])  # the worker takes the measurements first
        third = service.get(2)
        second = service.get(1)  # planned before the fit, its prediction updated since
        uncalibrated = [_simulate(service.costs, o.plan, sub_size).iteration_time_s
                        for o in (second, third)]
    assert third.search["calibration_fits"] == 1 and second.search["calibration_fits"] == 0
    assert third.budget.wall_ms == pytest.approx(1000.0)  # half of min(2, 1) iterations
    assert third.predicted[0] > 1.8 * uncalibrated[1]
    assert second.predicted[0] > 1.8 * uncalibrated[0]
