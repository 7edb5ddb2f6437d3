"""`pipeweaver verify`: run real batches through a plan on local processes and compare
every loss and gradient with the same model in one process, without pipelining.

The launcher samples the batches, builds the plans (pure Python) and runs the reference
in its own process (TP 1, fp32). It then starts pp * tp ranks (gloo, one process each).
Every rank builds its chunks (weights loaded from the reference by name, sharded for
TP), runs each batch with forward_backward_pipeweaver (per-token loss, Megatron's
3-tuple) and compares its gradients, and the loss sums its stages report, with the
reference's. The largest differences come back to the launcher.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import get_hardware, load_model
from ..planner import PipeWeaverPlanner, SearchSettings, partition
from ..planner.iteration import IterationPlan, plan_iteration
from ..schedules import build_baseline
from ..semu import CostModel
from ..workload import TokenRules, sample_workload

SCHEDULES = ("megatron-1f1b", "megatron-interleaved", "pipeweaver")


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    """Largest differences over all batches, ranks and parameters."""

    max_loss_diff: float
    max_grad_diff: float
    """Largest |pipeline - reference| over every gradient element, relative to the
    parameter's largest reference gradient."""
    parameters: int
    reference_parameters: int
    losses: list[float]
    reference_losses: list[float]
    tolerance: float
    elapsed_s: float
    plans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.max_loss_diff <= self.tolerance and self.max_grad_diff <= self.tolerance
                and self.parameters == self.reference_parameters)


def build_plans(model_name: str, schedule: str, pp: int, tp: int, batches: int, seed: int,
                dataset: str | None = None) -> tuple[list[IterationPlan], object]:
    """The iteration plans of `batches` sampled global batches on pp ranks."""
    model = load_model(model_name)
    rules = TokenRules.from_model(model)
    sampled = sample_workload(model, dataset or model.dataset, batches, seed)
    plans = []
    if schedule == "pipeweaver":
        costs = CostModel(model, get_hardware(model.hardware))
        planner = PipeWeaverPlanner(costs, partition(costs, num_ranks=pp, reference=sampled[0]),
                                    SearchSettings(max_evaluations=8))
        for i, batch in enumerate(sampled):
            result = planner.plan(batch, 60_000, seed + i)
            plans.append(plan_iteration(model, result.table, batch, rules, tp=tp,
                                        members=result.sub_microbatches.members,
                                        timeline=result.simulation))
    else:
        vp = None if schedule == "megatron-interleaved" else 1
        for batch in sampled:
            table = build_baseline(model, schedule, len(batch.microbatches), pp=pp, vp=vp)
            plans.append(plan_iteration(model, table, batch, rules, tp=tp))
    return plans, model


