"""Training on megatron-core alone with PipeWeaver: what scripts/pretrain_lmm.py runs.

Per process: distributed init (NCCL when CUDA is present, gloo otherwise), megatron-core
parallel_state (TP, PP, DP), the rank's LMM chunks for its stages of the run's layout,
gradient reduction and an optimizer (megatron-core's DDP and optimizer on CUDA, torch
Adam with a DP all-reduce on the host: megatron/optim.py), and a loop. Each iteration
the first rank of the model-parallel group takes the plan of the next global batch
(from the planner service, or the fallback schedule) and broadcasts it to the group;
every rank runs forward_backward_pipeweaver on synthetic data whose metadata follows the
workload (or, with --data-path, on a prepared dataset's samples: megatron/data_source.py),
reduces gradients over data parallelism, divides them by the batch's loss
tokens, and steps. Logs: a line per
iteration, and JSON lines with --pipeweaver-log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ModelSpec, load_model
from ..workload import TokenRules
from .checkpoint import load_checkpoint, rank_path, save_checkpoint
from .data_source import DATA_KEY, DataSource, StepData, saved_state
from .optim import build_training
from .plans import PlanFeed, replica_batches

log = logging.getLogger("pipeweaver.train")


@dataclass
class Topology:
    rank: int
    world: int
    tp: int
    pp: int
    dp: int
    p_rank: int
    t_rank: int
    d_rank: int
    device: torch.device


def init_distributed(tp: int, pp: int, seed: int) -> Topology:
    """torch.distributed from torchrun's or srun's environment, then parallel_state."""
    from ..models import init_parallel

    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP {tp} x PP {pp}")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    device = local_device()
    init_parallel(tp, pp, seed, device)
    return current_topology(device)


def local_device() -> torch.device:
    """The current CUDA device where there is one, else torch's default (the host)."""
    if torch.cuda.is_available():
        return torch.device(torch.cuda.current_device())
    return torch.get_default_device()


def current_topology(device: torch.device) -> Topology:
    """This process's place in torch.distributed and megatron-core's parallel_state."""
    from megatron.core import parallel_state as ps

    return Topology(dist.get_rank(), dist.get_world_size(),
                    ps.get_tensor_model_parallel_world_size(),
                    ps.get_pipeline_model_parallel_world_size(),
                    ps.get_data_parallel_world_size(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), device)


def run_parallel(args, topo: Topology) -> dict[str, int]:
    """The model spec's parallel settings as this run's flags set them."""
    from .virtual_stages import spec_overrides

    return spec_overrides(args, topo.tp, topo.pp, topo.dp)


def use_te_flag(args) -> bool | None:
    """--transformer-impl as LMMChunk's use_te (None: Transformer Engine when usable)."""
    impl = getattr(args, "transformer_impl", None)
    return None if impl is None else impl != "local"


@dataclass
class OpenRun:
    """What a training process plans and schedules with (open_run)."""

    model: ModelSpec
    """--pipeweaver-model-config with the run's parallel flags."""
    rules: TokenRules
    batches: list | None
    """This data-parallel replica's GlobalBatch of every iteration (None with
    --data-path: megatron/data_source.py reads them)."""
    feed: PlanFeed
    schedule: object
    """The PipeWeaverSchedule: Megatron's forward_backward over the feed's plans."""


def open_plans(args, model: ModelSpec, batches, topo: Topology, parallel: dict | None = None,
               model_file: str | None = None) -> tuple[PlanFeed, object]:
    """The plan feed (planner service on the first rank of the model-parallel group)
    and the PipeWeaverSchedule over its plans, every data-parallel replica checked to
    hold the same layout (the feed is closed if that fails). Both entry points start
    here: pretrain_lmm.py (open_run) and the Megatron-LM drop-in (user_run)."""
    from megatron.core import parallel_state

    from ..runtime import PipeWeaverSchedule

    feed = PlanFeed(args, model, batches, topo, parallel_state.get_model_parallel_group(),
                    parallel, model_file=model_file)
    try:
        check_replicas_agree(feed.layout, parallel_state.get_data_parallel_group())
    except Exception:
        feed.close()
        raise
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    schedule = PipeWeaverSchedule(feed.next_plan, model, TokenRules.from_model(model),
                                  topo.p_rank, dist.get_process_group_ranks(pp_group), pp_group,
                                  transport=getattr(args, "pipeweaver_transport", "auto"))
    feed.timeline_source = lambda: (schedule.trained, schedule.train_timeline)
    return feed, schedule


def open_run(args, topo: Topology) -> OpenRun:
    """The model spec, this replica's batches, and the plan feed and schedule."""
    parallel = run_parallel(args, topo)
    model = load_model(args.pipeweaver_model_config, parallel)
    # --data-path: train() hands the feed the loader's batches once --load is known
    batches = None if getattr(args, "data_path", None) else replica_batches(args, model,
                                                                            topo.d_rank)
    feed, schedule = open_plans(args, model, batches, topo, parallel)
    return OpenRun(model, TokenRules.from_model(model), batches, feed, schedule)


