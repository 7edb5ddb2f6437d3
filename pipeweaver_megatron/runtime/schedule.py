"""forward_backward_pipeweaver: Megatron's forward_backward interface over a plan.

`PipeWeaverSchedule(plan_source, ...)` is a callable with the keyword signature of
megatron-core 0.16.1's forward_backward functions; `install()` (integration layer)
hands it to Megatron's training loop. Each call takes this iteration's IterationPlan
from plan_source, checks it at start-up (every rank of the pipeline group holds the
same plan hash, the rank's ops are all known kinds, the rank owns the chunks the plan
names), reads the iteration's microbatches from the data
iterator, and runs the rank's ops. Megatron's conventions are kept:

- forward_step_func(data_iterator, model_chunk) -> (output, loss_func); the chunk gets
  its received tensors through set_input_tensor(dict) first, and the iterator yields the
  (sub-)microbatch's data. On a stage with a loss, loss_func(output) returns
  (loss, num_tokens, report) (divided by num_tokens and num_microbatches unless
  config.calculate_per_token_loss) or (loss, report) (divided by num_microbatches); the
  reports are returned as a list, as Megatron's last stage does.
- config.grad_scale_func scales a loss before its backward; config.no_sync_func (one, or
  one per chunk) holds gradient sync off except during each chunk's last backward, after
  which config.grad_sync_func (if set) runs for that chunk; config.param_sync_func runs
  before each chunk's first forward; config.finalize_model_grads_func runs at the end
  (with the token count when calculate_per_token_loss).
- forward_only runs the forwards alone, without gradients (evaluation).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core.utils import get_attr_wrapped_model

from ..ir import Action, Op
from ..ir.execplan import TRANSPORTS, Batch, Compute, PostRecv, Send, WaitRecv, WaitSend
from ..ir.plan import IterationPlan
from ..models.data import select
from ..models.memory import layer_memory
from .executor import ExecutionError, RankExecutor
from .p2p import Channels, Transport, Watchdog

KNOWN_OPS = (Compute, PostRecv, Send, WaitRecv, WaitSend, Batch)


class PipeWeaverSchedule:
    """Megatron's forward_backward function, executing PipeWeaver plans."""

    def __init__(self, plan_source: Callable[[], IterationPlan], model_spec, rules,
                 pipeline_rank: int, global_ranks: Sequence[int], group=None,
                 timeout_s: float = 300.0, transport: str = "auto") -> None:
        if transport not in ("auto",) + TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; known: auto, "
                             + ", ".join(TRANSPORTS))
        self.plan_source, self.model_spec, self.rules = plan_source, model_spec, rules
        self.rank, self.global_ranks, self.group = pipeline_rank, list(global_ranks), group
        self.timeout_s = timeout_s
        self.transport = transport
        """auto: nccl-order on an NCCL group, tags otherwise (see runtime/p2p.py)."""
        self._watchdog: Watchdog | None = None
        self.last_plan: IterationPlan | None = None
        self.last_timeline: list = []
        """The last call's measured ops (see RankExecutor.timeline)."""
        self.trained = 0
        """Calls that trained (not forward_only), so far."""
        self.train_timeline: list = []
        """The measured ops of the last call that trained."""
        self.freed_outputs = 0
        """Output tensors freed after sending, over all calls."""
        self.saved_bytes = None
        """A models.memory.SavedBytes counting every saved activation (benchmarks)."""

    def __call__(self, *, forward_step_func, data_iterator, model, num_microbatches: int,
                 seq_length: int | None = None, micro_batch_size: int | None = None,
                 decoder_seq_length: int | None = None, forward_only: bool = False,
                 collect_non_loss_data: bool = False, first_val_step: bool | None = None,
                 adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None,
                 force_all_reduce: bool | None = False) -> list:
        plan = self.last_plan = self.plan_source()
        self._check_agreement(plan)
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        stages = [s.index for s in plan.table.layout.stages_of_rank(self.rank)]
        _check(plan, self.rank, stages, chunks, num_microbatches)
        config = _config(chunks[0])
        data = _read(data_iterator, num_microbatches)
        device = next(chunks[0].parameters()).device
        steps = _Steps(self, plan, dict(zip(stages, chunks)), data, config, forward_step_func,
                       num_microbatches, forward_only, collect_non_loss_data)
        transport = self._transport(plan, device)
        executor = RankExecutor(plan, self.rank, steps, transport, self.model_spec, self.rules,
                                forward_only=forward_only)
        with steps.sync_control():
            if forward_only:
                with torch.no_grad():
                    executor.run()
            else:
                executor.run()
        self.freed_outputs += executor.freed
        self.last_timeline = executor.timeline
        if not forward_only:
            self.trained += 1
            self.train_timeline = executor.timeline
        if config is not None and config.finalize_model_grads_func is not None and not forward_only:
            # On the chunks' device, as Megatron's total_num_tokens (finalize reduces it).
            tokens = torch.tensor(steps.total_tokens, dtype=torch.int, device=device) \
                if config.calculate_per_token_loss else None
            config.finalize_model_grads_func(chunks, tokens, pg_collection=pg_collection,
                                             force_all_reduce=force_all_reduce)
        return steps.reports


    def _transport(self, plan: IterationPlan, device: torch.device) -> Transport:
        mode = self.transport
        nccl = dist.get_backend(self.group) == "nccl"
        if mode == "auto":
            mode = "nccl-order" if nccl else "tags"
        if mode == "tags" and nccl:
            raise ExecutionError("transport 'tags' cannot run on NCCL (it ignores tags); "
                                 "use nccl-order")
        channels = None
        if mode == "nccl-order":
            channels = Channels.create(plan.table.layout, self.global_ranks)
        if device.type == "cuda" and self._watchdog is None:
            self._watchdog = Watchdog(dist.get_rank(), self.timeout_s)
        return Transport(self.group, self.global_ranks, device, self.timeout_s, channels,
                         self.rank, self._watchdog)

    def _check_agreement(self, plan: IterationPlan) -> None:
        """Every rank of the pipeline group must run the same plan (content hash)."""
        mine = plan.content_hash
        hashes: list = [None] * len(self.global_ranks)
        dist.all_gather_object(hashes, mine, group=self.group)
        for rank, theirs in enumerate(hashes):
            if theirs != mine:
                raise ExecutionError(f"rank {self.rank}: plan {mine[:16]} differs from pipeline "
                                     f"rank {rank}'s plan {str(theirs)[:16]}; refusing to run")


