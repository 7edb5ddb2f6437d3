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

import hashlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import get_hardware, load_model
from ..planner import PipeWeaverPlanner, SearchSettings, partition
from ..planner.systems import RUNNABLE
from ..planner.iteration import MEMORY_STRATEGIES, IterationPlan, plan_iteration
from ..service.fallback import fallback_plan
from ..semu import CostModel
from ..workload import TokenRules, sample_workload
from .p2p import DTYPES as P2P_DTYPES

SCHEDULES = RUNNABLE
DTYPES = {name: P2P_DTYPES[name] for name in ("float32", "bfloat16")}
"""The dtypes verify runs (runtime/p2p.py's names)."""
LOW_PRECISION_FACTOR = 3.0
"""A bf16 run passes when its largest loss and gradient differences from the fp32
reference are at most this times those of the same model run in bf16 in one process
(and at most `tolerance` where that is larger). Measured ratio of the pipelined bf16
run's gradient difference to the one-process bf16 run's: 2.26 to 2.43 (tiny-vlm and
tiny-t2v, PP 2 and 4, seeds 11 and 12; the same at both PP sizes); loss differences
stayed under 2e-5 against the 1e-4 floor."""
FAULTS = ("perturbed-weight", "disagreeing-plan", "silent-peer")
"""Injected by tests: a wrong weight on rank 0 (verify must report a mismatch), a plan
that differs on rank 1, and pipeline rank 0 never sending (both must end in an error
naming the rank and the op, never a hang)."""


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
    freed_outputs: int = 0
    """Outputs whose storage the ranks freed after sending (Megatron's deallocation)."""
    params_with_grad: int = 0
    """Parameters holding a gradient after a forward_only run (must be 0)."""
    grad_digests: list[str] = field(default_factory=list)
    """Per rank, a hash of every gradient's bytes (equal digests: bitwise equal runs)."""
    memory: list[int] = field(default_factory=list)
    """Per batch, the forwards whose plan recomputes or offloads layers."""
    saved_peaks: list = field(default_factory=list)
    """With measure_memory, per global rank and batch: (peak saved-activation bytes on
    the device, offloaded to the host), counted by models.memory.SavedBytes."""

    loss_tolerance: float | None = None
    """Tolerance of the loss difference (None: tolerance)."""
    dtype: str = "float32"

    @property
    def ok(self) -> bool:
        loss_tolerance = self.tolerance if self.loss_tolerance is None else self.loss_tolerance
        return (self.max_loss_diff <= loss_tolerance and self.max_grad_diff <= self.tolerance
                and self.parameters == self.reference_parameters)


