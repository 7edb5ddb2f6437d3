"""Megatron-LM checkpoints of the script's model under --pipeweaver (torch format).

Megatron saves the torch format per (TP, PP) rank: iter_N/mp_rank_TT[_PPP]/
model_optim_rng.pt holding "model" (or "model0", "model1", ... with virtual stages),
each chunk's state_dict with LLaVAModel's names and the layer indices local to the
chunk, plus the optimizer, the scheduler, the RNG states and the args.

- A checkpoint saved under --pipeweaver with the same layout (args.pipeweaver_layout, its id)
  is Megatron's own: its loader reads it unchanged (LMMChunk names are the chunks').
- Any other (saved by the script without --pipeweaver at any PP, or under another
  layout) is read here: every PP file of this TP rank, layer indices made global with
  megatron-core's get_transformer_layer_offset for the saving run's pipeline, and every
  tensor of this rank's chunks copied by name. The iteration, consumed samples and the
  learning-rate scheduler follow Megatron's rules (--finetune: iteration 0, neither).
  The optimizer's state follows by parameter name (the section "The optimizer's state
  by parameter name" below): Adam's moments and step, a bf16/fp16 optimizer's fp32 main
  parameters and grad scaler, each group's settings, for the non-distributed optimizer
  of one parameter set (fp32, --bf16, --fp16). --use-distributed-optimizer on either
  side (its distrib_optim.pt shards the data-parallel grad buffers) and chained
  optimizers (expert parameters) are refused with a FlagError that asks for
  --no-load-optim. With --no-load-optim or --finetune the main parameters of a
  bf16/fp16 optimizer are refreshed from the loaded weights, as Megatron does then.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .model_args import FlagError

LAYER_NAME = re.compile(r"^(vision_model|language_model)\.decoder\.layers\.(\d+)\.(.*)$")
"""A transformer layer's tensor in LLaVAModel: (module, layer index, the rest)."""
GPT_NAME = re.compile(r"^(embedding|decoder|output_layer)\.")
"""A tensor of pretrain_gpt.py's GPTModel, which names its modules without a prefix."""


def global_name(name: str, offset: int) -> str:
    """The chunks' name of a saved tensor: GPTModel's names under "language_model."
    (models/gpt.py), the LM's layer index plus the saving chunk's layer offset."""
    if GPT_NAME.match(name):
        name = f"language_model.{name}"
    match = LAYER_NAME.match(name)
    if match and match.group(1) == "language_model":
        name = f"language_model.decoder.layers.{int(match.group(2)) + offset}.{match.group(3)}"
    return name


def unwrap(module: Any) -> Any:
    """The LMMChunk under Megatron's DDP and Float16Module wrappers."""
    from ..models.lmm import LMMChunk

    while not isinstance(module, LMMChunk) and hasattr(module, "module"):
        module = module.module
    return module