def train(args) -> list[dict]:
    """Run args.train_iters iterations (resuming from --load); returns the log records."""
    from megatron.core import parallel_state

    from ..models import stage_chunk, teardown
    from ..models.data import microbatch_data
    from ..runtime import lmm_forward_step

    topo = init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            args.seed)
    feed = None
    try:
        run = open_run(args, topo)
        model, rules, batches, feed, schedule = (run.model, run.rules, run.batches, run.feed,
                                                 run.schedule)
        layout = feed.layout
        stages = [s.index for s in layout.stages_of_rank(topo.p_rank)]
        dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float32
        chunks = [stage_chunk(model, layout, s, tp=topo.tp, seed=args.seed, params_dtype=dtype,
                              use_te=use_te_flag(args),
                              sequence_parallel=model.parallel.sequence_parallel)
                  .to(topo.device) for s in stages]
        training = build_training(chunks, args, topo.device)
        start, extras = 0, {}
        if args.load:
            start = load_checkpoint(args.load, topo.rank, chunks, training.optimizer, extras)
        source = _data_source(args, model, topo, extras, start)
        if source is not None:
            feed.batches = source.planner_batches(start)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        feed.start(start)
        progress = Progress(args.train_iters, start)
        records = []
        for iteration in range(start, args.train_iters):
            if source is None:
                batch = batches[iteration]
                data = iter([microbatch_data(model, mb, rules, args.seed).to(topo.device)
                             for mb in batch.microbatches])  # the data loader's work, not timed
            else:
                step_data = source.step(iteration, topo.device)
                batch = source.loader.batch(iteration).batch
                data = iter(step_data.microbatches)
            began = time.perf_counter()
            training.zero_grad()
            reports = schedule(forward_step_func=lmm_forward_step, data_iterator=data,
                               model=training.model, num_microbatches=len(batch.microbatches))
            measured = _measured(schedule.last_timeline, began)
            loss, tokens, compute = _loss(reports, pp_group, topo.device,
                                          measured["rank_compute_s"])
            training.reduce(tokens, parallel_state.get_data_parallel_group(), args.clip_grad)
            if getattr(args, "pipeweaver_save_grads", None):
                save_gradients(args.pipeweaver_save_grads, iteration, topo, chunks)
            training.step()
            elapsed = time.perf_counter() - began
            record = feed.record(iteration, loss, tokens, elapsed)
            record.update(measured, microbatches=len(batch.microbatches),
                          busiest_compute_s=max(compute), balanced_compute_s=sum(compute) /
                          len(compute), measured_bubble=1 - max(compute) / elapsed)
            if source is not None:
                record.update(_data_record(step_data, source, topo))
            if args.pipeweaver_trace_dir:
                _write_measured(args.pipeweaver_trace_dir, iteration, topo.rank,
                                schedule.last_timeline, began, elapsed)
            records.append(record)
            if topo.rank == 0:
                _report(args, record, progress.advance(elapsed))
            if args.save and (iteration + 1 == args.train_iters or
                              (args.save_interval and (iteration + 1) % args.save_interval == 0)):
                data_state = {} if source is None else {DATA_KEY: source.state_after(iteration)}
                save_checkpoint(args.save, topo.rank, iteration + 1, chunks, training.optimizer,
                                data_state, _save_fault(args, iteration + 1, topo.rank))
        return records
    finally:
        if feed is not None:  # the planner service's processes, also after an error
            feed.close()
        teardown()


def _save_fault(args, iteration: int, rank: int):
    """--pipeweaver-inject-fault crash-mid-save@ITER: the last rank dies in the checkpoint
    after ITER iterations before writing its file, once rank 0's is on disk (a kill
    between shard writes)."""
    if ("crash-mid-save", iteration) not in getattr(args, "pipeweaver_inject_fault", []) \
            or rank != dist.get_world_size() - 1 or rank == 0:
        return None

    def crash() -> None:
        first = rank_path(args.save, iteration, 0)
        while not os.path.exists(first):
            time.sleep(0.05)
        log.error("injected fault: rank %d dies in the checkpoint of iteration %d", rank,
                  iteration)
        os._exit(1)

    return crash


def save_gradients(directory: str, iteration: int, topo: Topology, chunks: list) -> None:
    """--pipeweaver-save-grads: this rank's reduced gradients by parameter name (fp32
    main_grad on the megatron-core path, before its optimizer clips), and once per rank
    ``rank_<r>_shards.json``: its TP / PP / DP ranks and how each tensor-parallel
    parameter is split (partition_dim; gated fc1s split gate and up halves apart), so a
    reader can join the TP ranks' shards."""
    from ..models.precision import main_grad

    os.makedirs(directory, exist_ok=True)
    grads, split, gated = {}, {}, []
    for chunk in chunks:
        inner = getattr(chunk, "module", chunk)
        for name, param in chunk.named_parameters():
            grad = main_grad(param)
            grads[name] = None if grad is None else grad.detach().float().clone()
            if getattr(param, "tensor_model_parallel", False) and topo.tp > 1:
                split[name] = int(param.partition_dim)
                if hasattr(inner, "_gated") and inner._gated(name):
                    gated.append(name)
    torch.save(grads, os.path.join(directory, f"iter_{iteration:07d}_rank_{topo.rank:04d}.pt"))
    shards = os.path.join(directory, f"rank_{topo.rank:04d}_shards.json")
    if not os.path.exists(shards):
        with open(shards, "w") as f:
            json.dump({"tp_rank": topo.t_rank, "tp": topo.tp, "pp_rank": topo.p_rank,
                       "dp_rank": topo.d_rank, "partition_dim": split, "gated": gated}, f)


