"""Megatron-LM's pretrain_vlm.py and pretrain_gpt.py under --pipeweaver.

The patches in patches/ add one call to each script's ``__main__``:

    pretrain = with_pipeweaver(pretrain)

which always adds the --pipeweaver flags to the script's extra_args_provider
(chain_args). Under --pipeweaver without --pipeweaver-model-config the script's own model
and data train (user_run.py, the drop-in). With --pipeweaver-model-config (this module:
the YAML setups) it hands Megatron's pretrain this module's model_provider,
train_valid_test_datasets_provider, forward_step and embedding ranks, defaults
--dataloader-type to external, and install()s forward_backward, so Megatron's train_step
runs forward_backward_pipeweaver on the LMM chunks of --pipeweaver-model-config; that
path refuses what check_args lists. Megatron's model-shape flags stay required by its
argument checks but build nothing; as in scripts/pretrain_lmm.py, --seq-length is the
packing budget of a microbatch, --global-batch-size the microbatches per iteration over
data parallelism and --transformer-impl the layer spec. The run (model spec, this
replica's global batches, the plan feed and the schedule) starts at the first provider
call, after Megatron initialised torch.distributed and parallel_state. megatron.training
is imported inside functions only (megatron_args), so this module imports without
Megatron-LM; tests replace megatron_args.

[Note: virtual stages] Megatron builds V model chunks per pipeline rank, V =
--num-virtual-stages-per-pipeline-rank (1 when unset; with PP = 1 Megatron builds one
chunk whatever V says), calling model_provider(vp_stage=v) for v < V (no vp_stage when
it builds one). The run's layout fixes the stages each rank owns: vp_stage v of
pipeline rank r is the v-th stage of r in pipeline order, layout.stages_of_rank(r)[v].
PipeWeaver's partitioner cuts module i into P * K_i chunks with chunk c on rank c mod P,
so every rank owns sum(K_i) stages and vp_stage v is stage v * P + r, Megatron's own
interleaved numbering; the megatron-1f1b / megatron-interleaved layouts own 1 / the
spec's vp. V cannot follow the layout by itself (Megatron sets its virtual pipeline up
from the flags before any provider runs; the layout is cut from the run's first batch
after that), so V must equal the stages per rank: model_provider raises
VirtualStageError with the flag to pass otherwise.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..config import ModelSpec, ModuleKind
from ..ir import Layout, Stage
from ..workload import GlobalBatch, TokenRules
from .arguments import chain_args
from .install import install, uninstall

if TYPE_CHECKING:  # torch and megatron-core are imported where they are used
    import torch

    from ..models.data import MicrobatchData
    from ..models.lmm import LMMChunk
    from ..runtime import PipeWeaverSchedule
    from .plans import PlanFeed


class ProviderError(ValueError):
    """Megatron's arguments cannot run --pipeweaver as given (the message says why)."""


class VirtualStageError(ProviderError):
    """Megatron's virtual stages do not match the run's layout (see [Note: virtual stages])."""


def megatron_args() -> argparse.Namespace:
    """Megatron-LM's parsed arguments (tests replace this function)."""
    from megatron.training import get_args

    return get_args()


def requested(argv: Sequence[str] | None = None) -> bool:
    """--pipeweaver is on the command line (Megatron's parser takes no abbreviations)."""
    return "--pipeweaver" in (sys.argv[1:] if argv is None else argv)


def configured(argv: Sequence[str] | None = None) -> bool:
    """--pipeweaver-model-config is on the command line: the YAML model and its synthetic
    workload train (the paper setups); without it the script's own model and data do."""
    return _given("--pipeweaver-model-config", argv)


def _given(flag: str, argv: Sequence[str] | None = None) -> bool:
    """`flag` is on the command line (as itself or as flag=value)."""
    given = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in given)


def reads_energon(model_provider: Callable[..., Any], argv: Sequence[str] | None = None) -> bool:
    """pretrain_vlm.py (its model_provider binds LLaVAModel) with --data-path: the
    prepared Energon dataset replaces the script's mock data (vlm_data.py), with or
    without --pipeweaver. pretrain_gpt.py's --data-path stays Megatron's own."""
    names = getattr(getattr(model_provider, "func", model_provider), "__globals__", {})
    return _given("--data-path", argv) and "LLaVAModel" in names