def checkpoint_dir(load_dir: str) -> tuple[str, int, bool]:
    """(iter_N or release directory, iteration, release) of a Megatron checkpoint."""
    tracker = os.path.join(load_dir, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        raise FlagError(f"--load {load_dir}: no latest_checkpointed_iteration.txt")
    text = open(tracker).read().strip()
    if text == "release":
        return os.path.join(load_dir, "release"), 0, True
    iteration = int(text)
    return os.path.join(load_dir, f"iter_{iteration:07d}"), iteration, False


def rank_files(directory: str, tp_rank: int) -> dict[int, str]:
    """{saving pipeline rank: file} of tensor-parallel rank tp_rank."""
    single = os.path.join(directory, f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
    if os.path.isfile(single):
        return {0: single}
    found = {}
    for path in glob.glob(os.path.join(directory, f"mp_rank_{tp_rank:02d}_*",
                                       "model_optim_rng.pt")):
        found[int(os.path.basename(os.path.dirname(path)).rsplit("_", 1)[1])] = path
    if not found:
        raise FlagError(f"--load: {directory} has no torch-format files of tensor-parallel "
                        f"rank {tp_rank} (Megatron's --ckpt-format torch)")
    return found


def same_layout(saved_args: Any, args: Any) -> bool:
    """The checkpoint was saved under --pipeweaver with this run's layout."""
    return (getattr(saved_args, "pipeweaver", False)
            and getattr(saved_args, "pipeweaver_layout", None) == getattr(
                args, "pipeweaver_layout", None)
            and saved_args.tensor_model_parallel_size == args.tensor_model_parallel_size)


def global_chunks(files: dict[int, str], recipe: Any) -> tuple[dict[int, list[dict]],
                                                               dict[int, dict]]:
    """Every saving pipeline rank's chunks (model, or model0, model1, ...), each its
    tensors under global layer names in the saved order, and every rank's whole state
    dict (args, iteration, optimizer, scheduler). A --pipeweaver checkpoint's names are
    global already."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    chunks: dict[int, list[dict]] = {}
    states: dict[int, dict] = {}
    for pp_rank, path in sorted(files.items()):
        state = states[pp_rank] = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["args"]
        chunks[pp_rank] = []
        keys = sorted(k for k in state if re.fullmatch(r"model\d*", k))
        for key in keys:
            vp_stage = int(key[5:]) if key[5:] else None
            config = copy.copy(recipe.language_config)
            config.pipeline_model_parallel_size = saved.pipeline_model_parallel_size
            config.virtual_pipeline_model_parallel_size = \
                saved.virtual_pipeline_model_parallel_size
            offset = 0 if getattr(saved, "pipeweaver", False) else \
                get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
            tensors: dict[str, torch.Tensor] = {}
            for name, tensor in state[key].items():
                if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
                    continue
                tensors[global_name(name, offset)] = tensor
            chunks[pp_rank].append(tensors)
    return chunks, states


def global_tensors(files: dict[int, str], recipe: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Every model tensor of the saving run under global layer names, and one file's
    whole state dict (args, iteration, scheduler)."""
    chunks, states = global_chunks(files, recipe)
    return {name: tensor for rank in chunks.values() for chunk in rank
            for name, tensor in chunk.items()}, states[min(states)]


def load_other_layout(model: list, optimizer: Any, scheduler: Any, args: Any, tp_rank: int,
                      recipe: Any) -> tuple[int, float]:
    """Load a checkpoint of another layout into this rank's chunks (module docstring);
    returns (iteration, floating point operations so far) as load_checkpoint does."""
    directory, iteration, release = checkpoint_dir(args.load)
    fresh_optimizer = args.finetune or release or args.no_load_optim
    chunks, states = global_chunks(rank_files(directory, tp_rank), recipe)
    state = states[min(states)]
    if optimizer is not None and not fresh_optimizer:
        check_optimizer_mappable(state["args"], args)
    tensors = {name: tensor for rank in chunks.values() for chunk in rank
               for name, tensor in chunk.items()}
    for wrapped in model:
        chunk = unwrap(wrapped)
        with torch.no_grad():
            for name, tensor in chunk.state_dict(keep_vars=True).items():
                if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
                    continue
                if name not in tensors:
                    raise FlagError(f"--load {args.load}: the checkpoint has no tensor "
                                    f"{name!r} for chunk {chunk.describe()}")
                source = tensors[name]
                if source.shape != tensor.shape:
                    raise FlagError(f"--load {args.load}: {name} is {tuple(source.shape)} in "
                                    f"the checkpoint, {tuple(tensor.shape)} here")
                tensor.copy_(source)
    if optimizer is not None and not fresh_optimizer:
        named = named_optimizer_state(chunks, states, f"--load {args.load}")
        load_optimizer_by_name(optimizer, model, named, tensors, f"--load {args.load}")
    elif optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()
    if args.finetune or release:
        return 0, 0
    saved = state["args"]
    args.consumed_train_samples = getattr(saved, "consumed_train_samples", 0)
    args.skipped_train_samples = getattr(saved, "skipped_train_samples", 0)
    args.consumed_valid_samples = getattr(saved, "consumed_valid_samples", 0)
    from megatron.core.num_microbatches_calculator import update_num_microbatches

    update_num_microbatches(consumed_samples=args.consumed_train_samples, verbose=True)
    if scheduler is not None and "opt_param_scheduler" in state:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    return iteration, state.get("num_floating_point_operations_so_far", 0)


def install_loader(run_of: Any) -> Any:
    """Replace megatron.training.training.load_checkpoint with one that reads another
    layout's checkpoint here and leaves this layout's to Megatron; returns a function
    that restores Megatron's."""
    from megatron.core import parallel_state
    from megatron.training import training

    original = training.load_checkpoint

    def load_checkpoint(model, optimizer, scheduler, *rest, **kwargs):
        from megatron.training import get_args

        args = get_args()
        if not args.load or args.ckpt_format != "torch":
            return original(model, optimizer, scheduler, *rest, **kwargs)
        tracker = os.path.join(args.load, "latest_checkpointed_iteration.txt")
        if not os.path.isfile(tracker):
            return original(model, optimizer, scheduler, *rest, **kwargs)
        directory, _, _ = checkpoint_dir(args.load)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        path = next(iter(rank_files(directory, tp_rank).values()))
        # Only the args are read: mmap leaves the tensors on disk.
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["args"]
        if same_layout(saved, args):
            return original(model, optimizer, scheduler, *rest, **kwargs)
        return load_other_layout(model, optimizer, scheduler, args, tp_rank, run_of().recipe)

    training.load_checkpoint = load_checkpoint
    return lambda: setattr(training, "load_checkpoint", original)


# -- The optimizer's state by parameter name ------------------------------------------
#
# Megatron's torch format stores the optimizer's state_dict() per (TP, PP) rank: torch's
# state keyed by integer ids that number the parameters of every group in order, the
# groups being megatron-core's _get_param_groups over the rank's model chunks (a
# ChainedOptimizer of one optimizer saves that one's; a bf16/fp16 one wraps it as
# {"optimizer", "grad_scaler", "fp32_from_fp16_params"}). The ids of a saved rank are
# recovered without its model: _get_param_groups runs on stand-in modules holding meta
# parameters under the saved names and shapes; this run's ids come from its optimizer.

EMBEDDING_OR_OUTPUT = re.compile(r"(^|\.)(embedding\.word_embeddings|output_layer)\.weight$")
"""The parameters LanguageModule.setup_embeddings_and_output_layer marks
is_embedding_or_output_parameter (the decoupled learning rate's)."""


@dataclass
class NamedOptimizerState:
    """A torch-format optimizer state with parameter names for ids: every parameter's
    state (exp_avg, exp_avg_sq, step), the fp32 main parameters of a bf16/fp16 run, each
    group's settings by its group key, and the grad scaler's state."""

    state: dict[str, dict] = field(default_factory=dict)
    main: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[tuple, dict] = field(default_factory=dict)
    grad_scaler: dict | None = None


def check_optimizer_mappable(saved_args: Any, args: Any) -> None:
    """Refuse the optimizer states that are not mapped by name (a FlagError says why)."""
    for flags, what in ((saved_args, "the checkpoint was saved"), (args, "this run uses")):
        if getattr(flags, "use_distributed_optimizer", False):
            raise FlagError(f"--load {args.load}: {what} with --use-distributed-optimizer, "
                            "whose state (distrib_optim.pt, shards of the data-parallel grad "
                            "buffers) is not mapped across pipeline layouts yet: pass "
                            "--no-load-optim (or --finetune)")
    if getattr(saved_args, "optimizer", "adam") not in ("adam", "sgd"):
        raise FlagError(f"--load {args.load}: --optimizer {saved_args.optimizer}: only adam "
                        "and sgd states are mapped across pipeline layouts: pass "
                        "--no-load-optim")


def group_key(group: dict) -> tuple:
    """A parameter group's identity as megatron-core matches groups on loading."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group[key] for key in param_group_identifier_keys)


def optimizer_config(args: Any) -> tuple[Any, Any]:
    """The OptimizerConfig and group overrides a Megatron run with these args builds
    (megatron.training's get_megatron_optimizer_config, from megatron-core's parts)."""
    from megatron.core.optimizer import (AdamOptimizerConfig, SGDOptimizerConfig,
                                         get_standard_config_overrides)

    kind = {"adam": AdamOptimizerConfig, "sgd": SGDOptimizerConfig}[
        getattr(args, "optimizer", "adam")]
    config = kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind)
                     if hasattr(args, f.name)})
    return config, get_standard_config_overrides(config=config)


def _frozen(name: str, args: Any) -> bool:
    """pretrain_vlm.py's model.freeze(--freeze-LM, --freeze-ViT): no optimizer state."""
    return ((getattr(args, "freeze_LM", False) and name.startswith("language_model."))
            or (getattr(args, "freeze_ViT", False) and name.startswith("vision_model.")))


def _stand_in(tensors: dict[str, torch.Tensor], args: Any) -> torch.nn.Module:
    """A module whose parameters are meta tensors of these names and shapes, in order."""
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        param = torch.nn.Parameter(torch.empty(tensor.shape, device="meta"),
                                   requires_grad=not _frozen(name, args))
        if EMBEDDING_OR_OUTPUT.search(name):
            param.is_embedding_or_output_parameter = True
        module.register_parameter(leaf, param)
    return root


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """torch.distributed for _get_param_groups (a one-process gloo group if none is up)."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                         rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def group_names(ranks: list[list[dict[str, torch.Tensor]]], args: Any) -> list[dict]:
    """Megatron's optimizer groups of every rank of a run with these args, each rank's
    chunks given by their tensors (names and shapes): per rank {group key: parameter
    names in id order}, the keys in Megatron's group order (the union over all ranks,
    as _get_param_groups gathers them; a group may be empty on a rank). Under
    torch.distributed every process must call it alike (_get_param_groups gathers)."""
    from megatron.core.optimizer import _get_param_groups

    modules, owner = [], {}
    for rank, chunks in enumerate(ranks):
        for tensors in chunks:
            module = _stand_in(tensors, args)
            owner.update({id(p): (rank, n) for n, p in module.named_parameters()})
            modules.append(module)
    config, overrides = optimizer_config(args)
    with _process_group():
        groups = _get_param_groups(modules, config, overrides)
    result: list[dict] = [{} for _ in ranks]
    for group in groups:
        key = group_key(group)
        for names in result:
            names.setdefault(key, [])
        for param in group["params"]:
            rank, name = owner[id(param)]
            result[rank][key].append(name)
    return result


def _single(saved: Any, where: str) -> dict:
    """The one optimizer's state dict of a (ChainedOptimizer's) saved state."""
    if isinstance(saved, (list, tuple)):
        if len(saved) != 1:
            raise FlagError(f"{where}: the checkpoint holds {len(saved)} chained optimizers "
                            "(expert parameters or --overlap-param-gather-with-optimizer-"
                            "step); only one is mapped across layouts: pass --no-load-optim")
        saved = saved[0]
    return saved


def named_optimizer_state(chunks: dict[int, list[dict]], states: dict[int, dict],
                          where: str) -> NamedOptimizerState:
    """The saving run's optimizer state of every rank (global_chunks' chunks and
    states) by parameter name."""
    ranks = sorted(chunks)
    if any("optimizer" not in states[r] for r in ranks):
        raise FlagError(f"{where}: the checkpoint has no optimizer state (saved with "
                        "--no-save-optim?): pass --no-load-optim")
    saved_args = states[ranks[0]]["args"]
    names = group_names([chunks[r] for r in ranks], saved_args)
    named = NamedOptimizerState()
    for rank, by_key in zip(ranks, names):
        saved = _single(states[rank]["optimizer"], where)
        inner, main = saved, None
        if "optimizer" in saved:  # Float16OptimizerWithFloat16Params
            inner, main = saved["optimizer"], saved.get("fp32_from_fp16_params")
            named.grad_scaler = saved.get("grad_scaler")
        for index, group in enumerate(inner["param_groups"]):
            key = group_key(group)
            params, own = group["params"], by_key.get(key, [])
            if len(own) != len(params):
                raise FlagError(f"{where}: pipeline rank {rank}'s optimizer group {key} has "
                                f"{len(params)} parameters; megatron-core's grouping of its "
                                f"model gives {len(own)} (frozen modules?)")
            named.groups[key] = {k: v for k, v in group.items() if k != "params"}
            for param_id, name in zip(params, own):
                if param_id in inner["state"]:
                    named.state[name] = inner["state"][param_id]
            if main is not None:
                if len(main[index]) != len(own):
                    raise FlagError(f"{where}: pipeline rank {rank}'s group {key} has "
                                    f"{len(main[index])} fp32 main parameters for "
                                    f"{len(own)} parameters")
                named.main.update(zip(own, main[index]))
    return named


def megatron_optimizer_state(named: NamedOptimizerState, groups: list[tuple[tuple, list[str]]],
                             mixed: bool, tensors: dict[str, torch.Tensor],
                             where: str) -> dict:
    """The state_dict a Megatron optimizer whose groups hold these names (in id order)
    saves and loads, from the named state; mixed: a bf16/fp16 optimizer's, whose main
    parameters come from the named state, else from the checkpoint's weights."""
    state, param_groups, main, next_id = {}, [], [], 0
    for key, names in groups:
        if key not in named.groups:
            raise FlagError(f"{where}: the checkpoint's optimizer has no group {key}")
        ids = list(range(next_id, next_id + len(names)))
        next_id += len(names)
        param_groups.append({**named.groups[key], "params": ids})
        for param_id, name in zip(ids, names):
            if name in named.state:
                state[param_id] = named.state[name]
        main.append([named.main[n] if n in named.main else tensors[n].float() for n in names])
    inner = {"state": state, "param_groups": param_groups}
    if not mixed:
        return inner
    out = {"optimizer": inner, "fp32_from_fp16_params": main}
    if named.grad_scaler is not None:
        out["grad_scaler"] = named.grad_scaler
    return out


def load_optimizer_by_name(optimizer: Any, model: list, named: NamedOptimizerState,
                           tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load the named state into this run's Megatron optimizer (its ids from its own
    groups; tensors: the checkpoint's weights, for main parameters it lacks)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) != 1:
        raise FlagError(f"{where}: this run has {len(chained)} chained optimizers; only one "
                        "is mapped across layouts: pass --no-load-optim")
    inner = chained[0]
    names: dict[int, str] = {}
    for wrapped in model:
        for name, param in unwrap(wrapped).named_parameters():
            names[id(param)] = name
            if getattr(param, "main_param", None) is not None:
                names[id(param.main_param)] = name
    groups = [(group_key(g), [names[id(p)] for p in g["params"]])
              for g in inner.optimizer.param_groups]
    mixed = hasattr(inner, "fp32_from_float16_groups")
    if mixed and any(len(f) != len(g[1]) for f, g in zip(inner.float16_groups, groups)):
        raise FlagError(f"{where}: this run's bf16/fp16 optimizer keeps fp32 parameters "
                        "of its own, which are not mapped yet: pass --no-load-optim")
    optimizer.load_state_dict(megatron_optimizer_state(named, groups, mixed, tensors, where))
