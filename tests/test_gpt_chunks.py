"""GPT chunks against megatron-core's own GPTModel (CPU, one process).

The reference is GPTModel built as pretrain_gpt.py's gpt_builder builds it (its local
layer spec, fp32, tiny sizes, untied output layer), fed a microbatch of megatron-core's
MockGPTDataset as pretrain_gpt.py's get_batch yields it (tokens, labels, loss_mask,
attention_mask, position_ids), with pretrain_gpt.py's loss_func on its output. The
chunks of several layouts, loaded from its state_dict by name (chunk_names) and chained
by hand as the runtime chains stages (detached inputs, gradients passed back stage by
stage), give its loss sum, loss tokens and every parameter gradient by name.

megatron-core 0.16.1 cannot run its local specs off CUDA as shipped; host_megatron
patches torch.cuda.current_device (DotProductAttention's score buffer,
RotaryEmbedding.get_emb) to the host for this module only.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from torch.utils.data import default_collate  # noqa: E402

from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from pipeweaver_megatron.config import (  # noqa: E402
    ModelSpec, ModuleKind, ModuleSpec, ParallelSpec,
)
from pipeweaver_megatron.ir import Part  # noqa: E402
from pipeweaver_megatron.models.gpt import (  # noqa: E402
    GptChunk, GptRecipe, chunk_names, gpt_microbatch, gpt_names,
)

HIDDEN, HEADS, FFN, LAYERS = 64, 4, 128, 4
VOCAB, SEQ = 256, 32
TOL = 1e-5
LM = "language_model"
LAYOUTS = {
    "whole": [(Part(LM, 0, LAYERS),)],
    "halves": [(Part(LM, 0, 2),), (Part(LM, 2, LAYERS),)],
    "uneven": [(Part(LM, 0, 1),), (Part(LM, 1, 3),), (Part(LM, 3, LAYERS),)],
}
VARIANTS = {
    "learned": dict(position="learned_absolute", swiglu=False, groups=None),
    "rope-swiglu-gqa": dict(position="rope", swiglu=True, groups=2),
}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def host_megatron(megatron_single_process):
    warnings.filterwarnings("ignore", category=UserWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
        yield
    torch.set_num_threads(threads)


def make_recipe(position: str, swiglu: bool, groups: int | None) -> GptRecipe:
    """gpt_builder's arguments for these flags (the config standing in for
    core_transformer_config_from_args; the local spec as _get_transformer_layer_spec
    picks it without Transformer Engine)."""
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_query_groups=groups, gated_linear_unit=swiglu,
        activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False)
    return GptRecipe(language_config=config, layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type=position)


def build_gpt(recipe: GptRecipe) -> GPTModel:
    """GPTModel exactly as gpt_builder calls it (PP 1, untied output layer)."""
    return GPTModel(
        config=recipe.language_config, transformer_layer_spec=recipe.layer_spec,
        vocab_size=recipe.vocab_size, max_sequence_length=recipe.max_sequence_length,
        pre_process=True, post_process=True, fp16_lm_cross_entropy=False, parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type=recipe.position_embedding_type,
        rotary_percent=recipe.rotary_percent, rotary_base=recipe.rotary_base,
        rope_scaling=recipe.rope_scaling)


def model_spec() -> ModelSpec:
    return ModelSpec(
        name="tiny-gpt", hardware="cpu",
        modules=(ModuleSpec(name=LM, kind=ModuleKind.LANGUAGE_MODEL, num_layers=LAYERS,
                            hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                            vocab_size=VOCAB, untie_embeddings=True),),
        topology=(),
        parallel=ParallelSpec(tp=1, pp=1, sequence_parallel=False, microbatch_tokens=SEQ,
                              max_images_per_microbatch=1, global_batch_size=1))


@pytest.fixture(scope="module")
def batches():
    """Two microbatches of megatron-core's MockGPTDataset as pretrain_gpt.py configures
    it (NullTokenizer, attention masks made by the dataset), as its get_batch returns
    them at --micro-batch-size 1: (tokens, labels, loss_mask, attention_mask,
    position_ids, packed_seq_params)."""
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=SEQ, split="990,9,1",
        tokenizer=NullTokenizer(VOCAB - 1),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=True, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [4, None, None], lambda: True,
                                                config).build()
    found = []
    for i in range(2):
        data = default_collate([train[i]])
        found.append((data["tokens"], data["labels"], data["loss_mask"],
                      data["attention_mask"], data["position_ids"], None))
    return found


@pytest.fixture(scope="module")
def setups():
    found = {}
    for name, variant in VARIANTS.items():
        recipe = make_recipe(**variant)
        reference = build_gpt(recipe)
        weights = {k: v.clone() for k, v in reference.state_dict().items()
                   if isinstance(v, torch.Tensor)}
        found[name] = recipe, reference, weights
    return found


def reference_loss(model: GPTModel, batch) -> tuple[float, int]:
    """pretrain_gpt.py's forward_step and loss_func on GPTModel; backward."""
    tokens, labels, loss_mask, attention_mask, position_ids, _ = batch
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    losses = output.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    loss.backward()
    return loss.item(), int(mask.sum().item())


