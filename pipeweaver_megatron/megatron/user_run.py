"""--pipeweaver on the user's own model and data, inside Megatron's own pretrain().

Without --pipeweaver-model-config, with_pipeweaver (providers.py) hands Megatron's
pretrain the script's own dataset provider and:

- model_provider: the chunk of this rank's virtual stage, built from what the script's
  model_provider passes to LLaVAModel or GPTModel (the script's ScriptKind:
  script_model.LLAVA, script_gpt.GPT) and cut by the run's
  layout (chosen by the wrapped parser, virtual_stages); --freeze-LM / --freeze-ViT as
  the script's freeze() call says;
- forward_step: the chunk on the (sub-)microbatch the runtime hands it, with the loss
  reported as "lm loss" (pretrain_gpt.py's loss_func convention: the masked sum and the
  loss tokens);
- forward_backward (install()): the iteration's microbatches read from Megatron's data
  iterator by the script's get_batch ahead of training (script_data.ScriptBatches),
  planned by the planner service and run by the PipeWeaverSchedule; an evaluation call
  (forward_only, the valid iterator) reads its own microbatches and runs the static
  order of the run's chunks.

The run starts at the first model_provider call, after Megatron initialised
torch.distributed and parallel_state; the spec the planner prices is the one the parser
cut the layout with (virtual_stages.PARSED, model_args.planning_spec), checked against
what the script built.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from ..config import ModelSpec, spec_document
from ..ir import Layout
from ..workload import TokenRules
from .install import install, uninstall
from .model_args import FlagError
from .providers import attach_megatron, embedding_ranks, forward_step, megatron_chunks, stage_of
from .script_checkpoint import install_loader
from .script_data import ScriptBatches
from .script_model import ScriptKind, ScriptModel, script_kind
from .virtual_stages import PARSED, layout_id


@dataclass
class UserRun:
    """What the user path's providers share in one process."""

    args: argparse.Namespace
    spec: ModelSpec
    kind: ScriptKind
    """The kind of the script's model (LLaVA, GPT)."""
    script: ScriptModel
    recipe: Any
    """models.llava.LlavaRecipe or models.gpt.GptRecipe of the script's model call."""
    layout: Layout
    pipeline_rank: int
    tp: int
    feed: Any
    """plans.PlanFeed over the training data read ahead."""
    schedule: Any
    """runtime.PipeWeaverSchedule of training."""
    train: ScriptBatches
    convert: Callable[[Any, int], Any]
    get_batch: Callable[[Any], Any]
    workdir: tempfile.TemporaryDirectory
    evals: dict[int, ScriptBatches] = field(default_factory=dict)
    """Evaluation readers by data iterator (valid, test)."""
    eval_next: dict[int, int] = field(default_factory=dict)
    """The next evaluation step of each iterator."""
    eval_keys: dict[tuple[int, int], int] = field(default_factory=dict)
    """Planner service keys of the evaluation steps read: (iterator, step) -> key."""
    started: bool = False

    def close(self) -> None:
        self.feed.close()
        self.workdir.cleanup()


def start_user_run(args: argparse.Namespace, kind: ScriptKind,
                   script_provider: Callable[..., Any],
                   get_batch: Callable[[Any], Any] | None, **call: Any) -> UserRun:
    """Capture the script's model, check it against the planned spec, start the plan
    feed (planner service on the first rank of each model-parallel group)."""
    from .trainer import current_topology, local_device, open_plans

    if get_batch is None:
        raise FlagError("--pipeweaver: the script's forward_step has no get_batch to read "
                        "its microbatches with (pretrain_vlm.py's and pretrain_gpt.py's have)")
    script = kind.capture(script_provider, **call)
    recipe = kind.recipe_of(script)
    spec = PARSED["spec"]
    kind.check_built(args, spec, recipe)
    topo = current_topology(local_device())
    convert = kind.convert(recipe)
    start = getattr(args, "iteration", 0) or 0
    train = ScriptBatches(get_batch, convert, spec.parallel.num_microbatches,
                          kind.image_size(spec), start, args.train_iters - 1)
    workdir = tempfile.TemporaryDirectory(prefix="pipeweaver-spec-")
    model_file = os.path.join(workdir.name, "model.yaml")
    with open(model_file, "w") as out:
        yaml.safe_dump(spec_document(spec), out)
    try:
        feed, schedule = open_plans(args, spec, train.planned(), topo, {}, model_file)
    except Exception:
        workdir.cleanup()
        raise
    planned = PARSED.get("layout")
    if planned is not None and layout_id(planned) != layout_id(feed.layout):
        feed.close()
        workdir.cleanup()
        raise FlagError("--pipeweaver: the planner service cut another layout than the "
                        "parser did (the virtual stages follow the parser's)")
    return UserRun(args=args, spec=spec, kind=kind, script=script, recipe=recipe,
                   layout=feed.layout,
                   pipeline_rank=topo.p_rank, tp=topo.tp, feed=feed, schedule=schedule,
                   train=train, convert=convert, get_batch=get_batch, workdir=workdir)


