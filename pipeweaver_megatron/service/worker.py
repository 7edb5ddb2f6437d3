"""A planner worker: a spawned process that plans one batch at a time.

Protocol (one pipe each way, so a worker killed mid-message corrupts only its own pipe):
the parent sends `(iteration, GlobalBatch, SearchBudget | None)` tasks, one at a time
(None: the settings' budget_ms), Measurement tasks (a trained iteration's measured times,
for the online calibration; no answer), and None to stop; the worker answers JSON messages
(wire.py): "ready" once its planner is built, "error" if it could not be built, then per
task a "plan" (checked by the worker with wire.read_plan, as the parent would), an
"invalid" (that check failed) or a "failed" (the planner raised); after a Measurement
that refitted SEMU, a "predicted" per plan it had already sent (its new prediction).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

from ..config import ModelSpec, get_hardware
from ..planner.iteration import IterationPlan, plan_iteration
from ..planner.partition import ChunkPlan
from ..ir import Layout
from ..planner.search import PipeWeaverPlanner, SearchBudget, SearchSettings
from ..planner.systems import PIPEWEAVER
from ..semu import CostModel, load_calibration, simulate
from ..semu.online import KEPT_PLANS, Measured, OnlineCalibration
from ..workload import GlobalBatch
from .fallback import fallback_plan
from .settings import UNLIMITED_MS, ServiceSettings
from .wire import InvalidPlan, decode, encode, encode_plan, read_plan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Element size of the run's activation dtype (ServiceSettings.dtype)."""


def make_costs(settings: ServiceSettings, model: ModelSpec) -> CostModel:
    """The cost model of the run: hardware, calibration and TP from the settings; the
    element size of activations and messages follows the run's dtype (an fp32 run is
    priced as fp32, a bf16 one as bf16, whatever the hardware profile's default)."""
    hardware = get_hardware(settings.hardware or model.hardware)
    if settings.dtype in DTYPE_BYTES:
        hardware = replace(hardware, dtype_bytes=DTYPE_BYTES[settings.dtype])
    calibration = load_calibration(settings.calibration) if settings.calibration else None
    return CostModel(model, hardware, calibration=calibration, tp=settings.tp or model.parallel.tp,
                     sequence_parallel=settings.sequence_parallel)


class BatchPlanner:
    """Plans batches as the service's workers do (usable in-process too)."""

    def __init__(self, settings: ServiceSettings, chunks: ChunkPlan | None) -> None:
        self.settings = settings
        run = settings.resolve()
        self.model, self.rules, self.pp, self.tp = run.model, run.rules, run.pp, run.tp
        self.sequence_parallel = run.sequence_parallel
        self.planner = self.online = None
        if settings.schedule == PIPEWEAVER:
            if chunks is None:
                raise ValueError("the pipeweaver schedule needs the run's ChunkPlan")
            self.chunks = chunks
            self.search = SearchSettings() if settings.max_evaluations is None else \
                SearchSettings(max_evaluations=settings.max_evaluations)
            costs = make_costs(settings, self.model)
            self.planner = PipeWeaverPlanner(costs, chunks, self.search)
            if settings.online_calibration:
                self.online = OnlineCalibration(costs.calibration)
        self._recent: dict[int, tuple] = {}
        """Recent plans without memory strategies: iteration -> (table, shapes)."""

    def measured(self, key: int, measured: Measured) -> dict[int, tuple[float, float]]:
        """An iteration's measurements (online calibration): refit SEMU's runtime terms
        and plan the next batches with them. Returns the plans made after `key` and
        before the fit, predicted again with it: {iteration: (time s, bubble)} (a plan
        with recompute or offload keeps its prediction)."""
        if self.online is None:
            return {}
        calibration = self.online.measured(key, measured)
        if calibration is None:
            return {}
        # the stages priced so far are kept (temporal reuse): only the terms change
        costs = self.planner.costs.recalibrated(calibration)
        self.planner = PipeWeaverPlanner(costs, self.chunks, self.search)
        again = {}
        for later, (table, shapes) in self._recent.items():
            if later > key:
                result = simulate(costs, table, shapes, detail=False)
                again[later] = (result.iteration_time_s, result.bubble_ratio)
        return again

    def plan(self, iteration: int, batch: GlobalBatch, budget: SearchBudget | None = None
             ) -> tuple[IterationPlan, dict[str, Any]]:
        """The plan of one iteration (seed + iteration) and facts for the logs; budget:
        the search's (None: the settings' budget_ms)."""
        started, cpu = time.perf_counter(), time.process_time()
        if self.planner is None:
            plan = fallback_plan(self.model, batch, self.rules, self.settings.schedule, self.pp,
                                 self.tp, self.settings.dtype, self.sequence_parallel)
            return plan, {"planning_ms": (time.perf_counter() - started) * 1000}
        if self.settings.max_evaluations is not None:
            budget = UNLIMITED_MS
        elif budget is None:
            budget = self.settings.budget_ms if self.settings.budget_ms is not None \
                else SearchBudget(wall_ms=500.0)
        result = self.planner.plan(batch, budget, self.settings.seed + iteration)
        if self.online is not None:
            self.online.planned(iteration, result.simulation, self.chunks.layout)
            if not result.memory.strategies:
                self._recent[iteration] = (result.table, result.sub_microbatches.shapes)
                for old in sorted(self._recent)[:-KEPT_PLANS]:
                    del self._recent[old]
        plan = plan_iteration(self.model, result.table, batch, self.rules, self.settings.dtype,
                              self.tp, result.sub_microbatches.members, result.simulation,
                              result.memory.strategies, self.sequence_parallel)
        return plan, {"planning_ms": (time.perf_counter() - started) * 1000,
                      "cpu_ms": (time.process_time() - cpu) * 1000,
                      "predicted_iteration_time_s": result.predicted_iteration_time_s,
                      "predicted_bubble_ratio": result.simulation.bubble_ratio,
                      "evaluations": result.search.evaluations,
                      "calibration_fits": self.online.fits if self.online else 0}


