"""A --pipeweaver checkpoint of Megatron-LM's pretrain_vlm.py as the checkpoint the same
script loads without --pipeweaver (torch format, any PP).

`pipeweaver checkpoint convert --from pipeweaver --to megatron --load DIR --save OUT
--pipeline-model-parallel-size P`: DIR was saved by pretrain_vlm.py under --pipeweaver
(Megatron's own torch format: per (TP, PP) rank the chunks as model0, model1, ...,
LLaVAModel's names with global layer indices). OUT gets iter_N/mp_rank_TT[_PPP] files of
LLaVAModel at PP P as Megatron builds it: the vision model, the projector and the
embedding on the first stage, the final norm and the output layer on the last, the LM's
layers split as megatron-core's get_num_layers_to_build / get_transformer_layer_offset
split them (--decoder-first/last-pipeline-num-layers included) and numbered locally, each
stage's tensors in LLaVAModel's order (llava_order); the args say PP P and no
--pipeweaver; the iteration, the scheduler and the RNG states are carried, and so is the
optimizer's state, by parameter name (script_checkpoint.py's named_optimizer_state): each
stage's ids number its parameters in the groups megatron-core's _get_param_groups makes
of that stage, so the script loads OUT without --no-load-optim. A checkpoint of the
distributed optimizer (--use-distributed-optimizer) converts without its optimizer
state (LmConvertResult.optimizer False; load it with --no-load-optim). The other
direction needs no conversion: a --pipeweaver run --load-s the script's own checkpoints
at any PP, optimizer included (script_checkpoint.py).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch

from .model_args import FlagError
from .script_checkpoint import (LAYER_NAME, checkpoint_dir, group_names,
                                megatron_optimizer_state, named_optimizer_state, rank_files)


@dataclass(frozen=True)
class LmConvertResult:
    """What convert_to_megatron wrote: the iteration, the rank files, the tensors moved
    and whether the optimizer's state went with them (not for the distributed one)."""

    iteration: int
    files: tuple[str, ...]
    tensors: int
    optimizer: bool


def is_megatron_lm_checkpoint(path: str) -> bool:
    """A Megatron-LM checkpoint directory (it has Megatron's tracker file)."""
    return os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt"))


def _tp_ranks(directory: str) -> list[int]:
    ranks = set()
    for name in os.listdir(directory):
        match = re.match(r"mp_rank_(\d+)", name)
        if match:
            ranks.add(int(match.group(1)))
    if not ranks:
        raise FlagError(f"{directory}: no mp_rank_* folders (Megatron's torch format)")
    return sorted(ranks)


def stage_layers(saved_args, pp: int) -> list[tuple[int, int]]:
    """(first global LM layer, count) of every pipeline stage of Megatron at PP pp."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layers = saved_args.decoder_num_layers or saved_args.num_layers
    config = TransformerConfig(
        num_layers=layers, hidden_size=saved_args.hidden_size,
        num_attention_heads=saved_args.num_attention_heads, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        num_layers_in_first_pipeline_stage=getattr(saved_args,
                                                   "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(saved_args,
                                                  "decoder_last_pipeline_num_layers", None))
    return [(get_transformer_layer_offset(config, vp_stage=None, pp_rank=p),
             get_num_layers_to_build(config, vp_stage=None, pp_rank=p)) for p in range(pp)]


def _stage_of(name: str, stages: list[tuple[int, int]]) -> tuple[int, str]:
    """(pipeline stage, local name) of a LLaVAModel tensor at Megatron's placement."""
    match = LAYER_NAME.match(name)
    if match and match.group(1) == "language_model":
        index = int(match.group(2))
        for p, (first, count) in enumerate(stages):
            if first <= index < first + count:
                return p, f"language_model.decoder.layers.{index - first}.{match.group(3)}"
        raise FlagError(f"{name}: layer {index} is on no stage of the target pipeline")
    if name.startswith(("language_model.decoder.final_layernorm", "language_model.output_layer")):
        return len(stages) - 1, name
    return 0, name  # vision_model, vision_projection, language_model.embedding


LLAVA_MODULES = ("language_model", "vision_model", "vision_projection")
"""LLaVAModel's modules in the order its __init__ registers them (its named_parameters'
and state_dict's order)."""

AFTER_LAYERS = ("decoder.final_layernorm.", "output_layer.", "ln_post.")
"""Tensors of a LLaVAModel module that follow its transformer layers."""