def _data_source(args, model: ModelSpec, topo: Topology, extras: dict, start: int):
    """--data-path's DataSource for this rank (resumed from the checkpoint's loader
    state), or None for synthetic data."""
    if not getattr(args, "data_path", None):
        return None
    state = saved_state(extras, args.load) if args.load else None
    return DataSource(args, model, topo.d_rank, topo.dp, state, start)


def _data_record(step: StepData, source: DataSource, topo: Topology) -> dict:
    """The log's data fields: this replica's sample keys (and, gathered over the
    data-parallel group, every replica's), skips and loader times."""
    return {"sample_keys": step.keys, "sample_keys_by_dp_rank": replica_keys(step.keys),
            "dp_rank": topo.d_rank,
            "skipped_samples": source.skipped, "skipped_keys": list(step.skipped),
            "data_read_s": step.read_seconds, "data_prepare_s": step.prepare_seconds}


def replica_keys(keys: list) -> list:
    """Every data-parallel replica's sample keys of this iteration, by DP rank (gathered
    over this rank's data-parallel group)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, keys, group=group)
    return every


def check_replicas_agree(layout, dp_group) -> None:
    """Every data-parallel replica must hold the same layout: their gradients are
    reduced parameter by parameter."""
    mine = repr(layout)  # a frozen dataclass of stages and parts
    theirs: list = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(theirs, mine, group=dp_group)
    if any(other != mine for other in theirs):
        raise RuntimeError("data-parallel replicas cut different layouts; they must share "
                           "the partitioner's reference batch")


class Progress:
    """A text progress bar for the log lines (SLURM logs too: no carriage returns)."""

    WIDTH = 20

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.timed, self.spent = total, done, 0, 0.0

    def advance(self, seconds: float) -> str:
        self.done += 1
        self.timed += 1
        self.spent += seconds
        filled = round(self.WIDTH * self.done / max(self.total, 1))
        eta = self.spent / self.timed * (self.total - self.done)
        return f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] eta {eta:.1f} s"


def _loss(reports: list, group, device, compute_s: float) -> tuple[float, float, list]:
    """The batch's loss per token and loss tokens over the pipeline group, and every
    pipeline rank's compute seconds (one all-reduce: each rank fills its own slot)."""
    size = dist.get_world_size(group)
    total = torch.zeros(2 + size, dtype=torch.float64, device=device)
    for report in reports:
        total[:2] += report["loss"].to(total)
    total[2 + dist.get_rank(group)] = compute_s
    dist.all_reduce(total, group=group)
    loss_sum, tokens, *compute = total.tolist()
    return loss_sum / max(tokens, 1.0), tokens, compute


def _measured(timeline: list, began: float) -> dict:
    """This rank's compute, P2P-wait and step times of the iteration (seconds)."""
    compute = sum(end - start for _, op, start, end in timeline if op.startswith("C"))
    waits = sum(end - start for _, op, start, end in timeline if op.startswith("Wait"))
    run = timeline[-1][3] - began if timeline else 0.0
    return {"rank_compute_s": compute, "rank_wait_s": waits, "rank_pipeline_s": run}


def _write_measured(directory: str, iteration: int, rank: int, timeline: list,
                    began: float, elapsed: float) -> None:
    """This rank's measured ops of one iteration, beside SEMU's predicted trace; rank 0
    adds the iteration's measured time (semu/runtime_fit.py reads both)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"measured_{iteration:06d}_rank{rank:04d}.json")
    with open(path, "w") as f:
        json.dump([{"op": op, "start_s": start - began, "end_s": end - began}
                   for _, op, start, end in timeline], f)
    if rank == 0:
        with open(os.path.join(directory, f"iteration_{iteration:06d}.json"), "w") as f:
            json.dump({"iteration_time_s": elapsed}, f)


def _report(args, record: dict, progress: str) -> None:
    line = (f"iteration {record['iteration'] + 1:>5}/{args.train_iters} | loss {record['loss']:.4f} "
            f"| {record['iteration_time_s'] * 1e3:8.1f} ms | {record['tokens_per_s']:9.0f} tokens/s "
            f"| predicted {record['predicted_time_s'] * 1e3:8.1f} ms | bubble "
            f"{record['bubble_ratio']:5.1%} | plan {record['plan_latency_ms']:7.1f} ms "
            f"| {record['source']}{' fallbacks ' + str(record['fallbacks']) if record['fallbacks'] else ''}"
            f" {progress}")
    print(line, flush=True)
    if args.pipeweaver_log:
        with open(args.pipeweaver_log, "a") as f:
            f.write(json.dumps(record) + "\n")
