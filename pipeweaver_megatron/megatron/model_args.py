"""The ModelSpec of the model a Megatron-LM script's own flags describe.

Under --pipeweaver, pretrain_vlm.py trains the LLaVA its flags build (megatron-core's
LLaVAModel: a CLIP ViT, an MLP projector and a GPT language model) and pretrain_gpt.py
its GPT. The planner and SEMU price that model, so this module reads the same flags
pretrain_vlm.py's model_provider reads:

- vision_model (CLIP ViT): --encoder-num-layers layers of the language config's widths
  (pretrain_vlm.py deep-copies the language TransformerConfig for the ViT), one
  --img-h x --img-w tile per image cut into --patch-dim patches plus one class token,
  dropped before the projector under --disable-vision-class-token;
- vision_projection (MLP): the ViT's hidden size in, --ffn-hidden-size inside, the LM's
  hidden size out;
- language_model (GPT): --decoder-num-layers (else --num-layers), --hidden-size,
  --ffn-hidden-size, --num-attention-heads, --num-query-groups under
  --group-query-attention, --swiglu and the tokenizer's padded vocabulary; its output
  layer is untied (LLaVAModel's default, which pretrain_vlm.py keeps); pretrain_gpt.py's
  follows --untie-embeddings-and-output-weights.

A microbatch is --micro-batch-size (1) sequence of the LM's --decoder-seq-length tokens
(pretrain_vlm.py sets it to the text length plus the image tokens) with one tile per
sample; --global-batch-size microbatches per iteration. Module names are those of
LLaVAModel's submodules, so parameter names follow megatron-core's.

--pipeweaver-model-config given as well must describe the same model: every field the
flags fix is compared and a contradiction names both values (check_agrees).

Pure Python (argparse namespaces in, specs out): no torch, no megatron.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ..config import ImageRule, ModelSpec, ModuleKind, ModuleSpec, ParallelSpec

VISION, PROJECTION, LANGUAGE = "vision_model", "vision_projection", "language_model"
CLASS_TOKEN_LEN = 1
"""pretrain_vlm.py's class_token_len (get_num_image_embeddings(..., class_token_len=1))."""


class FlagError(ValueError):
    """The script's flags describe a model --pipeweaver cannot derive (the message says
    which flag and why)."""


def is_vlm(args: argparse.Namespace) -> bool:
    """The flags are pretrain_vlm.py's (its add_vlm_extra_args adds
    --disable-vision-class-token)."""
    return hasattr(args, "disable_vision_class_token")


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [_flag(n) for n in names if getattr(args, n, None) is None]
    if missing:
        raise FlagError(f"--pipeweaver derives the model from the script's flags: pass "
                        f"{', '.join(missing)}")


def language_module(args: argparse.Namespace) -> ModuleSpec:
    """The GPT language model of the flags (pretrain_gpt.py's, or LLaVA's decoder)."""
    _require(args, "hidden_size", "num_attention_heads")
    layers = _get(args, "decoder_num_layers") or _get(args, "num_layers")
    if not layers:
        raise FlagError("--pipeweaver derives the model from the script's flags: pass "
                        "--num-layers or --decoder-num-layers")
    vocab = _get(args, "padded_vocab_size") or _get(args, "vocab_size")
    if not vocab:
        raise FlagError("--pipeweaver needs the vocabulary: Megatron's tokenizer sets "
                        "padded_vocab_size (or pass --vocab-size)")
    groups = _get(args, "num_query_groups", 0) if _get(args, "group_query_attention", False) else 0
    return ModuleSpec(
        name=LANGUAGE, kind=ModuleKind.LANGUAGE_MODEL, num_layers=layers,
        hidden_size=args.hidden_size, ffn_hidden_size=_ffn(args),
        num_attention_heads=args.num_attention_heads, num_query_groups=groups,
        gated_mlp=bool(_get(args, "swiglu", False)), vocab_size=vocab,
        untie_embeddings=bool(_get(args, "untie_embeddings_and_output_weights", False)))


