"""Gradient reduction and optimizer of the training loop, on either path.

- Host path (no CUDA): a plain torch Adam over the chunks' parameters, gradients summed
  over data parallelism with one all-reduce per parameter, then divided by the batch's
  loss tokens. megatron-core's DDP and optimizer allocate CUDA buffers, so they cannot
  run here.
- CUDA path: every chunk wrapped in megatron-core's DistributedDataParallel (contiguous
  grad buffers, fp32 reduction) and megatron-core's optimizer from get_megatron_optimizer
  (the distributed optimizer with --use-distributed-optimizer). The schedule's config
  carries Megatron's hooks: no_sync_func per chunk, and finalize_model_grads_func =
  finalize_pipeweaver_grads.

Both paths give the same update: per-token loss (calculate_per_token_loss), gradients
summed over DP, divided by the loss tokens of the whole global batch, then Adam.

[Note: loss tokens over the pipeline] megatron-core's finalize_model_grads broadcasts
num_tokens from the last pipeline stage, where Megatron's only loss lives. A PipeWeaver
layout may put a loss head on any rank (the LM's head mid-pipeline, a DiT's at the
end), so finalize_pipeweaver_grads sums every rank's loss tokens over the pipeline
group instead, then over data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class HostRunConfig:
    """The fields of Megatron's config forward_backward_pipeweaver reads (host path)."""

    calculate_per_token_loss = True
    grad_scale_func = no_sync_func = grad_sync_func = param_sync_func = None
    finalize_model_grads_func = None


@dataclass
class Training:
    """The chunks as the schedule sees them, and how to zero, reduce and step."""

    model: list
    """What forward_backward gets: the chunks, or their DDP wrappers."""
    optimizer: object
    megatron_core: bool
    """True on the CUDA path (megatron-core DDP and optimizer)."""
    params: list = field(default_factory=list)

    def zero_grad(self) -> None:
        if self.megatron_core:
            for chunk in self.model:
                chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def reduce(self, tokens: float, dp_group, clip_grad: float = 0.0) -> None:
        """Host path: sum gradients over DP, divide by all loss tokens, clip the global
        norm to clip_grad (0: off). The CUDA path did the first two in
        finalize_pipeweaver_grads, inside forward_backward, and its optimizer clips."""
        if not self.megatron_core:
            reduce_host_gradients(self.params, tokens, dp_group)
            if clip_grad:
                clip_host_gradients(self.params, clip_grad)

    def step(self) -> None:
        self.optimizer.step()


def build_training(chunks: list, args, device: torch.device) -> Training:
    """The host path off CUDA, megatron-core's DDP and optimizer on CUDA."""
    if device.type != "cuda":
        if getattr(args, "use_distributed_optimizer", False):
            raise ValueError("--use-distributed-optimizer needs CUDA (megatron-core's "
                             "distributed optimizer allocates device buffers)")
        for chunk in chunks:
            chunk.config = HostRunConfig()
        params = [p for c in chunks for p in c.parameters()]
        if any(p.dtype != torch.float32 for p in params):  # --bf16
            from ..models.precision import keep_fp32_grads

            for chunk in chunks:
                keep_fp32_grads(chunk)
            return Training(list(chunks), MixedPrecisionAdam(params, args.lr), False, params)
        return Training(list(chunks), torch.optim.Adam(params, lr=args.lr), False, params)
    return _megatron_core_training(chunks, args)


class MixedPrecisionAdam:
    """Adam on fp32 main copies of low-precision parameters (host path of --bf16, as
    megatron-core's Float16OptimizerWithFloat16Params): the step reads the fp32
    main_grad, updates the fp32 copy and casts it back into the parameter. The copies
    are part of state_dict, so a resumed run continues from the same fp32 values."""

    def __init__(self, params: list, lr: float) -> None:
        self.params = list(params)
        self.main = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.adam = torch.optim.Adam(self.main, lr=lr)

    def zero_grad(self) -> None:
        from ..models.precision import zero_main_grads

        zero_main_grads(self.params)
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        from ..models.precision import main_grad

        for param, main in zip(self.params, self.main):
            grad = main_grad(param)
            main.grad = None if grad is None else grad.float()
        self.adam.step()
        with torch.no_grad():
            for param, main in zip(self.params, self.main):
                param.copy_(main)

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "main": [m.detach().clone() for m in self.main]}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])
        with torch.no_grad():
            for main, saved, param in zip(self.main, state["main"], self.params, strict=True):
                main.copy_(saved)
                param.copy_(saved)