def build_chunk(run: UserRun, stage_index: int, config: Any = None, pg_collection: Any = None):
    """The LMMChunk of one stage of the run's layout from the script's recipe, with the
    script's freeze() applied; chunk.config is the LM's TransformerConfig (Megatron's
    train loop sets its hooks there)."""
    chunk = run.kind.build(run.spec, run.layout, stage_index, tp=run.tp, recipe=run.recipe,
                           seed=run.args.seed)
    for module, frozen in run.script.freeze.items():
        if frozen and hasattr(chunk, module):
            for param in getattr(chunk, module).parameters():
                param.requires_grad_(False)
    return attach_megatron(chunk, config if config is not None else run.recipe.language_config,
                           pg_collection)


def run_forward_backward(run: UserRun, **kwargs: Any) -> list:
    """Megatron's forward_backward call on the microbatches read ahead (training) or
    on the evaluation step's (forward only, _evaluate)."""
    iterator = kwargs["data_iterator"]
    if isinstance(iterator, (list, tuple)):
        iterator = next((it for it in iterator if it is not None), None)
    if kwargs.get("forward_only"):
        return _evaluate(run, iterator, **kwargs)
    feed = run.feed
    source = getattr(iterator, "iterable", iterator)  # under Megatron's RerunDataIterator
    if not run.started:
        if hasattr(source, "track_training"):  # --data-path: it saves the untrained samples
            source.track_training()
        feed.start(run.train.next_read)
        run.started = True
    iteration = feed.iteration
    run.train.fill(iterator, iteration + run.args.pipeweaver_lookahead)
    data = run.train.take(iteration)
    if hasattr(source, "trained"):
        source.trained(len(data))
    if run.args.pipeweaver_log:
        # Megatron's count of iterations done (the feed counts from this process's start)
        _log_keys(run.args.pipeweaver_log, getattr(run.args, "curr_iteration", iteration),
                  run.train.taken_keys)
    return run.schedule(**{**kwargs, "data_iterator": iter(data)})


def _log_keys(path: str, iteration: int, keys: list) -> None:
    """--pipeweaver-log: one JSON line per iteration (0-based: Megatron logs it as
    iteration + 1) with every data-parallel replica's sample keys, in microbatch order,
    gathered over the data-parallel group and written by rank 0."""
    import json

    import torch.distributed as dist
    from megatron.core import parallel_state

    from .trainer import replica_keys

    every = replica_keys(keys)
    if dist.get_rank() == 0:
        with open(path, "a") as out:
            out.write(json.dumps({"iteration": iteration, "sample_keys": keys,
                                  "sample_keys_by_dp_rank": every,
                                  "dp_rank": parallel_state.get_data_parallel_rank()}) + "\n")