def forced_memory(plan: IterationPlan, model, strategy: str) -> IterationPlan:
    """The plan with `strategy` on every forward of every stage (see MEMORY_STRATEGIES)."""
    if strategy == "planned":
        return plan
    table = plan.table
    choices = []
    for n, (stage, m, sub) in enumerate(sorted({(a.stage, a.microbatch, a.sub)
                                                for _, _, a in table.actions()})):
        layers = sum(p.last_layer - p.first_layer for p in table.layout.stages[stage].parts
                     if model.module(p.module).is_transformer)
        pick = {"none": 0, "recompute": 1, "offload": 2, "mixed": n % 4}[strategy]
        recompute, offload = [(0, 0), (layers, 0), (0, layers),
                              (layers // 2, layers - layers // 2)][pick]
        if recompute or offload:
            choices.append((stage, m, sub, recompute, offload))
    return replace(plan, memory=tuple(sorted(choices)))


def build_plans(model_name: str, schedule: str, pp: int, tp: int, batches: int | list, seed: int,
                dataset: str | None = None, sub_size: dict[str, int] | None = None,
                memory_strategy: str = "planned", dtype: str = "float32",
                sequence_parallel: bool = False) -> tuple[list[IterationPlan], object]:
    """The iteration plans of `batches` sampled global batches (or of the GlobalBatches
    given) on pp ranks; sub_size overrides the partitioner's sub-microbatch sizes;
    memory_strategy: see MEMORY_STRATEGIES; sequence_parallel (tp > 1): the chunks run
    sequence-parallel, messages carry each TP rank's rows, SEMU prices it so."""
    if memory_strategy not in MEMORY_STRATEGIES:
        raise ValueError(f"unknown memory strategy {memory_strategy!r}; known: "
                         + ", ".join(MEMORY_STRATEGIES))
    sequence_parallel = sequence_parallel and tp > 1
    model = load_model(model_name, {"sequence_parallel": sequence_parallel})
    rules = TokenRules.from_model(model)
    sampled = batches if isinstance(batches, list) else \
        sample_workload(model, dataset or model.dataset, batches, seed)
    plans = []
    if schedule == "pipeweaver":
        costs = CostModel(model, get_hardware(model.hardware), tp=tp,
                          sequence_parallel=sequence_parallel)
        chunks = partition(costs, num_ranks=pp, reference=sampled[0])
        if sub_size:
            chunks = replace(chunks, sub_size={**chunks.sub_size, **sub_size})
        planner = PipeWeaverPlanner(costs, chunks, SearchSettings(max_evaluations=8))
        for i, batch in enumerate(sampled):
            result = planner.plan(batch, 60_000, seed + i)
            plans.append(plan_iteration(model, result.table, batch, rules, dtype=dtype, tp=tp,
                                        members=result.sub_microbatches.members,
                                        timeline=result.simulation,
                                        strategies=result.memory.strategies,
                                        sequence_parallel=sequence_parallel))
    else:
        plans = [fallback_plan(model, batch, rules, schedule, pp, tp, dtype, sequence_parallel)
                 for batch in sampled]
    return [forced_memory(p, model, memory_strategy) for p in plans], model


def reference_run(model, plans: list[IterationPlan], seed: int, dtype: str = "float32") -> dict:
    """Whole-model losses and gradients per batch, in this process, in fp32; with dtype
    bfloat16 also the same model in bf16 (weights cast from fp32, fp32 gradient sums),
    whose largest differences from fp32 give the tolerance of a bf16 run (see verify)."""
    from ..models import build_reference, init_single_process, teardown

    init_single_process(seed)
    try:
        reference = build_reference(model, seed=seed, use_te=False)
        state = {k: v.detach().clone() for k, v in reference.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        losses, grads = _whole_model(model, reference, plans, seed)
        out = {"state": state, "losses": losses, "grads": grads}
        if dtype != "float32":
            low = build_reference(model, seed=seed, use_te=False, params_dtype=DTYPES[dtype])
            low.load_state_dict(state, strict=False)
            low_losses, low_grads = _whole_model(model, low, plans, seed)
            out["low_precision"] = _gap(losses, grads, low_losses, low_grads)
        return out
    finally:
        teardown()


def _whole_model(model, net, plans: list[IterationPlan], seed: int) -> tuple[list, list]:
    """Loss sum and fp32 gradients (summed in fp32 for low-precision parameters) of every
    plan's batch through the whole model."""
    from ..models.data import microbatch_data
    from ..models.precision import keep_fp32_grads, main_grad, zero_main_grads

    rules = TokenRules.from_model(model)
    kept = keep_fp32_grads(net)
    losses, grads = [], []
    for plan in plans:
        net.zero_grad(set_to_none=True)
        zero_main_grads(kept)
        total = 0.0
        for microbatch in plan.batch.microbatches:
            result = net({}, microbatch_data(model, microbatch, rules, seed))
            result.loss.backward()
            total += result.loss.item()
        losses.append(total)
        grads.append({n: (main_grad(p).detach().float().clone() if main_grad(p) is not None
                          else torch.zeros_like(p, dtype=torch.float32))
                      for n, p in net.named_parameters()})
    return losses, grads


def _gap(losses, grads, low_losses, low_grads) -> tuple[float, float]:
    """(largest relative loss difference, largest gradient difference relative to each
    parameter's largest fp32 gradient) of a low-precision run against fp32."""
    worst_loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses, low_losses))
    worst_grad = max((low[name] - full).abs().max().item() / max(full.abs().max().item(), 1e-12)
                     for batch, low in zip(grads, low_grads) for name, full in batch.items())
    return worst_loss, worst_grad


def _wait_all(context, deadline: float) -> None:
    """Wait until every rank has exited or the deadline passed. Not ProcessContext.join:
    it terminates the other ranks as soon as one fails, which can cut a peer's own error
    report in half; each rank ends by itself, its waits being bounded by the timeout."""
    while any(p.is_alive() for p in context.processes):
        if time.monotonic() > deadline:
            raise TimeoutError("ranks still running at the deadline")
        time.sleep(0.2)


def _save_result(result: dict, path: str) -> None:
    """Write a rank's result whole or not at all (a killed rank leaves no torn file)."""
    torch.save(result, f"{path}.part")
    os.replace(f"{path}.part", path)


def _load_result(path: str, rank: int) -> dict:
    if not os.path.exists(path):
        return {"rank": rank, "error": "no result (the process ended without reporting)"}
    return torch.load(path, weights_only=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model, plans, tp: int, pp: int, seed: int,
               reference_path: str, out_path: str, timeout_s: float, fault: str | None,
               forward_only: bool = False, transport: str = "tags",
               measure_memory: bool = False) -> None:
    from datetime import timedelta

    from ..models import teardown

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The group's own timeout outlasts the transport's, so a silent peer surfaces as a
    # Python error naming rank and op rather than gloo aborting the process.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=2 * timeout_s + 30))
    try:
        _run_rank(rank, model, plans, tp, pp, seed, reference_path, out_path, timeout_s, fault,
                  forward_only, transport, measure_memory)
    except BaseException as exc:
        _save_result({"rank": rank, "error": f"{type(exc).__name__}: {exc}"}, f"{out_path}.{rank}")
        os._exit(1)  # skip teardown: peers may still hold posted operations with this rank
    teardown()


def _run_rank(rank, model, plans, tp, pp, seed, reference_path, out_path, timeout_s, fault,
              forward_only=False, transport="tags", measure_memory=False):
    from megatron.core import parallel_state

    from ..models import init_parallel, stage_chunk
    from ..models.data import microbatch_data
    from ..models.lmm import shard
    from ..models.precision import keep_fp32_grads, main_grad, zero_main_grads
    from ..models.sequence_parallel import all_reduce_sequence_parallel_grads
    from .lmm_step import lmm_forward_step
    from .schedule import PipeWeaverSchedule

    init_parallel(tp, pp, seed)
    reference = torch.load(reference_path, weights_only=False)
    rules = TokenRules.from_model(model)
    p_rank = parallel_state.get_pipeline_model_parallel_rank()
    t_rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    layout = plans[0].table.layout
    stages = [s.index for s in layout.stages_of_rank(p_rank)]
    chunks = [stage_chunk(model, layout, s, tp=tp, seed=seed, use_te=False,  # gloo: the host
                          sequence_parallel=plans[0].sequence_parallel,
                          params_dtype=DTYPES[plans[0].dtype])
              .load_from(reference["state"]) for s in stages]
    kept = [p for chunk in chunks for p in keep_fp32_grads(chunk)]
    if fault == "perturbed-weight" and rank == 0:
        with torch.no_grad():
            first = next(chunks[0].parameters())
            first.add_(0.01 * torch.randn(first.shape, generator=torch.Generator().manual_seed(1)))
    if fault == "disagreeing-plan" and p_rank == 1:
        plans = plans[1:] + plans[:1]
    if fault == "silent-peer" and p_rank == 0:
        _silence_sends()
    for chunk in chunks:
        chunk.config = SimpleNamespace(
            calculate_per_token_loss=True, grad_scale_func=None, no_sync_func=None,
            grad_sync_func=None, param_sync_func=None, finalize_model_grads_func=None)
    index = iter(range(len(plans)))
    schedule = PipeWeaverSchedule(lambda: plans[next(index)], model, rules, p_rank,
                                  dist.get_process_group_ranks(group), group, timeout_s,
                                  transport)
    worst_grad, worst_loss, losses, names, with_grad = 0.0, 0.0, [], set(), 0
    digest = hashlib.sha256()  # every gradient's bytes, for bitwise comparisons of runs
    peaks = []
    for b, plan in enumerate(plans):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        zero_main_grads(kept)
        if measure_memory:
            from ..models.memory import SavedBytes

            schedule.saved_bytes = SavedBytes()
        data = iter([microbatch_data(model, mb, rules, seed) for mb in plan.batch.microbatches])
        reports = schedule(forward_step_func=lmm_forward_step, data_iterator=data, model=chunks,
                           num_microbatches=plan.table.num_microbatches, forward_only=forward_only)
        if not forward_only:  # megatron's finalize_model_grads: the SP norms' partial sums
            all_reduce_sequence_parallel_grads((p for c in chunks for p in c.parameters()),
                                               main_grad)
        if measure_memory:
            peaks.append((schedule.saved_bytes.peak_device, schedule.saved_bytes.peak_host))
        total = sum(float(r["loss"][0]) for r in reports)
        losses.append(total if reports else None)
        if reports and t_rank == 0:
            worst_loss = max(worst_loss, abs(total - reference["losses"][b])
                             / max(abs(reference["losses"][b]), 1e-12))
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if forward_only:
                    with_grad += param.grad is not None
                    continue
                full = reference["grads"][b][name]
                want = shard(full, param, chunk._gated(name), t_rank, tp)
                got = main_grad(param)
                got = got.float() if got is not None else torch.zeros_like(want)
                digest.update(name.encode() + got.detach().contiguous().view(torch.uint8)
                              .numpy().tobytes())
                scale = max(full.abs().max().item(), 1e-12)
                worst_grad = max(worst_grad, (got - want).abs().max().item() / scale)
                names.add(name)
    _save_result({"rank": rank, "grad": worst_grad, "loss": worst_loss, "losses": losses,
                "names": sorted(names), "freed": schedule.freed_outputs,
                "with_grad": with_grad, "digest": digest.hexdigest(), "peaks": peaks},
              f"{out_path}.{rank}")


def _silence_sends() -> None:
    """Fault injection: this process's transport never sends (the plan, and so its
    hash, stay the same), as a peer that hangs would."""
    from .p2p import Transport

    post = Transport.post
    Transport.post = lambda self, items: post(self, [i for i in items if i[0] != "send"])


def verify(model_name: str, schedule: str, pp: int, tp: int = 1, batches: int | list = 2,
           seed: int = 0, dataset: str | None = None, tolerance: float = 1e-4,
           timeout_s: float = 120.0, sub_size: dict[str, int] | None = None,
           fault: str | None = None, forward_only: bool = False,
           transport: str = "tags", memory_strategy: str = "planned",
           measure_memory: bool = False, dtype: str = "float32",
           sequence_parallel: bool = False) -> VerifyResult:
    """Run the comparison (see the module docstring); batches: a count to sample, or
    GlobalBatches; transport: runtime/p2p.py's mode (nccl-order: NCCL's rules on gloo);
    sequence_parallel: megatron sequence parallelism in every module (tp > 1).
    Raises RuntimeError (with the failing rank's error) when a rank fails."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    began = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    plans, model = build_plans(model_name, schedule, pp, tp, batches, seed, dataset, sub_size,
                               memory_strategy, dtype, sequence_parallel)
    batches = len(plans)
    reference = reference_run(model, plans, seed, dtype)
    loss_tolerance = grad_tolerance = tolerance
    if dtype != "float32":  # see LOW_PRECISION_FACTOR
        gap_loss, gap_grad = reference["low_precision"]
        loss_tolerance = max(tolerance, LOW_PRECISION_FACTOR * gap_loss)
        grad_tolerance = max(tolerance, LOW_PRECISION_FACTOR * gap_grad)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, out_path = os.path.join(tmp, "reference.pt"), os.path.join(tmp, "rank")
        torch.save(reference, ref_path)
        world = pp * tp
        context = mp.start_processes(_rank_main, args=(world, _free_port(), model, plans, tp, pp,
                                                        seed, ref_path, out_path, timeout_s, fault,
                                                        forward_only, transport,
                                                        measure_memory),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s * 2 + 60
        try:
            _wait_all(context, deadline)
        except TimeoutError:
            raise TimeoutError(f"ranks still running after {timeout_s * 2 + 60:.0f} s") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = [_load_result(f"{out_path}.{r}", r) for r in range(world)]
        errors = [f"rank {r['rank']}: {r['error']}" for r in results if "error" in r]
        if errors:
            raise RuntimeError("; ".join(errors))
    names = set().union(*(r["names"] for r in results))
    losses = [next((r["losses"][b] for r in results if r["losses"][b] is not None), float("nan"))
              for b in range(batches)]
    return VerifyResult(max_loss_diff=max(r["loss"] for r in results),
                        max_grad_diff=max(r["grad"] for r in results), parameters=len(names),
                        reference_parameters=len(reference["grads"][0]), losses=losses,
                        reference_losses=reference["losses"], tolerance=grad_tolerance,
                        loss_tolerance=loss_tolerance, dtype=dtype,
                        elapsed_s=time.perf_counter() - began,
                        plans=[p.content_hash[:16] for p in plans],
                        freed_outputs=sum(r["freed"] for r in results),
                        params_with_grad=sum(r["with_grad"] for r in results),
                        grad_digests=[r["digest"] for r in results],
                        memory=[len(p.memory) for p in plans],
                        saved_peaks=[r["peaks"] for r in results])


def forward_only_losses(model_name: str, schedule: str, pp: int, batches: int = 1,
                        seed: int = 0) -> tuple[list[float], list[float], int]:
    """Evaluation through the runtime: (loss sums, reference loss sums, parameters that
    got a gradient anyway)."""
    result = verify(model_name, schedule, pp, batches=batches, seed=seed, forward_only=True)
    return result.losses, result.reference_losses, result.params_with_grad