def with_pipeweaver(pretrain: Callable[..., Any]) -> Callable[..., Any]:
    """Megatron's pretrain with the --pipeweaver flags and, under --pipeweaver, this
    module's providers, forward step and forward_backward (see the module docstring).
    Arguments after forward_step_func other than process_non_loss_data_func go by
    keyword, as both scripts pass them."""

    @functools.wraps(pretrain)
    def run(datasets: Callable, model: Callable, model_type: Any, step: Callable,
            *rest: Any, **kwargs: Any) -> Any:
        if len(rest) > 1:
            raise TypeError("with_pipeweaver: pass pretrain's arguments after "
                            "process_non_loss_data_func by keyword")
        kwargs["extra_args_provider"] = chain_args(kwargs.get("extra_args_provider"))
        if not configured():
            if not reads_energon(model):
                return _user_script(pretrain, datasets, model, model_type, step, rest, kwargs)
            from .vlm_data import install_state_saver, vlm_datasets_provider

            kwargs["args_defaults"] = {**kwargs.get("args_defaults", {}),
                                       "dataloader_type": "external"}
            restore = install_state_saver()
            try:
                return _user_script(pretrain, vlm_datasets_provider(megatron_args), model,
                                    model_type, step, rest, kwargs)
            finally:
                restore()
        if not requested():
            return pretrain(datasets, model, model_type, step, *rest, **kwargs)
        kwargs["args_defaults"] = {**kwargs.get("args_defaults", {}), "dataloader_type": "external"}
        kwargs["get_embedding_ranks"] = kwargs["get_position_embedding_ranks"] = embedding_ranks
        install(forward_backward)
        try:
            return pretrain(train_valid_test_datasets_provider, model_provider, model_type,
                            forward_step, *rest, **kwargs)
        finally:
            close()
            uninstall()

    return run


def _user_script(pretrain: Callable[..., Any], datasets: Callable, model: Callable,
                 model_type: Any, step: Callable, rest: tuple, kwargs: dict) -> Any:
    """The script's own model and data: Megatron's pretrain as the script calls it, or
    under --pipeweaver the drop-in (user_run.py)."""
    if not requested():
        return pretrain(datasets, model, model_type, step, *rest, **kwargs)
    from .user_run import user_pretrain

    return user_pretrain(pretrain, datasets, model, model_type, step, rest, kwargs,
                         lambda: megatron_args())


def check_args(args: argparse.Namespace) -> None:
    """Raise ProviderError listing every Megatron argument --pipeweaver cannot run with."""
    problems = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    need(getattr(args, "pipeweaver", False), "pass --pipeweaver")
    need(getattr(args, "pipeweaver_model_config", None), "pass --pipeweaver-model-config")
    need(getattr(args, "train_iters", None), "pass --train-iters (not --train-samples): the "
         "workload's batches are drawn per iteration")
    need(not getattr(args, "eval_iters", 0), "pass --eval-iters 0: every forward_backward "
         "call runs the next training iteration's plan, so Megatron cannot evaluate yet")
    need(getattr(args, "dataloader_type", None) == "external", "pass --dataloader-type "
         "external: the dataset provider yields the workload's packed microbatches itself")
    need(not (getattr(args, "fp16", False) or getattr(args, "bf16", False)), "drop --fp16 / "
         "--bf16: plans carry float32 messages and Float16Module turns the chunks' "
         "ChunkResult into a tuple")
    need(getattr(args, "context_parallel_size", 1) == 1, "context parallelism is not supported")
    need(not getattr(args, "sequence_parallel", False), "drop --sequence-parallel: the "
         "YAML model's chunks run it under scripts/pretrain_lmm.py --sequence-parallel and "
         "pipeweaver verify --sequence-parallel, not yet checked inside Megatron-LM's loop")
    need(getattr(args, "rampup_batch_size", None) is None, "drop --rampup-batch-size: the "
         "planner needs a fixed number of microbatches per iteration")
    need(not (getattr(args, "save", None) or getattr(args, "load", None))
         or getattr(args, "ckpt_format", None) == "torch_dist", "pass --ckpt-format "
         "torch_dist with --save / --load: the LMM chunks' sharded_state_dict is layout-free "
         "(models/sharding.py); other formats would tie the checkpoint to one layout")
    need(getattr(args, "micro_batch_size", 1) == 1, "pass --micro-batch-size 1: a PipeWeaver "
         "microbatch is one packed sequence of up to --seq-length tokens")
    if problems:
        raise ProviderError("--pipeweaver with Megatron-LM: " + "; ".join(problems))


