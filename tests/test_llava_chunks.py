"""LLaVA chunks against megatron-core's own LLaVAModel (CPU, one process).

The reference is LLaVAModel built as pretrain_vlm.py's model_provider builds it (local
layer specs, fp32, tiny sizes), fed a microbatch of megatron-core's
MockMultimodalDataset prepared as pretrain_vlm.py prepares it, with pretrain_gpt.py's
loss_func on its output. The chunks of several layouts, loaded from its state_dict by
name and chained by hand as the runtime chains stages (detached inputs, gradients passed
back stage by stage, image sub-microbatches concatenated in image order), give its loss
sum, loss tokens and every parameter gradient by name.

megatron-core 0.16.1 cannot run its local specs off CUDA as shipped; the host_megatron
fixture patches, for this module only: torch.cuda.current_device (DotProductAttention's
score buffer, RotaryEmbedding.get_emb) to the host, the softmax's default causal mask
(made on "cuda") to a host one, and CLIPViTModel's default ln_pre (torch.nn.LayerNorm,
which build_module cannot build without Transformer Engine) to WrappedTorchNorm, the
same torch.nn.LayerNorm built from the config; Tensor.cuda is the identity while the
reference is built (CLIPViTModel moves its position ids to CUDA).

Sequence parallelism runs on 2 gloo processes at TP 2 (torch.multiprocessing): each
rank's LLaVAModel built with the LM config sequence-parallel (the vision and projection
configs not, as pretrain_vlm.py builds them) against the chunks on the same rank,
gradient shard by shard. Besides the patches above, each process lifts LLaVAModel's
check that sequence parallelism runs on Transformer Engine's attention (the local
spec's DotProductAttention computes the same causal attention) and takes the CPU
stand-in's norm: torch's LayerNorm with its weights marked ``sequence_parallel`` as
Apex's and TE's norms mark theirs (WrappedTorchNorm refuses sequence parallelism).
"""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from torch.utils.data import default_collate  # noqa: E402

from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.multimodal_dataset import (  # noqa: E402
    MockMultimodalDataset, MultimodalDatasetConfig,
)
from megatron.core.models.multimodal import llava_model  # noqa: E402
from megatron.core.models.multimodal.llava_model import (  # noqa: E402
    DEFAULT_IMAGE_TOKEN_INDEX, LLaVAModel,
)
from megatron.core.models.vision.clip_vit_model import CLIPViTModel  # noqa: E402
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from pipeweaver_megatron.config import (  # noqa: E402
    ImageRule, ModelSpec, ModuleKind, ModuleSpec, ParallelSpec,
)
from pipeweaver_megatron.ir import Part  # noqa: E402
from pipeweaver_megatron.models.data import IMAGE_TOKEN_ID, select  # noqa: E402
from pipeweaver_megatron.models.llava import (  # noqa: E402
    LlavaLanguagePart, LlavaProjectorPart, LlavaVisionPart, llava_recipe,
)
from pipeweaver_megatron.models.llava_data import (  # noqa: E402
    LlavaTextData, llava_microbatch, llava_patches, llava_pixels,
)
from pipeweaver_megatron.models.lmm import LMMChunk, build_reference  # noqa: E402

HIDDEN, HEADS, FFN = 64, 4, 256
VISION_LAYERS, LM_LAYERS = 2, 4
IMG, PATCH, VOCAB = 32, 8, 256
TEXT_LEN = 24  # --dataloader-seq-length
MAX_LM = 96
TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VISION, PROJ, LM = "vision_model", "vision_projection", "language_model"
LAYOUTS = {
    "whole": [(Part(VISION, 0, VISION_LAYERS), Part(PROJ, 0, 1), Part(LM, 0, LM_LAYERS))],
    "megatron": [(Part(VISION, 0, VISION_LAYERS), Part(PROJ, 0, 1), Part(LM, 0, 1)),
                 (Part(LM, 1, LM_LAYERS),)],
    "modality": [(Part(VISION, 0, 1),), (Part(VISION, 1, 2),), (Part(PROJ, 0, 1),),
                 (Part(LM, 0, 2),), (Part(LM, 2, 4),)],
}


