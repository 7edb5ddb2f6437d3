"""A planner worker: a spawned process that plans one batch at a time.

Protocol (one pipe each way, so a worker killed mid-message corrupts only its own pipe):
the parent sends `(iteration, GlobalBatch)` tasks, one at a time, and None to stop; the
worker answers JSON messages (wire.py): "ready" once its planner is built, "error" if it
could not be built, then per task a "plan" or a "failed" (the planner raised).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import replace
from typing import Any

from ..config import ModelSpec, get_hardware
from ..planner.iteration import IterationPlan, plan_iteration
from ..planner.partition import ChunkPlan
from ..planner.search import PipeWeaverPlanner, SearchSettings
from ..planner.systems import PIPEWEAVER
from ..semu import CostModel, load_calibration
from ..workload import GlobalBatch
from .fallback import fallback_plan
from .settings import UNLIMITED_MS, ServiceSettings
from .wire import encode, encode_plan

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
        self.planner = None
        if settings.schedule == PIPEWEAVER:
            if chunks is None:
                raise ValueError("the pipeweaver schedule needs the run's ChunkPlan")
            search = SearchSettings() if settings.max_evaluations is None else \
                SearchSettings(max_evaluations=settings.max_evaluations)
            self.planner = PipeWeaverPlanner(make_costs(settings, self.model), chunks, search)

    def plan(self, iteration: int, batch: GlobalBatch) -> tuple[IterationPlan, dict[str, Any]]:
        """The plan of one iteration (seed + iteration) and facts for the logs."""
        started = time.perf_counter()
        if self.planner is None:
            plan = fallback_plan(self.model, batch, self.rules, self.settings.schedule, self.pp,
                                 self.tp, self.settings.dtype, self.sequence_parallel)
            return plan, {"planning_ms": (time.perf_counter() - started) * 1000}
        budget = self.settings.budget_ms if self.settings.max_evaluations is None else UNLIMITED_MS
        result = self.planner.plan(batch, budget, self.settings.seed + iteration)
        plan = plan_iteration(self.model, result.table, batch, self.rules, self.settings.dtype,
                              self.tp, result.sub_microbatches.members, result.simulation,
                              result.memory.strategies, self.sequence_parallel)
        return plan, {"planning_ms": (time.perf_counter() - started) * 1000,
                      "predicted_iteration_time_s": result.predicted_iteration_time_s,
                      "predicted_bubble_ratio": result.simulation.bubble_ratio,
                      "evaluations": result.search.evaluations}


def worker_main(tasks, results, settings: ServiceSettings, chunks: ChunkPlan | None) -> None:
    """Entry point of a spawned worker (tasks, results: multiprocessing connections)."""
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
        iteration, batch = task
        fault = settings.faults.get(iteration)
        try:
            if fault == "planner-hang":
                while True:
                    time.sleep(3600)
            plan, info = planner.plan(iteration, batch)
            if fault == "planner-crash":
                os._exit(1)
            message = encode_plan(iteration, corrupt(plan, fault), **info)
        except Exception as exc:  # noqa: BLE001 - the parent falls back for this batch
            message = encode("failed", iteration=iteration,
                             error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                             traceback=traceback.format_exc())
        try:
            results.send_bytes(message)
        except (BrokenPipeError, OSError):
            return


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


__all__ = ["BatchPlanner", "corrupt", "make_costs", "worker_main"]