def megatron_chunks(args: argparse.Namespace) -> int:
    """How many model chunks Megatron's get_model builds per pipeline rank."""
    if args.pipeline_model_parallel_size == 1:
        return 1
    return args.virtual_pipeline_model_parallel_size or 1


def stage_of(layout: Layout, rank: int, vp_stage: int | None, chunks: int, pp: int) -> Stage:
    """The Stage Megatron's virtual stage vp_stage of pipeline rank `rank` builds, when
    Megatron builds `chunks` chunks per rank (see [Note: virtual stages])."""
    owned = layout.stages_of_rank(rank)
    if len(owned) != chunks:
        if pp == 1:
            fix = ("with --pipeline-model-parallel-size 1 Megatron builds one chunk: use "
                   "PP >= 2 or --pipeweaver-schedule megatron-1f1b")
        elif len(owned) == 1:
            fix = "drop --num-virtual-stages-per-pipeline-rank"
        else:
            fix = f"pass --num-virtual-stages-per-pipeline-rank {len(owned)}"
        raise VirtualStageError(
            f"the run's layout gives pipeline rank {rank} {len(owned)} stages "
            f"{[s.index for s in owned]}, Megatron builds {chunks} model chunks per rank: {fix}")
    index = 0 if vp_stage is None else vp_stage
    if not 0 <= index < chunks:
        raise VirtualStageError(f"vp_stage {vp_stage} outside the {chunks} chunks of a rank")
    return owned[index]


def loss_ranks(model: ModelSpec, layout: Layout) -> set[int]:
    """Ranks owning a stage that ends a module with a loss head."""
    ranks = set()
    for stage in layout.stages:
        last = stage.parts[-1]
        spec = model.module(last.module)
        if (last.last_layer == spec.num_layers and model.has_head(last.module)
                and spec.kind in (ModuleKind.LANGUAGE_MODEL, ModuleKind.GENERATOR)):
            ranks.add(stage.rank)
    return ranks


@dataclass(kw_only=True)
class Run:
    """What the providers share in one process (started by the first provider call)."""

    model: ModelSpec
    """The spec of --pipeweaver-model-config."""
    rules: TokenRules
    layout: Layout
    """The run's layout (the same on every rank)."""
    batches: list[GlobalBatch]
    """This data-parallel replica's GlobalBatch of every iteration."""
    pipeline_rank: int
    tp: int
    seed: int
    use_te: bool | None
    """Transformer Engine layer specs (--transformer-impl), None: when usable."""
    device: torch.device
    """Where the microbatch tensors go (the chunks' device)."""
    feed: PlanFeed | None = None
    """The PlanFeed (plans.py); None in tests that build chunks only."""
    schedule: PipeWeaverSchedule | None = None
    """The PipeWeaverSchedule forward_backward runs."""
    started: bool = False


_RUN: Run | None = None


def current_run(args: argparse.Namespace | None = None) -> Run:
    """The process's Run, started from Megatron's arguments on first use."""
    global _RUN
    if _RUN is None:
        _RUN = start_run(megatron_args() if args is None else args)
    return _RUN