# ---------------------------------------------------------------- megatron-core on CPU

def _host_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


class _HostCLIP(CLIPViTModel):
    """CLIPViTModel with the norm megatron-core would pick without TE if it could build it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("ln_pre_impl", WrappedTorchNorm)
        kwargs.setdefault("ln_post_impl", WrappedTorchNorm)
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def host_megatron(megatron_single_process):
    warnings.filterwarnings("ignore", category=UserWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; see test_lmm_chunks
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
        patch.setattr("megatron.core.fusions.fused_softmax.get_default_causal_mask",
                      _host_causal_mask)
        if not torch.cuda.is_available():
            patch.setattr(llava_model, "CLIPViTModel", _HostCLIP)
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- model and data

def configs(vision_hidden: int = HIDDEN, tp: int = 1, sequence_parallel: bool = False):
    """As pretrain_vlm.py's model_provider: the language config (here standing in for
    core_transformer_config_from_args), the vision one a deep copy with the encoder's
    layers and vision_model_type "clip", the projection one a deep copy (both with
    sequence parallelism turned off, as the script does)."""
    language = TransformerConfig(
        num_layers=LM_LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN,
        num_attention_heads=HEADS, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel)
    vision = copy.deepcopy(language)
    vision.num_layers = VISION_LAYERS
    vision.vision_model_type = "clip"
    vision.context_parallel_size = 1
    vision.pipeline_model_parallel_size = 1
    vision.sequence_parallel = False
    if vision_hidden != HIDDEN:
        vision.hidden_size = vision_hidden
        vision.ffn_hidden_size = 2 * vision_hidden
        vision.kv_channels = vision_hidden // HEADS
    projection = copy.deepcopy(language)
    projection.context_parallel_size = 1
    projection.pipeline_model_parallel_size = 1
    projection.sequence_parallel = False
    return language, vision, projection


def make_recipe(drop: bool, position: str, vision_hidden: int = HIDDEN, tp: int = 1,
                sequence_parallel: bool = False):
    """(pretrain_vlm's decoder_seq_length would be TEXT_LEN + 1 + one image's tokens;
    MAX_LM leaves room for the two-image batch, which LLaVAModel would truncate.)"""
    return llava_recipe(*configs(vision_hidden, tp, sequence_parallel), vocab_size=VOCAB,
                        max_sequence_length=MAX_LM,
                        img_h=IMG, img_w=IMG, patch_dim=PATCH, drop_vision_class_token=drop,
                        position_embedding_type=position)


def build_llava(recipe):
    """LLaVAModel exactly as pretrain_vlm.py's model_provider calls it."""
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        model = LLaVAModel(
            language_transformer_config=recipe.language_config,
            language_transformer_layer_spec=recipe.language_layer_spec,
            language_vocab_size=recipe.vocab_size,
            language_max_sequence_length=recipe.max_sequence_length,
            vision_transformer_config=recipe.vision_config,
            vision_transformer_layer_spec=recipe.vision_layer_spec,
            drop_vision_class_token=recipe.drop_vision_class_token,
            vision_projection_config=recipe.projection_config,
            vision_projection_layer_spec=recipe.projection_submodules,
            vision_projection_type="mlp", parallel_output=True,
            language_position_embedding_type=recipe.position_embedding_type,
            language_rotary_percent=recipe.rotary_percent,
            language_rope_scaling=recipe.rope_scaling, pre_process=True, post_process=True,
            add_encoder=True, add_decoder=True, img_h=recipe.img_h, img_w=recipe.img_w,
            patch_dim=recipe.patch_dim)
    model.freeze(freeze_language_model=False, freeze_vision_model=False,
                 freeze_vision_projection=False)
    return model


