"""Plans for the training loop: the first rank of each model-parallel group gets the
next iteration's plan (planner service, or fallback) and broadcasts it to the group, so
every TP and PP rank runs the same plan (the runtime checks the hash again)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch.distributed as dist

from ..config import get_hardware
from ..planner import partition
from ..planner.iteration import IterationPlan, plan_iteration
from ..planner.systems import PIPEWEAVER
from ..schedules import build_baseline, megatron_layout
from ..semu import CostModel, batch_shapes, load_calibration, simulate
from ..workload import TokenRules


@dataclass
class _Info:
    source: str
    reason: str | None
    latency_ms: float
    waited_ms: float
    predicted_s: float
    bubble: float


class PlanFeed:
    """One plan per iteration for this rank's model-parallel group."""

    def __init__(self, args, model, batches, topo, group) -> None:
        self.args, self.model, self.batches, self.topo, self.group = args, model, batches, topo, group
        calibration = load_calibration(args.pipeweaver_calibration) \
            if args.pipeweaver_calibration else None
        hardware = get_hardware(args.pipeweaver_hardware or
                                (calibration.hardware if calibration else model.hardware))
        self.costs = CostModel(model, hardware, calibration, tp=topo.tp)
        self.rules = TokenRules.from_model(model)
        self.schedule = args.pipeweaver_schedule
        if self.schedule == PIPEWEAVER:
            self.chunks = partition(self.costs, num_ranks=topo.pp, reference=batches[0])
            self.layout = self.chunks.layout
        else:
            self.chunks = None
            vp = model.parallel.vp if self.schedule == "megatron-interleaved" else 1
            self.layout = megatron_layout(model, topo.pp, vp)
        self.first = dist.get_rank() == dist.get_process_group_ranks(group)[0]
        self.service = None
        self.iteration = 0
        self.fallbacks = 0
        self.info: _Info | None = None

    def start(self, iteration: int) -> None:
        """Start planning at `iteration` (after a resume, the batches before it are done)."""
        self.iteration = iteration
        if self.first:
            self.service = _make_service(self, iteration)

    def next_plan(self) -> IterationPlan:
        """The plan of the current iteration, identical on every rank of the group."""
        payload = [None]
        if self.first:
            payload = [self._take(self.iteration)]
        dist.broadcast_object_list(payload, src=dist.get_process_group_ranks(self.group)[0],
                                   group=self.group)
        plan, self.info = payload[0]
        self.fallbacks += self.info.source == "fallback"
        self.iteration += 1
        return plan

    def _take(self, iteration: int) -> tuple[IterationPlan, _Info]:
        if self.service is not None:
            outcome = self.service.get(iteration)
            plan, source, reason = outcome.plan, outcome.source, outcome.reason
            latency, waited = outcome.latency_ms, outcome.waited_ms
        else:
            began = time.perf_counter()
            plan, source, reason = self.plan_now(iteration), "planner", None
            latency = waited = (time.perf_counter() - began) * 1000
        predicted = self.predict(plan)
        return plan, _Info(source, reason, latency, waited, predicted.iteration_time_s,
                           predicted.bubble_ratio)

    def plan_now(self, iteration: int) -> IterationPlan:
        """Plan in this process (no service): the static schedules, or a search."""
        batch = self.batches[iteration]
        if self.schedule != PIPEWEAVER:
            table = build_baseline(self.model, self.schedule, len(batch.microbatches),
                                   pp=self.topo.pp, vp=None if self.schedule != "megatron-1f1b" else 1)
            return plan_iteration(self.model, table, batch, self.rules, tp=self.topo.tp)
        from ..planner import PipeWeaverPlanner

        result = PipeWeaverPlanner(self.costs, self.chunks).plan(
            batch, self.args.pipeweaver_search_budget_ms, self.args.seed + iteration)
        return plan_iteration(self.model, result.table, batch, self.rules, tp=self.topo.tp,
                              members=result.sub_microbatches.members, timeline=result.simulation)

    def predict(self, plan: IterationPlan):
        """SEMU's prediction of a plan (the same costs the search used)."""
        shapes = batch_shapes(self.model, plan.batch, self.rules)
        if plan.members:
            from ..planner import split_batch

            sizes = self.chunks.sub_size if self.chunks is not None else {}
            shapes = split_batch(self.model, plan.batch, self.rules, sizes).shapes
        return simulate(self.costs, plan.table, shapes, detail=False)

    def record(self, iteration: int, loss: float, tokens: float, elapsed: float) -> dict:
        info = self.info
        return {"iteration": iteration, "loss": loss, "iteration_time_s": elapsed,
                "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "predicted_time_s": info.predicted_s, "bubble_ratio": info.bubble,
                "plan_latency_ms": info.latency_ms, "plan_wait_ms": info.waited_ms,
                "fallback": info.source == "fallback", "fallback_reason": info.reason,
                "fallbacks": self.fallbacks, "source": info.source, "schedule": self.schedule}

    def close(self) -> None:
        if self.service is not None:
            self.service.close()


def _make_service(feed: PlanFeed, start: int):
    """The planner service (side process), or None to plan in this process."""
    try:
        from ..service import PlannerService, ServiceSettings  # noqa: F401
    except ImportError:
        return None
    return None