def _evaluate(run: UserRun, iterator: Any, **kwargs: Any) -> list:
    """One evaluation step: its microbatches read from the valid (or test) iterator and
    planned by the search like a training iteration's, forward only. The next step of
    the same evaluation (Megatron's evaluate runs --eval-iters steps) is read and
    submitted too, so its search runs while this step computes. Nothing is read beyond
    the evaluation: a finite iterator may end there, and under TP the script's get_batch
    reads on one rank and broadcasts to the others, which would wait for ever."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..runtime import PipeWeaverSchedule

    spec, source, args = run.spec, id(iterator), run.args
    reader = run.evals.get(source)
    if reader is None:
        reader = run.evals[source] = ScriptBatches(
            run.get_batch, run.convert, kwargs["num_microbatches"], run.train.image_size)
    reader.count = kwargs["num_microbatches"]
    step = run.eval_next.get(source, 0)
    last_of_evaluation = (getattr(args, "full_validation", False)
                          or (step + 1) % max(args.eval_iters, 1) == 0)
    for ahead in (step,) if last_of_evaluation else (step, step + 1):
        if ahead >= reader.next_read:
            reader.fill(iterator, ahead)
            run.eval_keys[source, ahead] = run.feed.submit_eval(next(reader.planned()))
    data = reader.take(step)
    plan = run.feed.eval_plan(run.eval_keys.pop((source, step)))
    run.eval_next[source] = step + 1
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    schedule = PipeWeaverSchedule(lambda: plan, spec, TokenRules.from_model(spec),
                                  run.pipeline_rank, dist.get_process_group_ranks(pp_group),
                                  pp_group, transport=getattr(args, "pipeweaver_transport", "auto"))
    return schedule(**{**kwargs, "data_iterator": iter(data)})


def check_user_args(args: argparse.Namespace) -> None:
    """Raise FlagError naming every Megatron flag the user path cannot run yet."""
    checks = (
        (getattr(args, "context_parallel_size", 1) == 1, "context parallelism"),
        (getattr(args, "rampup_batch_size", None) is None, "--rampup-batch-size (the planner "
         "needs a fixed number of microbatches per iteration)"),
        (getattr(args, "micro_batch_size", 1) == 1, "--micro-batch-size other than 1 (a "
         "PipeWeaver microbatch is one sequence)"),
        (not getattr(args, "fp8", None), "FP8"),
        (not (getattr(args, "save", None) or getattr(args, "load", None))
         or getattr(args, "ckpt_format", "torch") in ("torch", "torch_dist"),
         "--ckpt-format other than torch or torch_dist with --save / --load (torch_dist "
         "goes through the chunks' layout-free sharded_state_dict, models/sharding.py)"),
        (getattr(args, "train_iters", None), "--train-samples (pass --train-iters)"),
    )
    problems = [what for ok, what in checks if not ok]
    if problems:
        raise FlagError("--pipeweaver with this script does not support: " + "; ".join(problems))


def lm_loss(output: Any, non_loss_data: bool = False):
    """pretrain_gpt.py's loss_func convention for a chunk ending with the LM head: the
    masked loss sum, the loss tokens and {"lm loss": [sum, tokens]}."""
    from ..runtime import lmm_loss

    result = lmm_loss(output, non_loss_data)
    if non_loss_data:
        return result
    loss, tokens, report = result
    return loss, tokens, {"lm loss": report["loss"]}


def user_pretrain(pretrain: Callable[..., Any], datasets: Callable, script_provider: Callable,
                  model_type: Any, script_step: Callable, rest: tuple, kwargs: dict,
                  megatron_args: Callable[[], argparse.Namespace]) -> Any:
    """Megatron's pretrain on the script's dataset provider with PipeWeaver's chunks of
    the script's model, forward step and forward_backward (see the module docstring)."""
    kind = script_kind(script_provider)
    state: dict[str, UserRun] = {}

    def model_provider(pre_process: bool = True, post_process: bool = True,
                       vp_stage: int | None = None, config: Any = None,
                       pg_collection: Any = None):
        args = megatron_args()
        if "run" not in state:
            check_user_args(args)
            state["run"] = start_user_run(args, kind, script_provider,
                                          script_step.__globals__.get("get_batch"),
                                          pre_process=pre_process, post_process=post_process,
                                          config=config, pg_collection=pg_collection)
        run = state["run"]
        stage = stage_of(run.layout, run.pipeline_rank, vp_stage, megatron_chunks(args),
                         args.pipeline_model_parallel_size)
        return build_chunk(run, stage.index, pg_collection=pg_collection)

    def step(data_iterator: Any, model: Any) -> tuple:
        output, _ = forward_step(data_iterator, model)
        return output, lm_loss

    def forward_backward(**call: Any) -> list:
        return run_forward_backward(state["run"], **call)

    def datasets_provider(train_val_test_num_samples: Any, vp_stage: int | None = None):
        # Megatron builds one data iterator per virtual stage; the runtime reads every
        # microbatch from the first (the plan hands each chunk its part).
        if vp_stage:
            return None, None, None
        return datasets(train_val_test_num_samples)

    datasets_provider.is_distributed = getattr(datasets, "is_distributed", False)
    kwargs["get_embedding_ranks"] = kwargs["get_position_embedding_ranks"] = embedding_ranks
    install(forward_backward)
    restore_loader = install_loader(lambda: state["run"])
    restore_script = kind.prepare(script_step.__globals__)
    try:
        return pretrain(datasets_provider, model_provider, model_type, step, *rest, **kwargs)
    finally:
        if "run" in state:
            state.pop("run").close()
        restore_script()
        restore_loader()
        uninstall()