def worker_main(tasks, results, settings: ServiceSettings, chunks: ChunkPlan | None,
                layout: Layout) -> None:
    """Entry point of a spawned worker (tasks, results: multiprocessing connections;
    layout: the run's, which every plan is checked against)."""
    if settings.niceness and hasattr(os, "nice"):
        os.nice(settings.niceness)  # spare CPU only: training ranks keep their cores
    if settings.niceness and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        planner = BatchPlanner(settings, chunks)
    except Exception:  # noqa: BLE001 - reported to the parent, which refuses to start
        results.send_bytes(encode("error", error=traceback.format_exc()))
        return
    results.send_bytes(encode("ready", pid=os.getpid()))
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if task is None:
            return
        if isinstance(task, Measurement):
            for later, (seconds, bubble) in planner.measured(task.key, task.measured).items():
                try:  # the fit reached plans already sent: their prediction, updated
                    results.send_bytes(encode("predicted", iteration=later,
                                              predicted_iteration_time_s=seconds,
                                              predicted_bubble_ratio=bubble))
                except (BrokenPipeError, OSError):
                    return
            continue
        iteration, batch, budget = task
        fault = settings.faults.get(iteration)
        try:
            if fault == "planner-hang":
                while True:
                    time.sleep(3600)
            plan, info = planner.plan(iteration, batch, budget)
            if fault == "planner-crash":
                os._exit(1)
            message = checked(encode_plan(iteration, corrupt(plan, fault), validated=True,
                                          **info), iteration, batch, layout, planner)
        except Exception as exc:  # noqa: BLE001 - the parent falls back for this batch
            message = encode("failed", iteration=iteration,
                             error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                             traceback=traceback.format_exc())
        try:
            results.send_bytes(message)
        except (BrokenPipeError, OSError):
            return


@dataclass(frozen=True)
class Measurement:
    """A task that is not a batch: one trained iteration's measurements."""

    key: int
    measured: Measured


def checked(message: bytes, iteration: int, batch: GlobalBatch, layout: Layout,
            planner: BatchPlanner) -> bytes:
    """The message if wire.read_plan accepts it as the parent would, else an "invalid"."""
    try:
        read_plan(decode(message), batch, layout, planner.settings.dtype, planner.tp,
                  planner.sequence_parallel)
    except InvalidPlan as exc:
        return encode("invalid", iteration=iteration, error=str(exc))
    return message


def corrupt(plan: IterationPlan, fault: str | None) -> IterationPlan:
    """The injected "bad-plan" (rank 0's first and last actions swapped in the table,
    the execution plan left as compiled) and "bad-samples" (the batch's last sample
    dropped); any other fault leaves the plan as is."""
    if fault == "bad-plan":
        ranks = list(plan.table.ranks)
        first = list(ranks[0])
        first[0], first[-1] = first[-1], first[0]
        ranks[0] = tuple(first)
        return replace(plan, table=replace(plan.table, ranks=tuple(ranks)))
    if fault == "bad-samples":
        microbatches = list(plan.batch.microbatches)
        last = microbatches[-1]
        microbatches[-1] = replace(last, samples=last.samples[:-1]) if len(last.samples) > 1 \
            else replace(microbatches[0], index=last.index)
        return replace(plan, batch=replace(plan.batch, microbatches=tuple(microbatches)))
    return plan


__all__ = ["BatchPlanner", "Measurement", "checked", "corrupt", "make_costs", "worker_main"]