def start_run(args: argparse.Namespace) -> Run:
    """Model spec, this replica's batches, the plan feed and the schedule. Needs
    torch.distributed and parallel_state (Megatron's initialize_megatron sets them up)."""
    from .trainer import current_topology, local_device, open_run, use_te_flag

    check_args(args)
    topo = current_topology(local_device())
    # As scripts/pretrain_lmm.py: --global-batch-size and --seq-length override the spec's
    # microbatches per iteration and packing budget; replica d draws its own batches.
    run = open_run(args, topo)
    heads = loss_ranks(run.model, run.feed.layout) - {topo.pp - 1}
    if heads:
        run.feed.close()
        raise ProviderError(f"the layout puts a loss head on pipeline ranks {sorted(heads)}; "
                            "Megatron's finalize_model_grads counts loss tokens on the last "
                            "pipeline rank only")
    return Run(model=run.model, rules=run.rules, layout=run.feed.layout, batches=run.batches,
               pipeline_rank=topo.p_rank, tp=topo.tp, seed=args.seed, device=topo.device,
               feed=run.feed, schedule=run.schedule, use_te=use_te_flag(args))


def close() -> None:
    """Stop the run's planner service and forget the run."""
    global _RUN
    if _RUN is not None and _RUN.feed is not None:
        _RUN.feed.close()
    _RUN = None


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: int | None = None, config: Any = None, pg_collection: Any = None
                   ) -> LMMChunk:
    """The LMMChunk of this pipeline rank's vp_stage-th stage of the run's layout (see
    [Note: virtual stages]). pre_process / post_process are ignored: a chunk embeds and
    computes a loss where its parts start and end modules. config (Megatron passes None)
    becomes chunk.config, where Megatron's train loop sets its hooks; by default Megatron's
    core_transformer_config_from_args."""
    from ..models import stage_chunk

    args = megatron_args()
    run = current_run(args)
    stage = stage_of(run.layout, run.pipeline_rank, vp_stage, megatron_chunks(args),
                     args.pipeline_model_parallel_size)
    chunk = stage_chunk(run.model, run.layout, stage.index, tp=run.tp, seed=run.seed,
                        use_te=run.use_te)
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    return attach_megatron(chunk, config, pg_collection)


def attach_megatron(chunk: LMMChunk, config: Any, pg_collection: Any = None) -> LMMChunk:
    """What Megatron's train loop reads off model[0]: chunk.config (where it sets its
    hooks) and chunk.pg_collection (megatron-core's process groups by default)."""
    chunk.config = config
    if pg_collection is None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    chunk.pg_collection = pg_collection
    return chunk


def train_valid_test_datasets_provider(train_val_test_num_samples: Sequence[int],
                                       vp_stage: int | None = None) -> tuple:
    """(train, None, None): an iterator over the MicrobatchData of this replica's global
    batches from the current iteration on (Megatron's --dataloader-type external hands
    it to train_step as it is). Only the first virtual stage gets one; the runtime reads
    every microbatch from the first iterator it is given."""
    if vp_stage:
        return None, None, None
    args = megatron_args()
    run = current_run(args)
    start = getattr(args, "iteration", 0) or 0  # after --load, where training resumes
    if not run.started and run.feed is not None:
        run.feed.start(start)
        run.started = True
    return microbatches(run, start), None, None


train_valid_test_datasets_provider.is_distributed = True  # every rank builds its own data


def microbatches(run: Run, start: int) -> Iterator[MicrobatchData]:
    """MicrobatchData of every microbatch of batches[start:], in order, on run.device."""
    from ..models.data import microbatch_data

    for batch in run.batches[start:]:
        for microbatch in batch.microbatches:
            yield microbatch_data(run.model, microbatch, run.rules, run.seed).to(run.device)


def forward_step(data_iterator: Iterator[MicrobatchData], model: Any) -> tuple:
    """Megatron's forward_step_func for LMMChunks under any wrappers (DDP): the chunk
    itself runs, on the received tensors the runtime set."""
    from ..models.lmm import LMMChunk
    from ..runtime import lmm_forward_step

    while not isinstance(model, LMMChunk) and hasattr(model, "module"):
        model = model.module
    return lmm_forward_step(data_iterator, model)


def forward_backward(**kwargs: Any) -> list:
    """What install() makes get_forward_backward_func return: the run's
    PipeWeaverSchedule, called with Megatron's keyword arguments."""
    return current_run().schedule(**kwargs)


def embedding_ranks(pp_ranks: list[int]) -> list[int]:
    """Megatron's get_embedding_ranks: no stage shares an embedding with another, so no
    embedding gradient is all-reduced across the pipeline."""
    return list(pp_ranks[:1])