def _check(plan: IterationPlan, rank: int, stages: list[int], chunks: list, count: int) -> None:
    """The dispatch table at start-up: every op is known, every chunk exists."""
    if plan.table.num_microbatches != count:
        raise ExecutionError(f"rank {rank}: the plan has {plan.table.num_microbatches} "
                             f"microbatches, Megatron asks for {count}")
    if len(stages) != len(chunks):
        raise ExecutionError(f"rank {rank}: the plan gives this rank stages {stages}, the "
                             f"model has {len(chunks)} chunks")
    for index, op in enumerate(plan.execution.ranks[rank].ops):
        if not isinstance(op, KNOWN_OPS):
            raise ExecutionError(f"rank {rank}, op {index}: unknown op {op!r}")
    for chunk in chunks:
        while hasattr(chunk, "module") and not hasattr(chunk, "sequence_parallel"):
            chunk = chunk.module  # DDP / Float16Module wrappers
        runs = getattr(chunk, "sequence_parallel", plan.sequence_parallel)
        if runs != plan.sequence_parallel:
            raise ExecutionError(f"rank {rank}: the plan's messages are "
                                 f"{'' if plan.sequence_parallel else 'not '}sequence-parallel, "
                                 f"the chunks {'are' if runs else 'are not'}")


def _config(chunk):
    return getattr(chunk, "config", None) or getattr(getattr(chunk, "module", None), "config", None)


def _read(data_iterator, count: int) -> list:
    """The iteration's microbatches, in order (Megatron may pass one iterator per chunk)."""
    if isinstance(data_iterator, (list, tuple)):
        data_iterator = next((it for it in data_iterator if it is not None), None)
    if data_iterator is None:
        raise ExecutionError("PipeWeaver needs every rank's data iterator (the metadata "
                             "decides every rank's shapes)")
    return [next(data_iterator) for _ in range(count)]