def model_spec(recipe, tp: int = 1, sequence_parallel: bool = False):
    """Our ModelSpec of the same model (vision_model -> vision_projection -> language_model)."""
    vision = recipe.vision_config
    return ModelSpec(
        name="tiny-llava", hardware="cpu",
        modules=(
            ModuleSpec(name=VISION, kind=ModuleKind.VISION_ENCODER, num_layers=VISION_LAYERS,
                       hidden_size=vision.hidden_size, ffn_hidden_size=vision.ffn_hidden_size,
                       num_attention_heads=HEADS,
                       image=ImageRule(patch_size=PATCH, merge_size=1, image_size=IMG)),
            ModuleSpec(name=PROJ, kind=ModuleKind.PROJECTOR, num_layers=1,
                       input_size=vision.hidden_size, hidden_size=HIDDEN, ffn_hidden_size=FFN),
            ModuleSpec(name=LM, kind=ModuleKind.LANGUAGE_MODEL, num_layers=LM_LAYERS,
                       hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                       vocab_size=VOCAB)),
        topology=((VISION, PROJ), (PROJ, LM)),
        parallel=ParallelSpec(tp=tp, pp=1, sequence_parallel=sequence_parallel,
                              microbatch_tokens=256,
                              max_images_per_microbatch=4, global_batch_size=1))


def preprocess_data_for_llava(data):
    """pretrain_vlm.py's _preprocess_data_for_llava (Megatron-LM core_v0.16.1), verbatim:
    pretrain_vlm.py imports megatron.training, so it cannot be imported here."""
    data["tokens"] = torch.cat(
        [DEFAULT_IMAGE_TOKEN_INDEX
         * torch.ones(1, dtype=data["tokens"].dtype, device=data["tokens"].device),
         data["tokens"]])
    data["labels"] = torch.cat([data["tokens"][1].unsqueeze(0), data["labels"]])
    data["loss_mask"] = torch.cat(
        [torch.zeros(1, dtype=data["loss_mask"].dtype, device=data["loss_mask"].device),
         data["loss_mask"]])
    data["position_ids"] = torch.cat(
        [data["position_ids"], data["position_ids"][-1].unsqueeze(0) + 1])
    return data


