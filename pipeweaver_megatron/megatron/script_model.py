"""The user's model: what the script's own model_provider builds, as a LlavaRecipe (or,
for pretrain_gpt.py, a GptRecipe: script_gpt.py).

pretrain_vlm.py's model_provider derives three TransformerConfigs, the layer specs and
the sequence lengths from Megatron's flags (and sets args.decoder_seq_length,
args.dataloader_seq_length and args.max_position_embeddings, which its dataset provider
reads), then builds megatron-core's LLaVAModel and freezes what --freeze-LM /
--freeze-ViT say. capture_llava runs that provider once with the LLaVAModel name of the
script's module bound to a recorder, so PipeWeaver's chunks are built from exactly the
arguments the script passes, whatever the user changed in their copy of the script; no
LLaVAModel (and no weight) is built for it. recipe_of turns the record into the
LlavaRecipe the chunk parts take (models/llava.py) and refuses, in one message, what the
parts do not implement.

ScriptKind is what the drop-in (user_run.py) needs of one kind of script model:
capture, recipe, the check against the planned spec, the microbatch conversion, the
chunks and what the script's data reading needs for the run. LLAVA is this module's,
script_gpt.GPT pretrain_gpt.py's; script_kind picks one from the script's provider.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ModelSpec, ModuleKind
from .model_args import FlagError

_UNSUPPORTED = {
    "pixel_shuffle": (False, "pixel shuffle"),
    "tile_tags": (None, "tile tags"),
    "max_num_tiles": (0, "tiling with max_num_tiles"),
    "share_embeddings_and_output_weights": (False, "tied input and output embeddings"),
    "hybrid_override_pattern": (None, "a hybrid (Mamba) language model"),
    "use_vision_backbone_fp8_arch": (False, "an FP8 vision backbone"),
    "allow_missing_vision_projection_checkpoint": (False, "a missing projector checkpoint"),
    "vision_projection_type": ("mlp", "a projector other than 'mlp'"),
    "fp16_lm_cross_entropy": (False, "--fp16-lm-cross-entropy"),
}
"""LLaVAModel arguments the chunk parts implement only at these values."""


@dataclass(frozen=True)
class ScriptModel:
    """The arguments of the script's LLaVAModel(...) (or GPTModel(...)) call and of its
    freeze(...)."""

    kwargs: dict[str, Any]
    freeze: dict[str, bool] = field(default_factory=dict)


def _globals(function: Callable[..., Any]) -> dict[str, Any]:
    """The module namespace a (possibly functools.partial) function runs in."""
    while hasattr(function, "func"):
        function = function.func
    return getattr(function, "__globals__", {})


@dataclass(frozen=True)
class ScriptKind:
    """What the drop-in needs of one kind of script model (see the module docstring)."""

    name: str
    capture: Callable[..., ScriptModel]
    """(the script's model_provider, **its call) -> the recorded model call."""
    recipe_of: Callable[[ScriptModel], Any]
    """The recipe the chunk parts take (refusing what they do not implement)."""
    check_built: Callable[[argparse.Namespace, ModelSpec, Any], None]
    """(args, the planned spec, recipe): FlagError where they disagree."""
    convert: Callable[[Any], Callable[[Any, int], Any]]
    """recipe -> (get_batch's result, index) -> MicrobatchData."""
    image_size: Callable[[ModelSpec], tuple[int, int]]
    """The (height, width) of every image of the planner's metadata."""
    build: Callable[..., Any]
    """(spec, layout, stage index, *, tp, recipe, seed) -> the stage's LMMChunk."""
    prepare: Callable[[dict[str, Any]], Callable[[], None]] = lambda names: (lambda: None)
    """The script's module namespace -> set up for the run; returns the undo."""


_NOT_SUPPORTED = ("--pipeweaver without --pipeweaver-model-config trains the script's own "
                  "model, which must be pretrain_vlm.py's LLaVA or pretrain_gpt.py's GPT "
                  "(megatron-core's LLaVAModel or GPTModel)")


def require_llava(model_provider: Callable[..., Any]) -> None:
    """The script's model_provider builds megatron-core's LLaVAModel (pretrain_vlm.py's)."""
    if "LLaVAModel" not in _globals(model_provider):
        raise FlagError(f"{_NOT_SUPPORTED}; this script builds no LLaVAModel: pass "
                        "--pipeweaver-model-config NAME to train a YAML model instead")


def script_kind(model_provider: Callable[..., Any]) -> ScriptKind:
    """The kind of model the script's model_provider builds: LLaVA where its module
    binds LLaVAModel, GPT where it (or a builder its partial binds) binds GPTModel."""
    from .script_gpt import GPT, builds_gpt

    if "LLaVAModel" in _globals(model_provider):
        return LLAVA
    if builds_gpt(model_provider):
        return GPT
    raise FlagError(f"{_NOT_SUPPORTED}; this script builds another: pass "
                    "--pipeweaver-model-config NAME to train a YAML model instead")


def record_call(model_provider: Callable[..., Any], namespaces: list[dict[str, Any]],
                name: str, **call: Any) -> dict[str, Any]:
    """Run the script's model_provider (with keyword arguments `call`) while `name`
    (LLaVAModel, GPTModel) is bound, in each of `namespaces`, to a recorder that builds
    nothing; returns {"kwargs": the call's arguments bound to the class's signature,
    "freeze": freeze()'s flags}, without "kwargs" if the class was never called."""
    signature = inspect.signature(namespaces[0][name].__init__)
    record: dict[str, Any] = {}

    class Recorder:
        """Stands in for the model class while the provider runs."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            record["kwargs"] = {k: v for k, v in bound.arguments.items() if k != "self"}

        def freeze(self, freeze_language_model: bool = False, freeze_vision_model: bool = False,
                   freeze_vision_projection: bool = False) -> None:
            record["freeze"] = {"language_model": freeze_language_model,
                                "vision_model": freeze_vision_model,
                                "vision_projection": freeze_vision_projection}

    saved = [(names, names[name]) for names in namespaces]
    for names, _ in saved:
        names[name] = Recorder
    try:
        model_provider(**call)
    finally:
        for names, value in saved:
            names[name] = value
    return record


def capture_llava(model_provider: Callable[..., Any], **call: Any) -> ScriptModel:
    """The arguments of the script's LLaVAModel(...) and freeze(...) calls."""
    require_llava(model_provider)
    record = record_call(model_provider, [_globals(model_provider)], "LLaVAModel", **call)
    if "kwargs" not in record:
        raise FlagError("--pipeweaver: the script's model_provider returned without "
                        "building LLaVAModel")
    return ScriptModel(record["kwargs"], record.get("freeze", {}))


def recipe_of(model: ScriptModel):
    """The LlavaRecipe of the script's LLaVAModel call (models/llava.py)."""
    from ..models.llava import LlavaRecipe

    kw = model.kwargs
    problems = [f"{what} ({name}={kw[name]!r})" for name, (ok, what) in _UNSUPPORTED.items()
                if name in kw and kw[name] != ok]
    if kw.get("hybrid_attention_ratio", 1.0) != 1.0 or kw.get("hybrid_mlp_ratio", 1.0) != 1.0:
        problems.append("hybrid attention or MLP ratios")
    if problems:
        raise FlagError("--pipeweaver cannot cut this LLaVA into chunks yet: "
                        + "; ".join(problems))
    return LlavaRecipe(
        language_config=kw["language_transformer_config"],
        vision_config=kw["vision_transformer_config"],
        projection_config=kw["vision_projection_config"],
        language_layer_spec=kw["language_transformer_layer_spec"],
        vision_layer_spec=kw["vision_transformer_layer_spec"],
        projection_submodules=kw["vision_projection_layer_spec"],
        vocab_size=kw["language_vocab_size"],
        max_sequence_length=kw["language_max_sequence_length"],
        img_h=kw["img_h"], img_w=kw["img_w"], patch_dim=kw["patch_dim"],
        drop_vision_class_token=kw["drop_vision_class_token"],
        position_embedding_type=kw["language_position_embedding_type"],
        rotary_percent=kw["language_rotary_percent"],
        rotary_base=kw["language_rotary_base"], rope_scaling=kw["language_rope_scaling"],
        rope_scaling_factor=kw["language_rope_scaling_factor"],
        image_token_index=kw["image_token_index"], parallel_output=kw["parallel_output"])


def check_built(args: argparse.Namespace, spec: ModelSpec, recipe: Any) -> None:
    """The spec the layout was cut with must describe the LLaVA the script built."""
    lm = spec.language_model
    vision = spec.modules_of(ModuleKind.VISION_ENCODER)[0]
    built = {"LM layers": (lm.num_layers, recipe.language_config.num_layers),
             "ViT layers": (vision.num_layers, recipe.vision_config.num_layers),
             "LM hidden size": (lm.hidden_size, recipe.language_config.hidden_size),
             "LM FFN size": (lm.ffn_hidden_size, recipe.language_config.ffn_hidden_size),
             "LM sequence": (spec.parallel.microbatch_tokens, args.decoder_seq_length),
             "data-parallel size": (spec.parallel.dp, args.data_parallel_size)}
    wrong = [f"{what} {planned} planned, {actual} built" for what, (planned, actual)
             in built.items() if planned != actual]
    if wrong:
        raise FlagError("--pipeweaver: the layout was cut for another model than the "
                        "script built: " + "; ".join(wrong))


def _convert(recipe: Any) -> Callable[[Any, int], Any]:
    from ..models.llava_data import llava_microbatch

    return lambda batch, index: llava_microbatch(batch, recipe, index)


def _image_size(spec: ModelSpec) -> tuple[int, int]:
    rule = spec.modules_of(ModuleKind.VISION_ENCODER)[0].image
    return rule.fixed_height, rule.fixed_width


def _build(spec: ModelSpec, layout: Any, stage: int, *, tp: int, recipe: Any, seed: int):
    from ..models import stage_chunk

    return stage_chunk(spec, layout, stage, tp=tp, recipe=recipe, seed=seed)


LLAVA = ScriptKind(name="pretrain_vlm.py's LLaVA", capture=capture_llava, recipe_of=recipe_of,
                   check_built=check_built, convert=_convert, image_size=_image_size,
                   build=_build)
"""How the drop-in trains pretrain_vlm.py's LLaVAModel."""
