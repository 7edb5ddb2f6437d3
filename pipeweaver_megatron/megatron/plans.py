"""Plans for the training loop: the first rank of each model-parallel group gets the
next iteration's plan (planner service, or fallback) and broadcasts it to the group, so
every TP and PP rank runs the same plan (the runtime checks the hash again)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from ..planner import split_batch
from ..ir.plan import IterationPlan
from ..semu import batch_shapes, simulate, write_trace
from ..service import PlannerService, PrefetchingIterator
from ..service.worker import make_costs
from .virtual_stages import layout_reference, service_settings
from ..workload import TokenRules, sample_workload


EVAL_KEYS = 1 << 40
"""Service keys of evaluation steps start here, far above any training iteration."""


def replica_batches(args, model, dp_rank: int) -> list:
    """The global batches data-parallel replica dp_rank trains on (seed * 1000 + d)."""
    return sample_workload(model, getattr(args, "workload", None) or model.dataset,
                           args.train_iters, args.seed * 1000 + dp_rank)


@dataclass
class _Info:
    source: str
    reason: str | None
    latency_ms: float
    waited_ms: float
    predicted_s: float
    bubble: float


class PlanFeed:
    """One plan per iteration for this rank's model-parallel group.

    The group's first rank runs the planner service (side processes planning
    --pipeweaver-lookahead batches ahead, falling back when a plan is late or invalid)
    and broadcasts the run's layout once and each iteration's plan to the group."""

    def __init__(self, args, model, batches, topo, group, parallel: dict | None = None,
                 model_file: str | None = None) -> None:
        """batches: every iteration's GlobalBatch (a list), or an iterator that yields
        them from the first iteration trained on; model_file: where the planner
        workers load the spec (default --pipeweaver-model-config)."""
        self.args, self.model, self.batches, self.topo, self.group = args, model, batches, topo, group
        self.rules = TokenRules.from_model(model)
        self.schedule = args.pipeweaver_schedule
        self.root = dist.get_process_group_ranks(group)[0]
        self.first = dist.get_rank() == self.root
        self.service = self.prefetch = self.costs = None
        if self.first:
            settings = service_settings(args, model, parallel or {}, topo.pp, topo.tp,
                                        model_file)
            self.costs = make_costs(settings, model)  # to predict plans that come unpriced
            self.service = PlannerService(settings).start()
        payload = [(self.service.layout, self.service.chunks) if self.first else None]
        dist.broadcast_object_list(payload, src=self.root, group=group)
        self.layout, self.chunks = payload[0]
        self.iteration = 0
        self.fallbacks = 0
        self.info: _Info | None = None
        self._evals = 0

    def start(self, iteration: int) -> None:
        """Plan from `iteration` on (after a resume, the batches before it are done)."""
        self.iteration = iteration
        if self.first:
            source = self.batches[iteration:] if isinstance(self.batches, list) else self.batches
            self.prefetch = iter(PrefetchingIterator(source, self.service,
                                                     self.args.pipeweaver_lookahead, start=iteration))

    def next_plan(self) -> IterationPlan:
        """The plan of the current iteration, identical on every rank of the group."""
        payload = [self._take(self.iteration) if self.first else None]
        dist.broadcast_object_list(payload, src=self.root, group=self.group)
        plan, self.info = payload[0]
        self.fallbacks += self.info.source == "fallback"
        self.iteration += 1
        return plan

    def submit_eval(self, batch) -> int:
        """Queue an evaluation step's batch for the search, before the training batches
        waiting (evaluation needs it first); returns the key eval_plan takes it by."""
        key = EVAL_KEYS + self._evals
        self._evals += 1
        if self.first:
            self.service.submit(key, batch, urgent=True)
        return key

    def eval_plan(self, key: int) -> IterationPlan:
        """The searched plan of a submitted evaluation step (the fallback when it is late
        or invalid, as in training), the same on every rank of the group; evaluation
        runs its forwards alone."""
        payload = [self.service.get(key).plan if self.first else None]
        dist.broadcast_object_list(payload, src=self.root, group=self.group)
        return payload[0]

    def _take(self, iteration: int) -> tuple[IterationPlan, _Info]:
        index, _ = next(self.prefetch)
        if index != iteration:
            raise RuntimeError(f"plan feed out of step: training is at {iteration}, the "
                               f"prefetcher at {index}")
        outcome = self.service.get(iteration)
        trace_dir = self.args.pipeweaver_trace_dir
        if outcome.predicted is not None and not trace_dir:
            predicted_s, bubble = outcome.predicted  # the worker simulated it already
        else:
            predicted = self.predict(outcome.plan, detail=bool(trace_dir))
            predicted_s, bubble = predicted.iteration_time_s, predicted.bubble_ratio
            if trace_dir:
                os.makedirs(trace_dir, exist_ok=True)
                write_trace(predicted, outcome.plan.table.layout,
                            os.path.join(trace_dir, f"predicted_{iteration:06d}.json"),
                            f"{self.model.name} {self.schedule} iteration {iteration} (SEMU)")
        return outcome.plan, _Info(outcome.source, outcome.reason, outcome.latency_ms,
                                   outcome.waited_ms, predicted_s, bubble)

    def predict(self, plan: IterationPlan, detail: bool = False):
        """SEMU's prediction of a plan (the same costs the search used)."""
        if plan.members:
            shapes = split_batch(self.model, plan.batch, self.rules, self.chunks.sub_size).shapes
        else:
            shapes = batch_shapes(self.model, plan.batch, self.rules)
        return simulate(self.costs, plan.table, shapes, detail=detail)

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