@pytest.fixture(scope="module")
def mock_samples():
    """Samples of megatron-core's MockMultimodalDataset as pretrain_vlm.py's
    train_valid_test_datasets_provider configures it (tokenizer: NullTokenizer, whose
    vocabulary with its eod is VOCAB)."""
    config = MultimodalDatasetConfig(
        random_seed=1234, split="990,9,1", sequence_length=TEXT_LEN,
        tokenizer=NullTokenizer(VOCAB - 1), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, image_h=IMG, image_w=IMG,
        preprocess_func=preprocess_data_for_llava, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(MockMultimodalDataset, [4, None, None],
                                                lambda: True, config).build()
    return [train[i] for i in range(2)]


def get_batch(sample, image=None):
    """pretrain_vlm.py's get_batch at --micro-batch-size 1 (TP 1, no CP or SP): the
    data loader's batch of one sample, as (tokens, position_ids, labels, images,
    loss_mask, attention_mask, packed_seq_params)."""
    data = default_collate([sample])
    images = data["image"].float() if image is None else image
    return (data["tokens"].long(), data["position_ids"].long(), data["labels"].long(), images,
            data["loss_mask"].float(), None, None)


def random_image(n: int = 1, seed: int = 0):
    """The mock's image is all zeros (conv1 then gets no gradient); a random one."""
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def two_image_batch(sample):
    """A hand-made microbatch with two images: the mock's in front and one more inside
    the text, to exercise LLaVA's label and loss-mask moves around an image."""
    tokens, position_ids, labels, _, loss_mask, _, _ = get_batch(sample)
    cut = 9
    image = torch.tensor([[DEFAULT_IMAGE_TOKEN_INDEX]])
    tokens = torch.cat([tokens[:, :cut], image, tokens[:, cut:]], dim=1)
    labels = torch.cat([labels[:, :cut - 1], image, labels[:, cut - 1:]], dim=1)
    loss_mask = torch.cat([loss_mask[:, :cut], torch.zeros(1, 1), loss_mask[:, cut:]], dim=1)
    position_ids = torch.arange(tokens.size(1))[None]
    return tokens, position_ids, labels, random_image(2, seed=5), loss_mask, None, None


# ---------------------------------------------------------------- reference and pipeline

def reference_loss(model, batch):
    """LLaVAModel's forward and pretrain_gpt.py's loss_func; backward. (loss sum, tokens)."""
    tokens, position_ids, labels, images, loss_mask, attention_mask, _ = batch
    output, new_loss_mask = model(images, tokens, position_ids, attention_mask, labels,
                                  loss_mask)
    losses = output.view(-1).float()
    mask = new_loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    loss.backward()
    return loss.item(), int(num_tokens), new_loss_mask


def run_stages(chunks, data, image_subs=None):
    """Forward every stage (stages of vision modules once per image sub-microbatch,
    image_subs lists their members; others on the whole microbatch), then backward in
    reverse, with detached inputs and gradients passed back as a runtime does: a stage
    after sub-microbatched ones gets their outputs concatenated in sub order, and its
    input gradient goes back split by rows. Returns (loss sum, tokens)."""
    runs = []  # per stage: list of (result, {name: leaf}, per-source row counts)
    for chunk in chunks:
        module = chunk.parts[0].module
        image_only = all(p.module in (VISION, PROJ) for p in chunk.parts)
        members = image_subs if (image_subs and image_only) else [None]
        before = runs[-1] if runs else None
        stage = []
        for k, sub in enumerate(members):
            if before is None:
                sources = []
            elif len(before) == len(members):
                sources = [before[k]]
            else:
                sources = before
            inputs, counts = {}, {}
            for name in chunk.expected_inputs():
                sent = [src[0].outputs[name] for src in sources if name in src[0].outputs]
                if not sent:
                    continue
                counts[name] = [t.size(0) for t in sent]
                inputs[name] = torch.cat(sent).detach().requires_grad_()
            piece = data if sub is None else select(data, module, sub)
            stage.append((chunk(inputs, piece), inputs, counts, sources))
        runs.append(stage)
    loss, tokens = 0.0, 0
    grads = {}
    for stage in reversed(runs):
        for result, inputs, counts, sources in stage:
            if result.loss is not None:
                loss += result.loss.item()
                tokens += result.num_tokens
                result.loss.backward()
            else:
                pairs = [(t, grads[id(t)]) for t in result.outputs.values() if t.requires_grad]
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            for name, leaf in inputs.items():
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                sent = [src[0].outputs[name] for src in sources if name in src[0].outputs]
                for t, g in zip(sent, grad.split(counts[name])):
                    grads[id(t)] = g
    return loss, tokens


def chunks_for(model, recipe, layout, weights):
    return [LMMChunk(model, parts, recipe=recipe, seed=3).load_from(weights)
            for parts in LAYOUTS[layout]]


def state_shapes(modules):
    shapes = {}
    for module in modules:
        for name, tensor in module.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            assert name not in shapes, f"{name} on two chunks"
            shapes[name] = tuple(tensor.shape)
    return shapes


def compare(reference, chunks, batch, recipe, image_subs=None):
    reference.zero_grad(set_to_none=True)
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    want_loss, want_tokens, _ = reference_loss(reference, batch)
    data = llava_microbatch(batch, recipe, index=0)
    got_loss, got_tokens = run_stages(chunks, data, image_subs)
    assert got_tokens == want_tokens
    assert got_loss == pytest.approx(want_loss, rel=TOL, abs=0)
    owner = {n: p for c in chunks for n, p in c.named_parameters()}
    want = dict(reference.named_parameters())
    assert set(owner) == set(want)
    worst = 0.0
    for name, param in want.items():
        got = owner[name].grad
        assert param.grad is not None and got is not None, name
        torch.testing.assert_close(got, param.grad, rtol=TOL, atol=TOL, msg=name)
        scale = max(1.0, param.grad.abs().max().item())
        worst = max(worst, (got - param.grad).abs().max().item() / scale)
    return abs(got_loss - want_loss) / abs(want_loss), worst


VARIANTS = [(False, "learned_absolute"), (True, "learned_absolute"), (False, "rope"),
            (True, "rope")]


@pytest.fixture(scope="module")
def setups():
    """Per variant (drop class token, position embedding): recipe, spec, reference, weights."""
    found = {}
    for drop, position in VARIANTS:
        recipe = make_recipe(drop, position)
        reference = build_llava(recipe)
        weights = {k: v.clone() for k, v in reference.state_dict().items()
                   if isinstance(v, torch.Tensor)}
        found[drop, position] = (recipe, model_spec(recipe), reference, weights)
    return found


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("drop,position", VARIANTS)
def test_layouts_match_llava_model(setups, mock_samples, drop, position):
    """Every layout gives LLaVAModel's loss sum, loss tokens and gradients, on the mock
    batch (zero image) and with a random image."""
    recipe, model, reference, weights = setups[drop, position]
    for layout in LAYOUTS:
        chunks = chunks_for(model, recipe, layout, weights)
        for image in (None, random_image(seed=len(layout))):
            rel_loss, rel_grad = compare(reference, chunks, get_batch(mock_samples[0], image),
                                         recipe)
            assert rel_loss <= TOL and rel_grad <= TOL, (layout, rel_loss, rel_grad)
        # (with the random image) no gradient compared was trivially zero
        for name, param in reference.named_parameters():
            assert param.grad.abs().sum() > 0, f"no gradient: {name}"


@pytest.mark.parametrize("drop", [False, True])
def test_two_images_in_sub_microbatches(setups, mock_samples, drop):
    """Two images, the second inside the text; the modality-aware layout runs the
    vision stages per image (select) and the LM on both, concatenated."""
    recipe, model, reference, weights = setups[drop, "rope"]
    batch = two_image_batch(mock_samples[1])
    for layout, subs in (("modality", [(0,), (1,)]), ("modality", None), ("megatron", None)):
        compare(reference, chunks_for(model, recipe, layout, weights), batch, recipe, subs)


def test_parameter_names_and_shapes_are_llava_models(setups):
    for (drop, position), (recipe, model, reference, _) in setups.items():
        want = {k: tuple(v.shape) for k, v in reference.state_dict().items()
                if not k.endswith("_extra_state")}
        assert "vision_model.conv1.weight" in want and "vision_model.class_token" in want
        assert ("language_model.embedding.position_embeddings.weight" in want) == (
            position == "learned_absolute")
        for layout in LAYOUTS:
            chunks = [LMMChunk(model, parts, recipe=recipe) for parts in LAYOUTS[layout]]
            assert state_shapes(chunks) == want, (drop, position, layout)
        assert state_shapes([build_reference(model, recipe=recipe)]) == want
    # chunks built with one seed hold the same weights whatever the layout
    recipe, model = setups[False, "rope"][:2]
    whole = build_reference(model, recipe=recipe, seed=7).state_dict()
    for parts in LAYOUTS["modality"]:
        for name, tensor in LMMChunk(model, parts, recipe=recipe, seed=7).state_dict().items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, whole[name]), name


