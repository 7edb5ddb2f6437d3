"""pretrain_gpt.py's GPT under --pipeweaver: the spec of its flags (model_args) and the
capture of its own GPTModel call (script_gpt), against Megatron-LM itself.

The flags are parsed and validated by Megatron-LM's own parse_args / validate_args
(our flags chained) in a subprocess on the core_v0.16.1 sources. The spec is checked
against core_transformer_config_from_args (the config gpt_builder builds); the capture
runs the checkout's own ``partial(model_provider, gpt_builder)``, as pretrain_gpt.py
hands it to Megatron, and its recipe is checked against the flags GPTModel's arguments
come from (padded vocabulary, --max-position-embeddings, --position-embedding-type) and
the layer spec against the one gpt_builder's own _get_transformer_layer_spec returns.
What the chunks do not implement is refused in one FlagError naming each thing.
"""

from __future__ import annotations

import json
import sys

import pytest

from megatron_lm import run, script_env, source
from pipeweaver_megatron.megatron.examples import TINY_GPT

PROBE = r'''
import functools, json, sys
sys.argv = ["pretrain_gpt.py", *json.loads(sys.argv[1])]
from megatron.training.arguments import parse_args, validate_args, core_transformer_config_from_args
from megatron.training.global_vars import _build_tokenizer, set_args
from pipeweaver_megatron.megatron.arguments import chain_args
from pipeweaver_megatron.megatron.model_args import FlagError, planning_spec, spec_from_args
args = parse_args(chain_args(None))
validate_args(args, {})
set_args(args)
_build_tokenizer(args)
spec = spec_from_args(args)
config = core_transformer_config_from_args(args)
lm = spec.language_model
out = {
  "order": list(spec.order), "topology": list(spec.topology),
  "planning_order": list(planning_spec(args).order),
  "lm": [lm.num_layers, lm.hidden_size, lm.ffn_hidden_size, lm.num_attention_heads,
         lm.query_groups, lm.gated_mlp, lm.vocab_size, lm.untie_embeddings],
  "megatron": [config.num_layers, config.hidden_size, config.ffn_hidden_size,
               config.num_attention_heads,
               config.num_query_groups or config.num_attention_heads,
               config.gated_linear_unit, args.padded_vocab_size,
               args.untie_embeddings_and_output_weights],
  "parallel": [spec.parallel.tp, spec.parallel.pp, spec.parallel.microbatch_tokens,
               spec.parallel.global_batch_size],
  "megatron_parallel": [args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.seq_length * args.micro_batch_size, args.global_batch_size],
}
import tempfile, torch
from megatron.core import parallel_state
torch.distributed.init_process_group(
    "gloo", init_method="file://" + tempfile.mktemp(prefix="gpt-probe-"), world_size=1, rank=0)
parallel_state.initialize_model_parallel()  # what MTP's block spec asks (one process)
from gpt_builders import _get_transformer_layer_spec, gpt_builder
from model_provider import model_provider
from pipeweaver_megatron.megatron.script_model import script_kind
provider = functools.partial(model_provider, gpt_builder)
kind = script_kind(provider)
out["kind"] = kind.name
try:
    recipe = kind.recipe_of(kind.capture(provider, pre_process=True, post_process=True))
except FlagError as error:
    out["refused"] = str(error)
else:
    out["recipe"] = [recipe.language_config.num_layers, recipe.language_config.hidden_size,
                     recipe.vocab_size, recipe.max_sequence_length,
                     recipe.position_embedding_type, recipe.rotary_base]
    out["megatron_recipe"] = [args.num_layers, args.hidden_size, args.padded_vocab_size,
                              args.max_position_embeddings, args.position_embedding_type,
                              args.rotary_base]
    out["same_layer_spec"] = recipe.layer_spec == _get_transformer_layer_spec(
        args.transformer_impl == "transformer_engine", config)
print("RESULT " + json.dumps(out))
'''


def probe(flags: list[str]) -> dict:
    megatron = source()
    env = script_env(PYTHONPATH=str(megatron), WORLD_SIZE="2", RANK="0")
    done = run(sys.executable, "-c", PROBE, json.dumps(flags), cwd=megatron, env=env,
               timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


BASE = [*TINY_GPT, "--train-iters", "2", "--pipeline-model-parallel-size", "2"]


@pytest.mark.parametrize("extra", [
    [],
    ["--swiglu", "--group-query-attention", "--num-query-groups", "2",
     "--position-embedding-type", "rope", "--rotary-base", "5000", "--normalization",
     "RMSNorm", "--disable-bias-linear", "--no-rope-fusion"],
])
def test_gpt_spec_and_capture_follow_megatrons_own_build_of_the_flags(extra):
    got = probe(BASE + extra)
    assert got["order"] == got["planning_order"] == ["language_model"]
    assert got["topology"] == []
    assert got["lm"] == got["megatron"]
    assert got["parallel"] == got["megatron_parallel"]
    assert got["kind"] == "pretrain_gpt.py's GPT"
    assert "refused" not in got, got["refused"]
    assert got["recipe"] == got["megatron_recipe"]
    assert got["same_layer_spec"]


def test_what_the_chunks_do_not_implement_is_refused_in_one_message():
    flags = [f for f in TINY_GPT if f != "--untie-embeddings-and-output-weights"]
    got = probe([*flags, "--train-iters", "2", "--mtp-num-layers", "1",
                 "--position-embedding-type", "rope", "--no-rope-fusion"])
    text = got["refused"]
    assert text.startswith("--pipeweaver cannot cut this GPT into chunks yet: ")
    assert "tied input and output embeddings (pass --untie-embeddings-and-output-weights)" \
        in text
    assert "multi-token prediction (--mtp-num-layers)" in text