def llava_order(name: str) -> tuple[int, int, int]:
    """A sort key that puts LLaVAModel's tensors (global names) in its own order when
    the ties keep the chunks' order (each chunk's tensors are in LLaVAModel's order):
    by module, then what precedes the layers, the layers by index, what follows."""
    top, rest = name.split(".", 1)
    module = LLAVA_MODULES.index(top) if top in LLAVA_MODULES else len(LLAVA_MODULES)
    match = LAYER_NAME.match(name)
    if match:
        return module, 1, int(match.group(2))
    return module, 2 if rest.startswith(AFTER_LAYERS) else 0, 0


def convert_to_megatron(load: str, save: str, pp: int) -> LmConvertResult:
    """Write the PP-pp Megatron checkpoint of a --pipeweaver one (module docstring)."""
    directory, iteration, release = checkpoint_dir(load)
    written, total, with_optimizer = [], 0, True
    for tp_rank in _tp_ranks(directory):
        states = {p: torch.load(path, map_location="cpu", weights_only=False)
                  for p, path in rank_files(directory, tp_rank).items()}
        first = states[min(states)]
        saved = first["args"]
        if not getattr(saved, "pipeweaver", False):
            raise FlagError(f"--load {load}: not saved under --pipeweaver (Megatron's own "
                            "checkpoint: a --pipeweaver run loads it as it is)")
        stages = stage_layers(saved, pp)
        # The saved ranks' chunks (global names, as LMMChunk names them) and every
        # tensor (extra states included) in LLaVAModel's order.
        chunks = {p: [{n: t for n, t in state[key].items() if isinstance(t, torch.Tensor)
                       and not n.endswith("_extra_state")}
                      for key in sorted(k for k in state if re.fullmatch(r"model\d*", k))]
                  for p, state in sorted(states.items())}
        values = [(name, value) for p, state in sorted(states.items())
                  for key in sorted(k for k in state if re.fullmatch(r"model\d*", k))
                  for name, value in state[key].items()]
        values.sort(key=lambda item: llava_order(item[0]))
        models: list[dict] = [{} for _ in range(pp)]
        params: list[dict[str, torch.Tensor]] = [{} for _ in range(pp)]
        for name, value in values:
            p, local = _stage_of(name, stages)
            models[p][local] = value
            total += isinstance(value, torch.Tensor)
            if isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
                params[p][name] = value
        optimizers = _target_optimizers(chunks, states, params, saved, f"--load {load}")
        with_optimizer = with_optimizer and optimizers is not None
        args = copy.copy(saved)
        args.pipeline_model_parallel_size = pp
        args.virtual_pipeline_model_parallel_size = None
        args.num_virtual_stages_per_pipeline_rank = None
        args.pipeweaver = False
        for p in range(pp):
            source = states.get(p, first)
            out = {"args": args, "checkpoint_version": first.get("checkpoint_version", 3.0),
                   "iteration": iteration, "model": models[p],
                   "num_floating_point_operations_so_far":
                       first.get("num_floating_point_operations_so_far", 0)}
            if optimizers is not None:
                out["optimizer"] = optimizers[p]
            for key in ("opt_param_scheduler", "rng_state"):
                if key in source:
                    out[key] = source[key]
            rank_dir = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{p:03d}"
            folder = os.path.join(save, "release" if release else f"iter_{iteration:07d}",
                                  rank_dir)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "model_optim_rng.pt")
            torch.save(out, path)
            written.append(path)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as tracker:
        tracker.write("release" if release else str(iteration))
    return LmConvertResult(iteration, tuple(written), total, with_optimizer)


def _target_optimizers(chunks: dict[int, list[dict]], states: dict[int, dict],
                       params: list[dict[str, torch.Tensor]], saved, where: str
                       ) -> list[dict] | None:
    """The optimizer state_dict of every target stage (its parameters by global name),
    moved by name from the saved ranks'; None when the checkpoint has none that maps
    (no optimizer saved, or the distributed optimizer's)."""
    if saved.use_distributed_optimizer or any("optimizer" not in s for s in states.values()):
        return None
    named = named_optimizer_state(chunks, states, where)
    tensors = {name: t for stage in params for name, t in stage.items()}
    mixed = bool(saved.bf16 or saved.fp16)
    return [megatron_optimizer_state(named, list(by_key.items()), mixed, tensors, where)
            for by_key in group_names([[stage] for stage in params], saved)]