def test_wider_lm_than_vit(mock_samples):
    """A ViT narrower than the LM (the projector maps 32 -> 64), learned positions."""
    recipe = make_recipe(False, "learned_absolute", vision_hidden=32)
    reference = build_llava(recipe)
    weights = {k: v.clone() for k, v in reference.state_dict().items()
               if isinstance(v, torch.Tensor)}
    model = model_spec(recipe)
    for layout in ("megatron", "modality"):
        compare(reference, chunks_for(model, recipe, layout, weights),
                get_batch(mock_samples[0], random_image(seed=9)), recipe)


def test_microbatch_holds_llava_models_sequence_and_selects_images(setups, mock_samples):
    recipe, _, reference, _ = setups[False, "learned_absolute"]
    batch = two_image_batch(mock_samples[1])
    tokens, position_ids, labels, images, loss_mask = batch[:5]
    data = llava_microbatch(batch, recipe, index=4)
    text = data.text
    assert isinstance(text, LlavaTextData) and data.index == 4
    per_tile = (IMG // PATCH) ** 2 + 1
    length = tokens.size(1) - 2 + 2 * per_tile
    assert text.tokens.shape == (length,) and text.sample_lengths == (length,)
    assert text.image_positions.tolist() == (list(range(per_tile))
                                             + list(range(per_tile + 8, 2 * per_tile + 8)))
    assert (text.tokens[text.image_positions] == IMAGE_TOKEN_ID).all()
    text_mask = torch.ones(length, dtype=torch.bool)
    text_mask[text.image_positions] = False
    assert torch.equal(text.tokens[text_mask], tokens[0][tokens[0] != DEFAULT_IMAGE_TOKEN_INDEX])
    # labels and loss mask are LLaVAModel's own (its forward returns the loss mask)
    with torch.no_grad():
        _, new_mask = reference(images, tokens, position_ids, None, labels, loss_mask)
    assert torch.equal(text.loss_mask, new_mask[0])
    assert text.loss_tokens == int(new_mask.sum())
    assert text.loss_mask[per_tile + 7] == 0, "loss on the token right before an image"
    assert text.cu_seqlens.tolist() == [0, length]
    assert torch.equal(data.images.patches, llava_patches(images, PATCH))
    assert torch.equal(llava_pixels(data.images, PATCH), images)
    assert data.images.grids == ((4, 4), (4, 4))
    assert data.images.lm_tokens == (per_tile, per_tile)
    # a sub-microbatch of the second image
    sub = select(data, VISION, (1,))
    assert sub.images.indices == (1,) and sub.images.cu_seqlens.tolist() == [0, 16]
    assert torch.equal(llava_pixels(sub.images, PATCH), images[1:])
    assert sub.text is data.text
    assert select(data, PROJ, (0,)).images.lm_tokens == (per_tile,)
    assert select(data, LM, (0,)) is data  # one sample: the LM takes it whole
    with pytest.raises(ValueError, match="never split"):
        select(data, LM, (1,))
    # the vision stages of the sub-microbatch see only its image
    vision = LlavaVisionPart(recipe, 0, VISION_LAYERS)
    out, _, _ = vision({}, sub)
    assert out["hidden"].shape == (per_tile, 1, HIDDEN)
    projector = LlavaProjectorPart(recipe)
    embeds, _, _ = projector(out, sub)
    assert embeds["image_embeds"].shape == (per_tile, HIDDEN)
    part = LlavaLanguagePart(recipe, 0, 1)
    with pytest.raises(ValueError, match="image embeddings were given"):
        part(embeds, data)  # one image's embeddings for two images
    moved = data.to(torch.device("cpu"))
    assert isinstance(moved.text, LlavaTextData) and torch.equal(moved.text.input_ids, tokens)


def test_recipe_must_match_the_model_spec(setups):
    model = setups[False, "rope"][1]
    language, vision, projection = configs()
    language.num_layers = LM_LAYERS + 1
    other = llava_recipe(language, vision, projection, vocab_size=VOCAB, max_sequence_length=64,
                         img_h=IMG, img_w=IMG, patch_dim=PATCH, drop_vision_class_token=False)
    with pytest.raises(ValueError, match="layers in the model spec"):
        LMMChunk(model, LAYOUTS["whole"][0], recipe=other)


# ---------------------------------------------------------------- sequence parallelism

SP_VARIANTS = ((False, "learned_absolute"), (True, "rope"))
"""(drop class token, position embedding): S' = 41 (padded to 42 as get_batch pads it)
and S' = 40 (no padding) at TP 2."""


def sp_batch(sample, image, recipe, tp: int):
    """pretrain_vlm.py's get_batch under --sequence-parallel (CP 1): the text padded with
    megatron-core's get_padding so that the combined sequence divides by TP, and its
    get_packed_seq_params descriptor of the one sequence."""
    from megatron.core.models.multimodal.context_parallel import (
        get_packed_seq_params, get_padding,
    )

    tokens, position_ids, labels, images, loss_mask, _, _ = get_batch(sample, image)
    n = int((tokens == DEFAULT_IMAGE_TOKEN_INDEX).sum())
    img_seq_len = recipe.img_seq_len * n - n  # get_batch's
    padding = get_padding(tokens.shape[1] + img_seq_len, 1, tp, True)
    if padding:
        tokens, position_ids, labels, loss_mask = [
            torch.nn.functional.pad(x, (0, padding))
            for x in (tokens, position_ids, labels, loss_mask)]
    params = get_packed_seq_params(tokens, img_seq_len, padding, 1)
    return (tokens, position_ids, labels, images, loss_mask, None, params), padding


def _sp_case(drop: bool, position: str, sample) -> dict:
    """One TP rank: LLaVAModel under SP and the chunks of three layouts, compared."""
    recipe = make_recipe(drop, position, tp=2, sequence_parallel=True)
    torch.manual_seed(11)
    reference = build_llava(recipe)
    model = model_spec(recipe, tp=2, sequence_parallel=True)
    batch, padding = sp_batch(sample, random_image(seed=13), recipe, tp=2)
    reference.zero_grad(set_to_none=True)
    # Megatron's padding-causal mask (TE) equals the causal one on every real token,
    # and megatron-core's DotProductAttention takes no packed_seq_params: pass none.
    want_loss, want_tokens, _ = reference_loss(reference, batch[:6] + (None,))
    want = dict(reference.named_parameters())
    weights = reference.state_dict()
    data = llava_microbatch(batch, recipe, index=0)
    found = {"padding": padding, "length": data.text.tokens.numel(), "layouts": {}}
    for layout in ("whole", "megatron", "modality"):
        chunks = []
        for parts in LAYOUTS[layout]:
            chunk = LMMChunk(model, parts, tp=2, recipe=recipe, seed=3)
            with torch.no_grad():
                for name, tensor in chunk.state_dict(keep_vars=True).items():
                    if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state"):
                        tensor.copy_(weights[name])
            chunks.append(chunk)
        rows = []  # the sequence rows the LM's last layer runs on
        last_layer = chunks[-1].language_model.decoder.layers[str(LM_LAYERS - 1)]
        hook = last_layer.register_forward_pre_hook(
            lambda module, args, kwargs: rows.append(args[0].size(0)), with_kwargs=True)
        messages = []
        for chunk in chunks:
            chunk.register_forward_hook(lambda module, args, result: messages.append(
                {k: tuple(v.shape) for k, v in result.outputs.items()}))
        got_loss, got_tokens = run_stages(chunks, data)
        hook.remove()
        owner = {n: p for c in chunks for n, p in c.named_parameters()}
        grad = max((owner[n].grad - p.grad).abs().max().item()
                   / max(1.0, p.grad.abs().max().item()) for n, p in want.items())
        found["layouts"][layout] = dict(
            loss=(got_loss, want_loss), tokens=(got_tokens, want_tokens), grad=grad,
            names=(set(owner) == set(want)), rows=rows, messages=messages,
            marked=sorted(n for n, p in owner.items() if getattr(p, "sequence_parallel", False)),
            want_marked=sorted(n for n, p in want.items()
                               if getattr(p, "sequence_parallel", False)),
            zero=[n for n, p in want.items() if not p.grad.abs().sum() > 0])
    return found


def _sp_rank(rank: int, store: str, samples, results) -> None:
    """A TP-2 rank on gloo with this module's host patches, the stand-in's norm (torch's
    LayerNorm marked sequence_parallel as Apex's and TE's are) and LLaVAModel's
    "TE attention only" check lifted for the local spec's DotProductAttention."""
    import torch.distributed as dist
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from pipeweaver_megatron.cpu_standin.megatron_patches import norm_with_sequence_parallel
    from pipeweaver_megatron.models import init_parallel, teardown

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        init_parallel(2, 1, seed=1234)
        norm_with_sequence_parallel()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
            patch.setattr("megatron.core.fusions.fused_softmax.get_default_causal_mask",
                          _host_causal_mask)
            patch.setattr(llava_model, "CLIPViTModel", _HostCLIP)
            patch.setattr(llava_model, "TEDotProductAttention", DotProductAttention,
                          raising=False)
            patch.setattr(llava_model, "HAVE_TE", True)
            results[rank] = {variant: _sp_case(*variant, samples[0]) for variant in SP_VARIANTS}
    finally:
        teardown()


@pytest.fixture(scope="module")
def sp_results(mock_samples, tmp_path_factory):
    import torch.multiprocessing as mp

    store = tmp_path_factory.mktemp("sp") / "store"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sp_rank, args=(str(store), mock_samples, results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.parametrize("drop,position", SP_VARIANTS)
def test_sequence_parallel_tp2_matches_llava_model(sp_results, drop, position):
    """TP 2 with sequence parallelism on 2 gloo processes: megatron-core's LLaVAModel
    (its scatter after _preprocess_data, sequence-parallel layers, output-layer gather)
    against the chunks of three layouts, each rank's loss and every gradient shard by
    name; the LM layers ran on half the sequence, the messages between LM parts are the
    whole sequence, and the same parameters carry ``sequence_parallel`` (the ones
    finalize_model_grads all-reduces over TP)."""
    for rank in (0, 1):
        case = sp_results[rank][drop, position]
        assert case["padding"] == (0 if drop else 1)
        length = case["length"]
        assert length % 2 == 0
        for layout, got in case["layouts"].items():
            loss, want = got["loss"]
            assert loss == pytest.approx(want, rel=TOL, abs=0), (rank, layout)
            assert got["tokens"][0] == got["tokens"][1], (rank, layout)
            assert got["names"] and got["grad"] <= TOL, (rank, layout, got["grad"])
            assert got["rows"] == [length // 2], (rank, layout, got["rows"])
            assert got["marked"] == got["want_marked"] and got["marked"], (rank, layout)
            assert all(".decoder.layers." in n or "final_layernorm" in n
                       for n in got["marked"]) and not any(
                n.startswith(("vision_model.", "vision_projection.")) for n in got["marked"])
            lm_part = {"megatron": 0, "modality": 3}.get(layout)  # an LM part before the last
            if lm_part is not None:
                assert got["messages"][lm_part] == {"hidden": (length, 1, HIDDEN)}, layout
    # the ranks hold different shards of the same model, so the same loss; no gradient
    # compared is zero on both shards (a rank's vocabulary rows may see no token)
    for variant in SP_VARIANTS:
        for layout in LAYOUTS:
            zero = [set(sp_results[r][variant]["layouts"][layout]["zero"]) for r in (0, 1)]
            assert not zero[0] & zero[1], (variant, layout, zero)
        assert (sp_results[0][variant]["layouts"]["whole"]["loss"][1]
                == pytest.approx(sp_results[1][variant]["layouts"]["whole"]["loss"][1],
                                 rel=1e-6))


def test_sequence_parallel_is_the_lms_alone_and_needs_one_sequence(setups, mock_samples):
    """pretrain_vlm.py keeps the ViT and the projector off sequence parallelism, so a
    recipe that puts them on it is refused; a batch of packed samples or context
    parallelism's THD format is refused by name."""
    from megatron.core.packed_seq_params import PackedSeqParams

    recipe, model = setups[False, "rope"][:2]
    language, vision, projection = configs()
    vision.sequence_parallel = True
    other = llava_recipe(language, vision, projection, vocab_size=VOCAB,
                         max_sequence_length=MAX_LM, img_h=IMG, img_w=IMG, patch_dim=PATCH,
                         drop_vision_class_token=False)
    with pytest.raises(ValueError, match="only the LM runs sequence-parallel"):
        LMMChunk(model, LAYOUTS["whole"][0], recipe=other)
    batch = get_batch(mock_samples[0])
    length = batch[0].size(1) - 1 + recipe.img_seq_len
    two = torch.tensor([0, length // 2, length], dtype=torch.int32)
    for params in (PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=two, cu_seqlens_kv=two),
                   PackedSeqParams(qkv_format="thd", cu_seqlens_q=two[::2],
                                   cu_seqlens_kv=two[::2])):
        with pytest.raises(ValueError, match="LLaVA chunks take one sequence"):
            llava_microbatch(batch[:6] + (params,), recipe)
    with pytest.raises(ValueError, match="attention mask"):
        llava_microbatch(batch[:5] + (torch.ones(1, 1, 1, length), None), recipe)