def _ffn(args: argparse.Namespace) -> int:
    """--ffn-hidden-size, or the default Megatron's validate_args sets later (4 h; with
    SwiGLU 8/3 h rounded down to a multiple of 64)."""
    given = _get(args, "ffn_hidden_size")
    if given:
        return given
    if _get(args, "swiglu", False):
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64
    return 4 * args.hidden_size


def llava_modules(args: argparse.Namespace) -> tuple[ModuleSpec, ...]:
    """pretrain_vlm.py's CLIP ViT, MLP projector and GPT (see the module docstring)."""
    _require(args, "encoder_num_layers", "img_h", "img_w", "patch_dim")
    # LLaVAModel's share_embeddings_and_output_weights defaults to False and
    # pretrain_vlm.py does not pass it: its LM has an output layer of its own whatever
    # --untie-embeddings-and-output-weights says.
    lm = dataclasses.replace(language_module(args), untie_embeddings=True)
    rule = ImageRule(patch_size=args.patch_dim, merge_size=1, image_size=args.img_h,
                     fixed_height=args.img_h, fixed_width=args.img_w,
                     class_tokens=CLASS_TOKEN_LEN,
                     drop_class_tokens=bool(args.disable_vision_class_token))
    vision = dataclasses.replace(lm, name=VISION, kind=ModuleKind.VISION_ENCODER,
                                 num_layers=args.encoder_num_layers, vocab_size=0,
                                 untie_embeddings=True, image=rule)
    projection = ModuleSpec(name=PROJECTION, kind=ModuleKind.PROJECTOR, num_layers=1,
                            input_size=vision.hidden_size, ffn_hidden_size=lm.ffn_hidden_size,
                            hidden_size=lm.hidden_size)
    return vision, projection, lm


def data_parallel_size(args: argparse.Namespace) -> int:
    """Data-parallel replicas of the launch. Megatron sets world_size and
    data_parallel_size after its parser ran; the launcher's WORLD_SIZE (or Slurm's task
    count) is there from the start."""
    model_parallel = (_get(args, "tensor_model_parallel_size", 1)
                      * _get(args, "pipeline_model_parallel_size", 1)
                      * _get(args, "context_parallel_size", 1))
    world = _get(args, "world_size") or int(os.environ.get(
        "WORLD_SIZE", os.environ.get("SLURM_NTASKS", model_parallel)))
    return max(1, world // model_parallel)


def parallel_from_args(args: argparse.Namespace) -> ParallelSpec:
    """Megatron's parallel and batch flags as a ParallelSpec."""
    tp = _get(args, "tensor_model_parallel_size", 1)
    pp = _get(args, "pipeline_model_parallel_size", 1)
    dp = _get(args, "data_parallel_size") or data_parallel_size(args)
    tokens = _get(args, "decoder_seq_length") or _get(args, "seq_length")
    if not tokens:
        raise FlagError("--pipeweaver needs the LM sequence length: pass --seq-length")
    return ParallelSpec(
        tp=tp, pp=pp, dp=dp, vp=_get(args, "virtual_pipeline_model_parallel_size", 1),
        sequence_parallel=bool(_get(args, "sequence_parallel", False)),
        microbatch_tokens=tokens * _get(args, "micro_batch_size", 1),
        max_images_per_microbatch=_get(args, "micro_batch_size", 1),
        global_batch_size=_get(args, "global_batch_size", dp))


def spec_from_args(args: argparse.Namespace, *, hardware: str = "H800") -> ModelSpec:
    """The ModelSpec of the model the script's flags build (pretrain_vlm.py: LLaVA;
    otherwise pretrain_gpt.py's GPT). hardware: the SEMU profile
    (--pipeweaver-hardware wins)."""
    if is_vlm(args):
        modules = llava_modules(args)
        topology = ((VISION, PROJECTION), (PROJECTION, LANGUAGE))
        name, dataset = "megatron-llava", "laion2b"
    else:
        modules, topology, name, dataset = (language_module(args),), (), "megatron-gpt", "obelics"
    return ModelSpec(name=name, description="the model of the Megatron-LM script's flags",
                     modules=modules, topology=topology, parallel=parallel_from_args(args),
                     hardware=_get(args, "pipeweaver_hardware") or hardware, dataset=dataset,
                     source="Megatron-LM flags")


_COMPARED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "query_groups", "gated_mlp", "vocab_size", "untie_embeddings")


