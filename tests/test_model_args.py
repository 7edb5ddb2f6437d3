"""The ModelSpec of a Megatron-LM script's own flags (megatron/model_args.py).

The flags are parsed and validated by Megatron-LM's own parse_args / validate_args (with
pretrain_vlm.py's add_vlm_extra_args and our flags chained), in a subprocess on the
core_v0.16.1 sources; the spec is checked against what megatron builds from the same
arguments: core_transformer_config_from_args (widths, heads, groups, gating) and
get_num_image_embeddings (LM tokens of an image), the functions pretrain_vlm.py's
model_provider calls.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.megatron.model_args import (FlagError, check_agrees, is_vlm,
                                                      spec_from_args)
from megatron_lm import run, script_env, source

PROBE = r'''
import json, sys
sys.argv = ["pretrain_vlm.py", *json.loads(sys.argv[1])]
from megatron.training.arguments import parse_args, validate_args, core_transformer_config_from_args
from megatron.training.global_vars import _build_tokenizer
from megatron.core.models.vision.clip_vit_model import get_num_image_embeddings
from pretrain_vlm import add_vlm_extra_args
from pipeweaver_megatron.megatron.arguments import chain_args
from pipeweaver_megatron.megatron.model_args import spec_from_args
args = parse_args(chain_args(add_vlm_extra_args))
validate_args(args, {})
_build_tokenizer(args)
spec = spec_from_args(args)
config = core_transformer_config_from_args(args)
vision, projection, lm = (spec.module(n) for n in spec.order)
out = {
  "lm": [lm.num_layers, lm.hidden_size, lm.ffn_hidden_size, lm.num_attention_heads,
         lm.query_groups, lm.gated_mlp, lm.vocab_size, lm.untie_embeddings],
  "megatron_lm": [args.decoder_num_layers or args.num_layers, config.hidden_size,
                  config.ffn_hidden_size, config.num_attention_heads,
                  config.num_query_groups or config.num_attention_heads,
                  config.gated_linear_unit, args.padded_vocab_size,
                  # pretrain_vlm.py passes no share_embeddings_and_output_weights:
                  __import__("inspect").signature(__import__(
                      "megatron.core.models.multimodal.llava_model", fromlist=["x"]
                  ).LLaVAModel).parameters["share_embeddings_and_output_weights"].default
                  is False],
  "vision": [vision.num_layers, vision.hidden_size, vision.ffn_hidden_size],
  "megatron_vision": [args.encoder_num_layers, config.hidden_size, config.ffn_hidden_size],
  "image_lm_tokens": vision.image.lm_tokens(77, 1000),
  "megatron_image_tokens": get_num_image_embeddings(
      args.img_h, args.img_w, args.patch_dim, "clip", args.disable_vision_class_token,
      class_token_len=1, pixel_shuffle=False, use_tile_tags=False),
  "encoder_tokens": vision.image.encoder_tokens(5, 5),
  "patches_plus_class": (args.img_h // args.patch_dim) * (args.img_w // args.patch_dim) + 1,
  "parallel": [spec.parallel.tp, spec.parallel.pp, spec.parallel.global_batch_size],
}
print("RESULT " + json.dumps(out))
'''

TINY_LLAVA = ["--encoder-num-layers", "2", "--decoder-num-layers", "4", "--hidden-size", "64",
              "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64",
              "--max-position-embeddings", "256", "--img-h", "48", "--img-w", "32",
              "--patch-dim", "8", "--micro-batch-size", "1", "--global-batch-size", "4",
              "--train-iters", "2", "--lr", "1e-3", "--tokenizer-type", "NullTokenizer",
              "--vocab-size", "500", "--transformer-impl", "local", "--ckpt-format", "torch"]


def probe(flags: list[str]) -> dict:
    megatron = source()
    env = script_env(PYTHONPATH=str(megatron), WORLD_SIZE="2", RANK="0")
    done = run(sys.executable, "-c", PROBE, json.dumps(flags), cwd=megatron, env=env,
               timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("extra", [
    [],
    ["--disable-vision-class-token", "--swiglu", "--group-query-attention",
     "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
     "--pipeline-model-parallel-size", "2"],
])
def test_llava_spec_follows_megatrons_own_config_of_the_flags(extra):
    got = probe(TINY_LLAVA + extra)
    assert got["lm"] == got["megatron_lm"]
    assert got["vision"] == got["megatron_vision"]
    # A CLIP tile is the same whatever the photo's size; the class token joins the LM
    # sequence unless --disable-vision-class-token.
    assert got["image_lm_tokens"] == got["megatron_image_tokens"]
    assert got["encoder_tokens"] == got["patches_plus_class"]
    assert got["parallel"] == [1, 2 if extra else 1, 4]


def namespace(**overrides) -> argparse.Namespace:
    base = dict(encoder_num_layers=2, decoder_num_layers=8, num_layers=None, hidden_size=128,
                ffn_hidden_size=512, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, swiglu=True, padded_vocab_size=2048,
                untie_embeddings_and_output_weights=True, img_h=32, img_w=32, patch_dim=4,
                disable_vision_class_token=False, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=2, data_parallel_size=1, seq_length=256,
                micro_batch_size=1, global_batch_size=8)
    return argparse.Namespace(**{**base, **overrides})


def test_gpt_flags_give_a_language_model_alone():
    args = namespace(num_layers=6, decoder_num_layers=None)
    del args.disable_vision_class_token
    spec = spec_from_args(args)
    assert not is_vlm(args) and spec.order == ("language_model",)
    assert spec.language_model.num_layers == 6


def test_missing_model_flags_are_named():
    with pytest.raises(FlagError, match="--encoder-num-layers"):
        spec_from_args(namespace(encoder_num_layers=None))


def test_a_contradicting_model_config_names_both_values():
    tiny = load_model("tiny-vlm")  # LM 8 x 128, 4 heads, 2 groups, SwiGLU, vocab 2048
    derived = spec_from_args(namespace(hidden_size=64, ffn_hidden_size=512, encoder_num_layers=8,
                                       disable_vision_class_token=True))
    with pytest.raises(FlagError) as error:
        check_agrees(tiny, derived, "tiny-vlm")
    text = str(error.value)
    assert "lm.hidden_size is 128 in tiny-vlm, 64 from the script's flags" in text
    assert "vision.hidden_size is 128 in tiny-vlm, 64" in text
    assert "num_layers" not in text  # 8 and 8 agree
    check_agrees(derived, derived, "itself")


def test_a_derived_spec_travels_as_yaml_and_loads_back_equal(tmp_path):
    import yaml

    from pipeweaver_megatron.config import spec_document

    derived = spec_from_args(namespace(disable_vision_class_token=True))
    path = tmp_path / "derived.yaml"
    path.write_text(yaml.safe_dump(spec_document(derived)))
    loaded = load_model(path)
    assert (loaded.modules, loaded.topology, loaded.parallel) == (
        derived.modules, derived.topology, derived.parallel)


def test_a_script_that_builds_no_llava_is_refused_with_the_way_out():
    import functools

    from pipeweaver_megatron.megatron.script_model import require_llava

    def gpt_provider(builder, pre_process=True, post_process=True):
        return builder

    with pytest.raises(FlagError, match="pass --pipeweaver-model-config NAME"):
        require_llava(functools.partial(gpt_provider, "gpt_builder"))
    namespace = {"LLaVAModel": object}
    exec("def provider():\n    return LLaVAModel\n", namespace)
    require_llava(namespace["provider"])
