"""The user's GPT: what pretrain_gpt.py's own model_provider builds, as a GptRecipe.

pretrain_gpt.py hands Megatron ``partial(model_provider, gpt_builder)``: model_provider
(model_provider.py) calls gpt_builder (gpt_builders.py), which derives the
TransformerConfig and the layer spec from Megatron's flags and calls megatron-core's
GPTModel. capture_gpt runs that provider once with the GPTModel name of every module it
runs in bound to a recorder, so PipeWeaver's chunks are built from exactly the arguments
the script passes, whatever the user changed in their copy; no GPTModel (and no
weight) is built for it. recipe_of turns the record into the GptRecipe the chunk parts
take (models/gpt.py) and refuses, in one message, what the parts do not implement.

pretrain_gpt.py reads its data only where GPTModel needs it: its get_batch returns
Nones on pipeline stages that are neither first nor last, and its dataset provider
builds datasets only there (both ask mtp_on_this_rank too). A PipeWeaver rank may hold
any stage and plans every microbatch, so read_everywhere binds the script's
mtp_on_this_rank to "yes" for the run: every rank builds the datasets and reads (and,
under TP, broadcasts) every tensor of every microbatch.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ..config import ModelSpec
from .model_args import FlagError
from .script_model import ScriptKind, ScriptModel, record_call

_UNSUPPORTED = {
    "share_embeddings_and_output_weights": (
        False, "tied input and output embeddings (pass --untie-embeddings-and-output-weights)"),
    "fp16_lm_cross_entropy": (False, "--fp16-lm-cross-entropy"),
    "seq_len_interpolation_factor": (None, "a RoPE sequence-length interpolation factor"),
}
"""GPTModel arguments the chunk parts implement only at these values."""
_CONFIG_UNSUPPORTED = {
    "num_moe_experts": (None, "mixture of experts (--num-experts)"),
    "multi_latent_attention": (False, "multi-latent attention"),
    "mtp_num_layers": (None, "multi-token prediction (--mtp-num-layers)"),
    "sequence_parallel": (False, "--sequence-parallel (the GPT chunks do not shard the "
                                 "sequence over TP yet)"),
}
"""TransformerConfig fields the chunk parts implement only at these values."""
_POSITIONS = ("learned_absolute", "rope", "none")


def _callables(function: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The function and every callable a functools.partial chain binds, innermost last."""
    found: list[Callable[..., Any]] = []
    while hasattr(function, "func"):
        found += [a for a in (*function.args, *function.keywords.values()) if callable(a)]
        function = function.func
    return [function, *found]


def gpt_namespaces(model_provider: Callable[..., Any]) -> list[dict[str, Any]]:
    """The module namespaces the provider and the builders its partial binds run in
    that bind the name GPTModel (pretrain_gpt.py: model_provider.py's, gpt_builders.py's)."""
    found: list[dict[str, Any]] = []
    for function in _callables(model_provider):
        names = getattr(function, "__globals__", None)
        if names is not None and getattr(names.get("GPTModel"), "__name__", None) == "GPTModel" \
                and all(names is not seen for seen in found):
            found.append(names)
    return found


def builds_gpt(model_provider: Callable[..., Any]) -> bool:
    """The script's model_provider builds megatron-core's GPTModel (pretrain_gpt.py's)."""
    return bool(gpt_namespaces(model_provider))


def capture_gpt(model_provider: Callable[..., Any], **call: Any) -> ScriptModel:
    """The arguments of the script's GPTModel(...) call (GPTModel is recorded in every
    module the provider runs in). call: the provider's keyword arguments."""
    spaces = gpt_namespaces(model_provider)
    if not spaces:
        raise FlagError("--pipeweaver: the script's model_provider does not build GPTModel")
    record = record_call(model_provider, spaces, "GPTModel", **call)
    if "kwargs" not in record:
        raise FlagError("--pipeweaver: the script's model_provider returned without building "
                        "megatron-core's GPTModel (--use-legacy-models is not supported)")
    return ScriptModel(record["kwargs"])