def reference_run(model, plans: list[IterationPlan], seed: int) -> dict:
    """Whole-model losses and gradients per batch, in this process."""
    from ..models import build_reference, init_single_process, teardown
    from ..models.data import microbatch_data

    rules = TokenRules.from_model(model)
    init_single_process(seed)
    try:
        reference = build_reference(model, seed=seed)
        state = {k: v.detach().clone() for k, v in reference.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        losses, grads = [], []
        for plan in plans:
            reference.zero_grad(set_to_none=True)
            total = 0.0
            for microbatch in plan.batch.microbatches:
                result = reference({}, microbatch_data(model, microbatch, rules, seed))
                result.loss.backward()
                total += result.loss.item()
            losses.append(total)
            grads.append({n: (p.grad.detach().clone() if p.grad is not None
                              else torch.zeros_like(p)) for n, p in reference.named_parameters()})
        return {"state": state, "losses": losses, "grads": grads}
    finally:
        teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model, plans, tp: int, pp: int, seed: int,
               reference_path: str, out_path: str, timeout_s: float) -> None:
    from datetime import timedelta

    from megatron.core import parallel_state

    from ..models import init_parallel, stage_chunk, teardown
    from ..models.data import microbatch_data
    from ..models.lmm import shard
    from .lmm_step import lmm_forward_step
    from .schedule import PipeWeaverSchedule

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        init_parallel(tp, pp, seed)
        reference = torch.load(reference_path, weights_only=False)
        rules = TokenRules.from_model(model)
        p_rank = parallel_state.get_pipeline_model_parallel_rank()
        t_rank = parallel_state.get_tensor_model_parallel_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        layout = plans[0].table.layout
        stages = [s.index for s in layout.stages_of_rank(p_rank)]
        chunks = [stage_chunk(model, layout, s, tp=tp, seed=seed).load_from(reference["state"])
                  for s in stages]
        for chunk in chunks:
            chunk.config = SimpleNamespace(
                calculate_per_token_loss=True, grad_scale_func=None, no_sync_func=None,
                grad_sync_func=None, param_sync_func=None, finalize_model_grads_func=None)
        index = iter(range(len(plans)))
        schedule = PipeWeaverSchedule(lambda: plans[next(index)], model, rules, p_rank,
                                      dist.get_process_group_ranks(group), group, timeout_s)
        worst_grad, worst_loss, losses, names = 0.0, 0.0, [], set()
        for b, plan in enumerate(plans):
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            data = iter([microbatch_data(model, mb, rules, seed) for mb in plan.batch.microbatches])
            reports = schedule(forward_step_func=lmm_forward_step, data_iterator=data, model=chunks,
                               num_microbatches=plan.table.num_microbatches)
            total = sum(float(r["loss"][0]) for r in reports)
            losses.append(total if reports else None)
            if reports and t_rank == 0:
                worst_loss = max(worst_loss, abs(total - reference["losses"][b])
                                 / max(abs(reference["losses"][b]), 1e-12))
            for chunk in chunks:
                for name, param in chunk.named_parameters():
                    full = reference["grads"][b][name]
                    want = shard(full, param, chunk._gated(name), t_rank, tp)
                    got = param.grad if param.grad is not None else torch.zeros_like(param)
                    scale = max(full.abs().max().item(), 1e-12)
                    worst_grad = max(worst_grad, (got - want).abs().max().item() / scale)
                    names.add(name)
        torch.save({"rank": rank, "grad": worst_grad, "loss": worst_loss, "losses": losses,
                    "names": sorted(names)}, f"{out_path}.{rank}")
    finally:
        teardown()


def verify(model_name: str, schedule: str, pp: int, tp: int = 1, batches: int = 2, seed: int = 0,
           dataset: str | None = None, tolerance: float = 1e-4, timeout_s: float = 120.0) -> VerifyResult:
    """Run the comparison (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    began = time.perf_counter()
    plans, model = build_plans(model_name, schedule, pp, tp, batches, seed, dataset)
    reference = reference_run(model, plans, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, out_path = os.path.join(tmp, "reference.pt"), os.path.join(tmp, "rank")
        torch.save(reference, ref_path)
        world = pp * tp
        context = mp.start_processes(_rank_main, args=(world, _free_port(), model, plans, tp, pp,
                                                        seed, ref_path, out_path, timeout_s),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s * 2 + 60
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"ranks still running after {timeout_s * 2 + 60:.0f} s")
        results = [torch.load(f"{out_path}.{r}", weights_only=False) for r in range(world)]
    names = set().union(*(r["names"] for r in results))
    losses = [next((r["losses"][b] for r in results if r["losses"][b] is not None), float("nan"))
              for b in range(batches)]
    return VerifyResult(max_loss_diff=max(r["loss"] for r in results),
                        max_grad_diff=max(r["grad"] for r in results), parameters=len(names),
                        reference_parameters=len(reference["grads"][0]), losses=losses,
                        reference_losses=reference["losses"], tolerance=tolerance,
                        elapsed_s=time.perf_counter() - began,
                        plans=[p.content_hash[:16] for p in plans])
