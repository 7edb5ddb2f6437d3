"""Plans for the training loop: the first rank of each model-parallel group gets the
next iteration's plan (planner service, or fallback) and broadcasts it to the group, so
every TP and PP rank runs the same plan (the runtime checks the hash again).

--pipeweaver-record-plans DIR writes every plan served (the wire format, service/wire.py)
and --pipeweaver-replay-plans DIR trains on them instead of the planner service: the
same plans with no planner running, to measure what planning costs training. A replayed
plan is checked like a worker's (wire.read_plan, against this run's batch and layout).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch.distributed as dist

from ..planner import PIPEWEAVER, split_batch
from ..ir.plan import IterationPlan
from ..semu import batch_shapes, simulate, write_trace
from ..semu.online import Measured
from ..semu.runtime_fit import compute_action
from ..service import InvalidPlan, PlannerService, PrefetchingIterator, read_plan
from ..service.planner_service import cut_layout
from ..service.wire import decode, encode_plan
from ..service.worker import make_costs
from .virtual_stages import service_settings
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
    budget_ms: float | None = None
    cpu_budget_ms: float | None = None
    search: dict | None = None


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
        self.online = (getattr(args, "pipeweaver_online_calibration", "off") == "on"
                       and self.schedule == PIPEWEAVER
                       and not getattr(args, "pipeweaver_replay_plans", None))
        """Send measured compute times back (only a searching planner uses them)."""
        self.root = dist.get_process_group_ranks(group)[0]
        self.first = dist.get_rank() == self.root
        self.service = self.prefetch = self.costs = None
        self.record_dir = _group_dir(getattr(args, "pipeweaver_record_plans", None), self.root)
        self.replay_dir = _group_dir(getattr(args, "pipeweaver_replay_plans", None), self.root)
        self._served: float | None = None
        """When the last plan was handed to the schedule (perf_counter)."""
        self._elapsed: tuple[int, float] | None = None
        """(iteration, seconds) the training loop last reported through record()."""
        self.timeline_source = None
        """() -> (training calls so far, the last one's measured ops): the schedule's
        (open_plans sets it); with the online calibration on, each iteration's compute
        times go back to the planner workers."""
        self._reported = 0
        self._eval_batches: dict = {}
        """Replay: evaluation batches submitted, by key."""
        payload = [None]
        if self.first:
            settings = service_settings(args, model, parallel or {}, topo.pp, topo.tp,
                                        model_file)
            self.settings = settings
            self.costs = make_costs(settings, model)  # to predict plans that come unpriced
            if self.record_dir:
                os.makedirs(self.record_dir, exist_ok=True)
            if self.replay_dir:
                cut = cut_layout(settings, model, settings.pp or topo.pp)
                payload = [(cut.layout, cut.chunks)]
            else:
                self.service = PlannerService(settings).start()
                payload = [(self.service.layout, self.service.chunks)]
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
            service = self.service or _NoService()
            self.prefetch = iter(PrefetchingIterator(source, service,
                                                     self.args.pipeweaver_lookahead, start=iteration))

    def next_plan(self) -> IterationPlan:
        """The plan of the current iteration, identical on every rank of the group."""
        self._feedback()
        payload = [self._take(self.iteration) if self.first else None]
        dist.broadcast_object_list(payload, src=self.root, group=self.group)
        plan, self.info = payload[0]
        self._served = time.perf_counter()
        self.fallbacks += self.info.source == "fallback"
        self.iteration += 1
        return plan

    def _feedback(self) -> None:
        """Before the next plan: tell the service how the last iteration went (the auto
        budget's observation, on the first rank) and, with the online calibration, send
        every rank's measured compute times of it (one gather over the group)."""
        if self._served is None or self.info is None:
            return
        key = self.iteration - 1
        busy = time.perf_counter() - self._served  # the iteration without its plan wait
        if self._elapsed is not None and self._elapsed[0] == key:
            busy = max(self._elapsed[1] - self.info.waited_ms / 1000, 0.0)
        if self.first and self.service is not None:
            self.service.observe(busy, self.info.waited_ms, self.info.reason == "late")
        if not (self.online and self.timeline_source is not None):
            return
        calls, timeline = self.timeline_source()
        if calls <= self._reported:
            return  # no training step since the last plan (all ranks agree)
        self._reported = calls
        mine = ({compute_action(op): end - start for _, op, start, end in timeline
                 if compute_action(op)},
                timeline[-1][3] - timeline[0][2] if timeline else 0.0)
        gathered = [None] * dist.get_world_size(self.group) if self.first else None
        dist.gather_object(mine, gathered, dst=self.root, group=self.group)
        if self.first and self.service is not None:
            actions = {label: seconds for ops, _ in gathered for label, seconds in ops.items()}
            span = max(s for _, s in gathered)
            self.service.measured(key, Measured(actions, max(busy - span, 0.0)))

    def submit_eval(self, batch) -> int:
        """Queue an evaluation step's batch for the search, before the training batches
        waiting (evaluation needs it first); returns the key eval_plan takes it by."""
        key = EVAL_KEYS + self._evals
        self._evals += 1
        if self.first and self.service is not None:
            self.service.submit(key, batch, urgent=True)
        elif self.first:
            self._eval_batches[key] = batch
        return key

    def eval_plan(self, key: int) -> IterationPlan:
        """The searched plan of a submitted evaluation step (the fallback when it is late
        or invalid, as in training), the same on every rank of the group; evaluation
        runs its forwards alone."""
        plan = None
        if self.first and self.service is not None:
            plan = self.service.get(key).plan
            self._record(key, plan, "planner", None)
        elif self.first:
            plan = self._replay(key, self._eval_batches.pop(key))[0]
        payload = [plan]
        dist.broadcast_object_list(payload, src=self.root, group=self.group)
        return payload[0]

    def _take(self, iteration: int) -> tuple[IterationPlan, _Info]:
        index, batch = next(self.prefetch)
        if index != iteration:
            raise RuntimeError(f"plan feed out of step: training is at {iteration}, the "
                               f"prefetcher at {index}")
        if self.service is None:
            plan, predicted = self._replay(iteration, batch)
            return plan, _Info("replay", None, 0.0, 0.0, *predicted)
        outcome = self.service.get(iteration)
        self._record(iteration, outcome.plan, outcome.source, outcome.predicted)
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
        budget = outcome.budget
        return outcome.plan, _Info(outcome.source, outcome.reason, outcome.latency_ms,
                                   outcome.waited_ms, predicted_s, bubble,
                                   budget.wall_ms if budget else self.settings.budget_ms,
                                   budget.cpu_ms if budget else None, dict(outcome.search))

    def _record(self, key: int, plan: IterationPlan, source: str, predicted) -> None:
        """--pipeweaver-record-plans: the plan served for `key`, as a worker sends it."""
        if not self.record_dir:
            return
        info = {"source": source}
        if predicted is not None:
            info.update(predicted_iteration_time_s=predicted[0], predicted_bubble_ratio=predicted[1])
        with open(os.path.join(self.record_dir, f"plan_{key:014d}.json"), "wb") as f:
            f.write(encode_plan(key, plan, **info))

    def _replay(self, key: int, batch) -> tuple[IterationPlan, tuple[float, float]]:
        """--pipeweaver-replay-plans: the recorded plan of `key`, checked against this
        run's batch and layout; its recorded prediction (or SEMU's now)."""
        path = os.path.join(self.replay_dir, f"plan_{key:014d}.json")
        try:
            with open(path, "rb") as f:
                message = decode(f.read())
            s = self.settings
            plan = read_plan(message, batch, self.layout, s.dtype, s.tp or self.topo.tp,
                             bool(s.sequence_parallel))
        except (OSError, ValueError) as exc:  # InvalidPlan is a ValueError
            kind = "does not fit this run" if isinstance(exc, InvalidPlan) else "unreadable"
            raise RuntimeError(f"--pipeweaver-replay-plans: {path} {kind}: {exc}") from None
        info = message.get("info") or {}
        if "predicted_iteration_time_s" in info:
            return plan, (float(info["predicted_iteration_time_s"]),
                          float(info["predicted_bubble_ratio"]))
        predicted = self.predict(plan)
        return plan, (predicted.iteration_time_s, predicted.bubble_ratio)

    def predict(self, plan: IterationPlan, detail: bool = False):
        """SEMU's prediction of a plan (the same costs the search used)."""
        if plan.members:
            shapes = split_batch(self.model, plan.batch, self.rules, self.chunks.sub_size).shapes
        else:
            shapes = batch_shapes(self.model, plan.batch, self.rules)
        return simulate(self.costs, plan.table, shapes, detail=detail)

    def record(self, iteration: int, loss: float, tokens: float, elapsed: float) -> dict:
        self._elapsed = (iteration, elapsed)
        info = self.info
        return {"iteration": iteration, "loss": loss, "iteration_time_s": elapsed,
                "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "predicted_time_s": info.predicted_s, "bubble_ratio": info.bubble,
                "semu_error": info.predicted_s / elapsed - 1 if elapsed else 0.0,
                "plan_latency_ms": info.latency_ms, "plan_wait_ms": info.waited_ms,
                "fallback": info.source == "fallback", "fallback_reason": info.reason,
                "fallbacks": self.fallbacks, "source": info.source, "schedule": self.schedule,
                "plan_budget_ms": info.budget_ms, "plan_cpu_budget_ms": info.cpu_budget_ms,
                "plan_search": info.search or {}}

    def close(self) -> None:
        if self.service is not None:
            self.service.close()


class _NoService:
    """The prefetcher's submitter when plans are replayed: nothing to plan."""

    def submit(self, iteration: int, batch) -> None:
        pass


def _group_dir(directory: str | None, root: int) -> str | None:
    """A model-parallel group's folder of recorded plans (its first rank's number)."""
    return os.path.join(directory, f"group{root:05d}") if directory else None
