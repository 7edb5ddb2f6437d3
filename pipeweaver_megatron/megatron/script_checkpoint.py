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
  The optimizer's state cannot be mapped across layouts yet: such a load needs
  --no-load-optim or --finetune (an error says so); the main parameters of a bf16/fp16
  optimizer are refreshed from the loaded weights, as Megatron does then.
"""

from __future__ import annotations

import copy
import glob
import os
import re
from typing import Any

import torch

from .model_args import FlagError

LAYER_NAME = re.compile(r"^(vision_model|language_model)\.decoder\.layers\.(\d+)\.(.*)$")
"""A transformer layer's tensor in LLaVAModel: (module, layer index, the rest)."""


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


def global_tensors(files: dict[int, str], recipe: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Every model tensor of the saving run under global layer names, and one file's
    whole state dict (args, iteration, scheduler)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tensors: dict[str, torch.Tensor] = {}
    first: dict = {}
    for pp_rank, path in sorted(files.items()):
        state = torch.load(path, map_location="cpu", weights_only=False)
        first = first or state
        saved = state["args"]
        keys = sorted(k for k in state if re.fullmatch(r"model\d*", k))
        for key in keys:
            vp_stage = int(key[5:]) if key[5:] else None
            config = copy.copy(recipe.language_config)
            config.pipeline_model_parallel_size = saved.pipeline_model_parallel_size
            config.virtual_pipeline_model_parallel_size = \
                saved.virtual_pipeline_model_parallel_size
            offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
            for name, tensor in state[key].items():
                if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
                    continue
                match = LAYER_NAME.match(name)
                if match and match.group(1) == "language_model":
                    name = (f"language_model.decoder.layers."
                            f"{int(match.group(2)) + offset}.{match.group(3)}")
                tensors[name] = tensor
    return tensors, first


def load_other_layout(model: list, optimizer: Any, scheduler: Any, args: Any, tp_rank: int,
                      recipe: Any) -> tuple[int, float]:
    """Load a checkpoint of another layout into this rank's chunks (module docstring);
    returns (iteration, floating point operations so far) as load_checkpoint does."""
    directory, iteration, release = checkpoint_dir(args.load)
    fresh_optimizer = args.finetune or release or args.no_load_optim
    if not fresh_optimizer:
        raise FlagError(f"--load {args.load}: the checkpoint has another pipeline layout; "
                        "--pipeweaver maps its weights, iteration and scheduler but not yet "
                        "its optimizer state: pass --no-load-optim (or --finetune)")
    tensors, state = global_tensors(rank_files(directory, tp_rank), recipe)
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
    if optimizer is not None and (args.fp16 or args.bf16):
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