def run_stages(chunks, data) -> tuple[float, int]:
    """Forward stage after stage on detached inputs, backward in reverse passing each
    input's gradient upstream, as the runtime does."""
    runs, received = [], {}
    for chunk in chunks:
        inputs = {name: received[name].detach().requires_grad_()
                  for name in chunk.expected_inputs()}
        result = chunk(inputs, data)
        runs.append((result, inputs))
        received = result.outputs
    grads: dict[int, torch.Tensor] = {}
    loss, tokens = 0.0, 0
    for result, inputs in reversed(runs):
        if result.loss is not None:
            loss, tokens = result.loss.item(), result.num_tokens
            result.loss.backward()
        else:
            pairs = [(t, grads[id(t)]) for t in result.outputs.values()]
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        for leaf in inputs.values():
            grads[id(upstream(runs, leaf))] = leaf.grad
    return loss, tokens


def upstream(runs, leaf):
    """The output tensor of the stage before whose detached copy leaf is."""
    for result, _ in runs:
        for t in result.outputs.values():
            if t.data_ptr() == leaf.data_ptr():
                return t
    raise AssertionError("no stage sent this input")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_match_gpt_model(setups, batches, variant, layout):
    recipe, reference, weights = setups[variant]
    chunks = [GptChunk(model_spec(), parts, recipe=recipe, seed=3).load_from(
        chunk_names(weights)) for parts in LAYOUTS[layout]]
    for batch in batches:
        reference.zero_grad(set_to_none=True)
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        want_loss, want_tokens = reference_loss(reference, batch)
        got_loss, got_tokens = run_stages(chunks, gpt_microbatch(batch))
        assert got_tokens == want_tokens > 0
        assert got_loss == pytest.approx(want_loss, rel=TOL, abs=0)
        owner = gpt_names({n: p for c in chunks for n, p in c.named_parameters()})
        want = dict(reference.named_parameters())
        assert set(owner) == set(want)
        for name, param in want.items():
            assert param.grad is not None and owner[name].grad is not None, name
            torch.testing.assert_close(owner[name].grad, param.grad, rtol=TOL, atol=TOL,
                                       msg=name)


def test_parameter_names_and_shapes_are_gpt_models(setups):
    recipe, reference, _ = setups["learned"]
    chunks = [GptChunk(model_spec(), parts, recipe=recipe) for parts in LAYOUTS["uneven"]]
    got = {}
    for chunk in chunks:
        for name, tensor in gpt_names(chunk.state_dict()).items():
            if not name.endswith("_extra_state"):
                assert name not in got, f"{name} on two chunks"
                got[name] = tuple(tensor.shape)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()
            if not k.endswith("_extra_state")}
    assert got == want
    assert [c.pre_process for c in chunks] == [True, False, False]
    assert [c.post_process for c in chunks] == [False, False, True]


def test_recipe_must_match_the_model_spec(setups):
    recipe = make_recipe("learned_absolute", False, None)
    wrong = ModelSpec(
        name="deeper", hardware="cpu",
        modules=(ModuleSpec(name=LM, kind=ModuleKind.LANGUAGE_MODEL, num_layers=LAYERS + 2,
                            hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                            vocab_size=VOCAB, untie_embeddings=True),),
        topology=(), parallel=model_spec().parallel)
    with pytest.raises(ValueError, match="6 layers in the model spec, 4 in the recipe"):
        GptChunk(wrong, (Part(LM, 0, 2),), recipe=recipe)


def test_a_packed_batch_is_refused(batches):
    tokens, labels, loss_mask, attention_mask, position_ids, _ = batches[0]
    with pytest.raises(ValueError, match="packed_seq_params"):
        gpt_microbatch((tokens, labels, loss_mask, attention_mask, position_ids, object()))