def _megatron_core_training(chunks: list, args) -> Training:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ..models.transformer_config import transformer_config

    first = chunks[0]
    spec = first.model.module(first.parts[0].module)
    if not spec.is_transformer:  # a projector-led chunk: any transformer module's config
        spec = next(m for m in first.model.modules if m.is_transformer)
    config = transformer_config(spec, tp=first.tp)
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer, check_for_nan_in_grad=True)
    model = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
             for index, chunk in enumerate(chunks)]
    for wrapped in model:
        wrapped.broadcast_params()  # DP replicas start equal
    config.no_sync_func = [m.no_sync for m in model]
    config.finalize_model_grads_func = finalize_pipeweaver_grads
    bf16 = bool(getattr(args, "bf16", False))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=args.clip_grad, bf16=bf16,
                        use_distributed_optimizer=args.use_distributed_optimizer,
                        params_dtype=torch.bfloat16 if bf16 else torch.float32), model)
    return Training(model, optimizer, True)


def finalize_pipeweaver_grads(model: list, num_tokens: torch.Tensor | None = None,
                              pg_collection=None, force_all_reduce: bool | None = False) -> None:
    """Megatron's finalize_model_grads_func for PipeWeaver layouts: finish the DP
    reduction of every chunk, sum the sequence-parallel norms' gradients over TP (as
    finalize_model_grads does), then divide by the loss tokens of the whole global batch
    (see [Note: loss tokens over the pipeline])."""
    from megatron.core import parallel_state

    from ..models.precision import main_grad
    from ..models.sequence_parallel import all_reduce_sequence_parallel_grads

    for chunk in model:
        chunk.finish_grad_sync(force_all_reduce=force_all_reduce)
    all_reduce_sequence_parallel_grads((p for c in model for p in c.parameters()), main_grad)
    if num_tokens is None:
        return
    groups = (parallel_state.get_pipeline_model_parallel_group(),
              parallel_state.get_data_parallel_group(with_context_parallel=True))
    if pg_collection is not None:
        groups = (pg_collection.pp, pg_collection.dp_cp)
    for group in groups:
        dist.all_reduce(num_tokens, group=group)
    scale = 1.0 / max(float(num_tokens.item()), 1.0)
    for chunk in model:
        chunk.scale_gradients(scale)


def reduce_host_gradients(params: list, tokens: float, dp_group) -> None:
    """Per-token gradients: the sequence-parallel norms' partial sums over TP, the sum
    over data parallelism, divided by all loss tokens."""
    from ..models.precision import main_grad
    from ..models.sequence_parallel import all_reduce_sequence_parallel_grads

    all_reduce_sequence_parallel_grads(params, main_grad)
    world = dist.get_world_size(dp_group)
    if world > 1:
        count = torch.tensor([tokens], dtype=torch.float64, device=params[0].device)
        dist.all_reduce(count, group=dp_group)
        tokens = float(count.item())
    for p in params:
        grad = main_grad(p)
        if grad is None:
            continue
        if world > 1:
            dist.all_reduce(grad, group=dp_group)
        grad.div_(tokens)


def clip_host_gradients(params: list, max_norm: float) -> float:
    """Clip the global gradient norm over the model-parallel group (host path; on CUDA
    megatron-core's optimizer clips). A parameter replicated over tensor parallelism
    counts once. Returns the norm before clipping."""
    from megatron.core import parallel_state

    from ..models.precision import main_grad

    t_rank = parallel_state.get_tensor_model_parallel_rank()
    total = torch.zeros(1, dtype=torch.float64, device=params[0].device)
    grads = [(p, main_grad(p)) for p in params]
    for p, grad in grads:
        if grad is not None and (getattr(p, "tensor_model_parallel", False) or t_rank == 0):
            total += grad.double().square().sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    norm = float(total.sqrt().item())
    if norm > max_norm:
        for _, grad in grads:
            if grad is not None:
                grad.mul_(max_norm / (norm + 1e-6))
    return norm