class _Steps:
    """The executor's model callbacks with Megatron's hooks around them."""

    def __init__(self, schedule, plan, chunk_of, data, config, forward_step_func, count,
                 forward_only, collect_non_loss_data) -> None:
        self.plan, self.chunk_of, self.data, self.config = plan, chunk_of, data, config
        self.forward_step_func, self.count = forward_step_func, count
        self.forward_only, self.collect = forward_only, collect_non_loss_data
        self.reports: list = []
        self.total_tokens = 0
        actions = plan.table.ranks[schedule.rank]
        self.last_backward = {a.stage: a for a in actions if a.op == Op.B}
        self.first_forward = {}
        for a in actions:
            self.first_forward.setdefault(a.stage, a)
        self.chunk_ids = {stage: i for i, stage in enumerate(chunk_of)}
        self.no_sync = list(dict.fromkeys(self._funcs("no_sync_func")))
        self.param_sync = self._funcs("param_sync_func")
        self.grad_sync = self._funcs("grad_sync_func")
        self.grad_scale = getattr(config, "grad_scale_func", None)
        self.saved_bytes = schedule.saved_bytes
        self._sync_off: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def sync_control(self):
        self._disable_sync()
        try:
            yield
        finally:
            self._enable_sync()

    def _funcs(self, name: str) -> list:
        """A config hook per chunk (Megatron takes one, or a list of one per chunk)."""
        value = getattr(self.config, name, None)
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.chunk_of)

    def _disable_sync(self) -> None:
        if self.forward_only or self._sync_off is not None:
            return
        stack = contextlib.ExitStack()
        for func in self.no_sync:
            stack.enter_context(func())
        self._sync_off = stack

    def _enable_sync(self) -> None:
        if self._sync_off is not None:
            self._sync_off.close()
            self._sync_off = None

    def forward(self, action: Action, inputs: dict) -> tuple[dict, torch.Tensor | None]:
        chunk = self.chunk_of[action.stage]
        if self.param_sync and not self.forward_only and self.first_forward[action.stage] == action:
            self.param_sync[self.chunk_ids[action.stage]](chunk.parameters())
        layout = self.plan.table.layout
        module = layout.stages[action.stage].parts[0].module
        members = self.plan.sub_members(module, action.microbatch, action.sub)
        data = select(self.data[action.microbatch], module, members)
        # Through wrappers (megatron-core DDP, Float16Module), as Megatron's schedules do.
        get_attr_wrapped_model(chunk, "set_input_tensor")(inputs)
        recompute, offload = self.plan.strategy(action.stage, action.microbatch, action.sub)
        if self.forward_only or (not (recompute or offload) and self.saved_bytes is None):
            output, loss_func = self.forward_step_func(iter([data]), chunk)
        else:  # the planner's memory strategy (models/memory.py)
            with layer_memory(recompute, offload, chunk.parameters(), self.saved_bytes):
                output, loss_func = self.forward_step_func(iter([data]), chunk)
        loss = getattr(output, "loss", None)
        outputs = getattr(output, "outputs", output)
        if loss is None:
            return outputs, None
        if self.collect:
            self.reports.append(loss_func(output, non_loss_data=True))
            return outputs, None
        result = loss_func(output)
        if len(result) == 3:
            loss, tokens, report = result
            self.total_tokens += int(tokens)
            if self.config is None or not self.config.calculate_per_token_loss:
                loss = loss / torch.clamp(torch.as_tensor(tokens), min=1) / self.count
        else:
            loss, report = result
            loss = loss / self.count
        self.reports.append(report)
        return outputs, loss

    def backward(self, action: Action, tensors: list, grads: list) -> None:
        last = self.last_backward[action.stage] == action
        scale = self.grad_scale
        tensors = [scale(t) if g is None and scale is not None else t for t, g in zip(tensors, grads)]
        if last and not self.grad_sync:
            self._enable_sync()
        grads = [torch.ones_like(t) if g is None else g for t, g in zip(tensors, grads)]
        # The engine directly, as Megatron's custom_backward: freed outputs (see the
        # executor's [Note: output freeing]) would fail autograd.backward's shape check.
        torch.autograd.Variable._execution_engine.run_backward(
            tensors=tuple(tensors), grad_tensors=tuple(grads), keep_graph=False,
            create_graph=False, inputs=tuple(), allow_unreachable=True, accumulate_grad=True)
        if last and self.grad_sync:
            self._enable_sync()
            self.grad_sync[self.chunk_ids[action.stage]](self.chunk_of[action.stage].parameters())
        self._disable_sync()