PLANNING_VOCAB = 32000
"""The vocabulary the planner prices when the flags leave it to the tokenizer (no
--vocab-size): the layout is cut before Megatron builds its tokenizer."""


def planning_spec(args: argparse.Namespace, *, hardware: str = "H800") -> ModelSpec:
    """The spec the planner and SEMU use for the script's model, from the flags alone,
    so that it is the same when the parser cuts the layout (virtual_stages) and when the
    run starts: the vocabulary is --vocab-size (PLANNING_VOCAB without it; the
    tokenizer's padding moves the embedding's cost by a few rows), and pretrain_vlm.py's
    LM sequence is --dataloader-seq-length (else --seq-length) plus the image tokens of
    every sample's tile, plus the padding megatron-core's context_parallel.get_padding
    adds for --sequence-parallel, which is what its model_provider sets
    --decoder-seq-length to (the run checks that it did)."""
    fixed = argparse.Namespace(**vars(args))
    fixed.padded_vocab_size = _get(args, "vocab_size") or PLANNING_VOCAB
    if is_vlm(args):
        rule = llava_modules(fixed)[0].image
        text = _get(args, "dataloader_seq_length") or _get(args, "seq_length")
        if not text:
            raise FlagError("--pipeweaver needs the text length: pass --seq-length")
        tokens = text + rule.lm_tokens(rule.fixed_height, rule.fixed_width)
        fixed.decoder_seq_length = tokens + _vlm_padding(args, tokens)
    return spec_from_args(fixed, hardware=hardware)


def _vlm_padding(args: argparse.Namespace, tokens: int) -> int:
    """The padding pretrain_vlm.py's model_provider adds to the LM sequence length
    (megatron-core's get_padding: to a multiple of TP under --sequence-parallel)."""
    sequence_parallel = bool(_get(args, "sequence_parallel", False))
    if not (sequence_parallel or _get(args, "context_parallel_size", 1) > 1):
        return 0
    from megatron.core.models.multimodal.context_parallel import get_padding

    return get_padding(tokens, _get(args, "context_parallel_size", 1),
                       _get(args, "tensor_model_parallel_size", 1), sequence_parallel,
                       bool(_get(args, "decoder_tp_comm_overlap", False)),
                       _get(args, "decoder_seq_length"))


def check_agrees(config: ModelSpec, derived: ModelSpec, config_name: str) -> None:
    """Raise FlagError naming both values where --pipeweaver-model-config (config)
    contradicts the model of the script's flags (derived); modules pair by kind."""
    problems = []
    for module in derived.modules:
        theirs = config.modules_of(module.kind)
        if len(theirs) != 1:
            problems.append(f"the flags build one {module.kind.value} ({module.name}), "
                            f"{config_name} has {len(theirs)}")
            continue
        other = theirs[0]
        for key in _COMPARED if module.is_transformer else ("hidden_size", "input_size"):
            ours, yours = getattr(module, key), getattr(other, key)
            if ours != yours:
                problems.append(f"{other.name}.{key} is {yours} in {config_name}, "
                                f"{ours} from the script's flags")
    extra = {m.kind for m in config.modules} - {m.kind for m in derived.modules}
    problems += [f"{config_name} has a {kind.value} the script's flags do not build"
                 for kind in sorted(extra, key=lambda k: k.value)]
    if problems:
        raise FlagError("--pipeweaver-model-config contradicts the script's flags: "
                        + "; ".join(problems))