def recipe_of(model: ScriptModel):
    """The GptRecipe of the script's GPTModel call (models/gpt.py)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from ..models.gpt import GptRecipe

    kw = model.kwargs
    config = kw["config"]
    problems = [f"{what} ({name}={kw[name]!r})" for name, (ok, what) in _UNSUPPORTED.items()
                if name in kw and kw[name] != ok]
    problems += [f"{what} ({name}={getattr(config, name)!r})"
                 for name, (ok, what) in _CONFIG_UNSUPPORTED.items()
                 if getattr(config, name, ok) not in (ok, 0)]
    # GPTModel prefers the config's position embedding where the config has one.
    position = getattr(config, "position_embedding_type", kw["position_embedding_type"])
    if position not in _POSITIONS:
        problems.append(f"--position-embedding-type {position} (supported: "
                        f"{', '.join(_POSITIONS)})")
    spec = kw["transformer_layer_spec"]
    if isinstance(spec, TransformerBlockSubmodules) and len(spec.layer_specs) != config.num_layers:
        problems.append(f"a decoder block spec of {len(spec.layer_specs)} of the "
                        f"{config.num_layers} layers (one pipeline stage's)")
    if problems:
        raise FlagError("--pipeweaver cannot cut this GPT into chunks yet: " + "; ".join(problems))
    return GptRecipe(
        language_config=config, layer_spec=spec, vocab_size=kw["vocab_size"],
        max_sequence_length=kw["max_sequence_length"], position_embedding_type=position,
        rotary_percent=kw["rotary_percent"],
        rotary_base=getattr(config, "rotary_base", kw["rotary_base"]),
        rope_scaling=kw["rope_scaling"], rope_scaling_factor=kw["rope_scaling_factor"],
        parallel_output=kw["parallel_output"])


def check_built(args: argparse.Namespace, spec: ModelSpec, recipe: Any) -> None:
    """The spec the layout was cut with must describe the GPT the script built."""
    lm, config = spec.language_model, recipe.language_config
    built = {"layers": (lm.num_layers, config.num_layers),
             "hidden size": (lm.hidden_size, config.hidden_size),
             "FFN size": (lm.ffn_hidden_size, config.ffn_hidden_size),
             "attention heads": (lm.num_attention_heads, config.num_attention_heads),
             "sequence": (spec.parallel.microbatch_tokens, args.seq_length),
             "data-parallel size": (spec.parallel.dp, args.data_parallel_size)}
    wrong = [f"{what} {planned} planned, {actual} built" for what, (planned, actual)
             in built.items() if planned != actual]
    if wrong:
        raise FlagError("--pipeweaver: the layout was cut for another GPT than the script "
                        "built: " + "; ".join(wrong))


def read_everywhere(script_globals: dict[str, Any]) -> Callable[[], None]:
    """Make the script read every microbatch on every rank (module docstring); returns
    the function that restores it."""
    if "mtp_on_this_rank" not in script_globals:
        return lambda: None
    original = script_globals["mtp_on_this_rank"]
    script_globals["mtp_on_this_rank"] = lambda *args, **kwargs: True
    return lambda: script_globals.__setitem__("mtp_on_this_rank", original)


def _convert(recipe: Any) -> Callable[[Any, int], Any]:
    from ..models.gpt import gpt_microbatch

    return lambda batch, index: gpt_microbatch(batch, index)


def _build(spec: ModelSpec, layout: Any, stage: int, *, tp: int, recipe: Any, seed: int):
    from ..models.gpt import gpt_stage_chunk

    return gpt_stage_chunk(spec, layout, stage, tp=tp, recipe=recipe, seed=seed)


GPT = ScriptKind(
    name="pretrain_gpt.py's GPT", capture=capture_gpt, recipe_of=recipe_of,
    check_built=check_built, convert=_convert, image_size=lambda spec: (0, 0), build=_build,
    prepare=read_everywhere)
"""How the drop-in trains pretrain_gpt.py's GPTModel."""
