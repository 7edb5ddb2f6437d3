"""LMM chunks' sharded_state_dict against megatron-core's LLaVAModel (torch_dist, CPU).

The reference is megatron-core's own LLaVAModel built at PP 1 as pretrain_vlm.py's
model_provider builds it (tests/test_llava_chunks.py). For three layouts, at TP 1 (one
process) and TP 2 (two gloo processes), the union over a layout's chunks of every
entry's sharded key, global shape, this rank's offsets and shape, fragmentation and
replica id is LLaVAModel.sharded_state_dict()'s. megatron.core.dist_checkpointing then
moves tensors both ways: LLaVAModel's checkpoint loads into the chunks of a PP-2 layout,
the chunks' checkpoint into a fresh LLaVAModel, a TP-1 LLaVAModel checkpoint into TP-2
chunks and a TP-2 chunk checkpoint into a TP-1 LLaVAModel, every tensor equal by name.
The YAML models' chunks (their own names) save at one layout and load at another.

Host stand-ins (as in test_llava_chunks): the current CUDA device is the host, the
softmax's causal mask is made on the host, CLIP's ln_pre is WrappedTorchNorm, and
torch.cuda.synchronize (which the torch_dist writer calls before copying tensors) does
nothing.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.mapping import (  # noqa: E402
    ShardedObject, ShardedTensor, ShardedTensorFactory,
)
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

from megatron_lm import ROOT, TORCHRUN, fresh_checkout, run, script_env  # noqa: E402
from test_llava_chunks import (  # noqa: E402
    LAYOUTS, _host_causal_mask, _HostCLIP, build_llava, configs, llava_model, model_spec,
)
import test_gpt_chunks as gpt_test  # noqa: E402
from pipeweaver_megatron.config import load_model  # noqa: E402
from pipeweaver_megatron.models.gpt import GptChunk, chunk_names  # noqa: E402
from pipeweaver_megatron.models.llava import llava_recipe  # noqa: E402
from pipeweaver_megatron.models.lmm import LMMChunk, build_reference, stage_chunk  # noqa: E402
from pipeweaver_megatron.schedules import megatron_layout  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

IMG, PATCH, VOCAB, MAX_LM = 32, 8, 256, 96
RECIPES = {"drop-rope": (True, "rope"), "keep-learned": (False, "learned_absolute")}
OTHER_SEED = 7  # chunks built with it hold other weights than the reference's


@contextlib.contextmanager
def host_megatron():
    """megatron-core's LLaVA and the torch_dist writer on the host (module docstring)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "current_device",
                                              lambda: torch.device("cpu")))
        stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
        stack.enter_context(mock.patch("megatron.core.fusions.fused_softmax."
                                       "get_default_causal_mask", _host_causal_mask))
        if not torch.cuda.is_available():
            stack.enter_context(mock.patch.object(llava_model, "CLIPViTModel", _HostCLIP))
        yield


@pytest.fixture(scope="module", autouse=True)
def host(megatron_single_process):
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with host_megatron():
        yield
    torch.set_num_threads(threads)


def recipe_at(tp: int, drop: bool = True, position: str = "rope"):
    """test_llava_chunks' recipe with every config at tensor-parallel size tp."""
    language, vision, projection = (copy.deepcopy(c) for c in configs())
    for config in (language, vision, projection):
        config.tensor_model_parallel_size = tp
    return llava_recipe(language, vision, projection, vocab_size=VOCAB,
                        max_sequence_length=MAX_LM, img_h=IMG, img_w=IMG, patch_dim=PATCH,
                        drop_vision_class_token=drop, position_embedding_type=position)


def entries(sharded: dict) -> dict:
    """What a rank's sharded state dict says of each entry (not its data)."""
    found = {}
    for name, item in sharded.items():
        if isinstance(item, ShardedTensor):
            found[name] = ("tensor", item.key, item.global_shape, item.global_offset,
                           item.local_shape, item.axis_fragmentations, item.replica_id,
                           item.prepend_axis_num, item.allow_shape_mismatch, item.dtype)
        elif isinstance(item, ShardedTensorFactory):  # a gated fc1 (swiglu halves)
            found[name] = ("factory", item.key, tuple(item.data.shape), item.replica_id)
        elif isinstance(item, ShardedObject):
            found[name] = ("object", item.key, item.global_shape, item.global_offset,
                           item.replica_id)
        else:
            found[name] = ("other", type(item).__name__)
    return found


def layout_chunks(recipe, layout: str, tp: int = 1, seed: int = 0) -> list[LMMChunk]:
    spec = model_spec(recipe)
    return [LMMChunk(spec, parts, tp=tp, recipe=recipe, seed=seed) for parts in LAYOUTS[layout]]


def union_entries(chunks) -> dict:
    found: dict = {}
    for chunk in chunks:
        mine = entries(chunk.sharded_state_dict())
        assert not set(mine) & set(found), f"entries on two stages: {set(mine) & set(found)}"
        found.update(mine)
    return found


def differences(got: dict, want: dict) -> list[str]:
    """Readable differences of two entries() results (empty when equal)."""
    lines = [f"missing {k}" for k in sorted(set(want) - set(got))]
    lines += [f"extra {k}" for k in sorted(set(got) - set(want))]
    lines += [f"{k}: {got[k]} != {want[k]}" for k in sorted(set(got) & set(want))
              if got[k] != want[k]]
    return lines


def tensors(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def load_into(modules, directory) -> None:
    """Megatron's torch_dist load of one rank's model chunks: dist_checkpointing.load of
    their sharded state dicts together (the ranks' shards cover every tensor), then each
    chunk's load_state_dict (strict)."""
    shardeds = [m.sharded_state_dict() for m in modules]
    loaded = dist_checkpointing.load({k: v for d in shardeds for k, v in d.items()},
                                     str(directory))
    for module, sharded in zip(modules, shardeds):
        module.load_state_dict({k: loaded[k] for k in sharded})


def save(sharded: dict, directory) -> None:
    """dist_checkpointing.save (torch_dist) into a new folder."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded, str(directory))


def save_chunks(chunks, directory) -> None:
    """One rank's chunks into one checkpoint, as Megatron saves a rank's model chunks."""
    sharded: dict = {}
    for chunk in chunks:
        sharded.update(chunk.sharded_state_dict())
    save(sharded, directory)


def assert_same(got: dict, want: dict, what: str) -> None:
    assert set(got) <= set(want), sorted(set(got) - set(want))
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), f"{what}: {name} differs"


# ---------------------------------------------------------------- TP 1, one process

@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_entries_are_llava_models(layout, recipe_name):
    recipe = recipe_at(1, *RECIPES[recipe_name])
    want = entries(build_llava(recipe).sharded_state_dict())
    assert differences(union_entries(layout_chunks(recipe, layout)), want) == []


def test_llava_checkpoint_loads_into_pp2_chunks_and_back(tmp_path):
    recipe = recipe_at(1)
    model = build_llava(recipe)
    weights = tensors(model)
    save(model.sharded_state_dict(), tmp_path / "llava")
    chunks = layout_chunks(recipe, "megatron", seed=OTHER_SEED)
    before = {k: v for c in chunks for k, v in tensors(c).items()}
    assert any(not torch.equal(v, weights[k]) for k, v in before.items())
    load_into(chunks, tmp_path / "llava")
    for chunk in chunks:
        assert_same(tensors(chunk), weights, "LLaVAModel -> PP-2 chunks")
    assert {k for c in chunks for k in tensors(c)} == set(weights)

    # back: the chunks of another layout (other weights) into a fresh LLaVAModel
    others = layout_chunks(recipe, "modality", seed=OTHER_SEED)
    held = {k: v for c in others for k, v in tensors(c).items()}
    save_chunks(others, tmp_path / "chunks")
    torch.manual_seed(99)
    fresh = build_llava(recipe)
    assert any(not torch.equal(v, held[k]) for k, v in tensors(fresh).items())
    load_into([fresh], tmp_path / "chunks")
    assert_same(tensors(fresh), held, "5-stage chunks -> LLaVAModel")
    assert set(tensors(fresh)) == set(held)


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_yaml_chunks_save_at_one_layout_and_load_at_another(tmp_path, name):
    model = load_model(name)
    reference = build_reference(model, seed=3)
    weights = tensors(reference)
    stages = megatron_layout(model, 2, 1)
    save_chunks([stage_chunk(model, stages, s, seed=3) for s in range(len(stages.stages))],
                tmp_path / "pp2")
    other = megatron_layout(model, 4, 2)
    chunks = [stage_chunk(model, other, s, seed=OTHER_SEED) for s in range(len(other.stages))]
    load_into(chunks, tmp_path / "pp2")
    loaded = {k: v for c in chunks for k, v in tensors(c).items()}
    assert set(loaded) == set(weights)
    assert_same(loaded, weights, f"{name}: PP-2 checkpoint -> PP-4 x VP-2 chunks")
    sharded = reference.sharded_state_dict()
    layer = next(k for k in sharded
                 if ".layers.3." in k and k.endswith("self_attention.linear_qkv.weight"))
    assert sharded[layer].key == layer.replace(".layers.3.", ".layers.")
    assert sharded[layer].global_offset[0] == 3
    assert sharded[layer].global_shape[0] == model.module(layer.split(".")[0]).num_layers
    assert {k.split(".")[0] for k in sharded} == set(model.order)


class ScriptGptChunk(GptChunk):
    """A GPT chunk whose checkpoint keys are GPTModel's own (no "language_model." prefix),
    so pretrain_gpt.py's torch_dist checkpoints and the chunks' are one format."""

    checkpoint_key_prefixes = {gpt_test.LM: ""}


@pytest.mark.parametrize("variant", sorted(gpt_test.VARIANTS))
def test_gpt_chunks_entries_are_gpt_models_and_load_its_checkpoint(tmp_path, variant):
    recipe = gpt_test.make_recipe(**gpt_test.VARIANTS[variant])
    gpt = gpt_test.build_gpt(recipe)
    want = {f"{gpt_test.LM}.{k}": v for k, v in entries(gpt.sharded_state_dict()).items()}
    spec = gpt_test.model_spec()
    for layout, stages in gpt_test.LAYOUTS.items():
        chunks = [ScriptGptChunk(spec, parts, recipe=recipe) for parts in stages]
        assert differences(union_entries(chunks), want) == [], layout
    save(gpt.sharded_state_dict(), tmp_path / "gpt")
    chunks = [ScriptGptChunk(spec, parts, recipe=recipe, seed=OTHER_SEED)
              for parts in gpt_test.LAYOUTS["uneven"]]
    load_into(chunks, tmp_path / "gpt")
    weights = chunk_names(tensors(gpt))
    loaded = {k: v for c in chunks for k, v in tensors(c).items()}
    assert set(loaded) == set(weights)
    assert_same(loaded, weights, "GPTModel -> 3-stage GPT chunks")


# ---------------------------------------------------------------- TP 2, two gloo processes

def _tp2_worker(rank: int, store: str, tp1_checkpoint: str, tp2_checkpoint: str,
                results) -> None:
    from pipeweaver_megatron.models import init_parallel, teardown

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        init_parallel(tp=2, pp=1, seed=1234)
        with host_megatron():
            recipe = recipe_at(2)
            model = build_llava(recipe)
            want = entries(model.sharded_state_dict())
            for layout in sorted(LAYOUTS):
                chunks = layout_chunks(recipe, layout, tp=2)
                results[(rank, "entries", layout)] = differences(union_entries(chunks), want)
            # a TP-1 LLaVAModel checkpoint into TP-2 PP-2 chunks; megatron-core's own
            # TP-2 LLaVAModel loaded from it is the reference
            load_into([model], tp1_checkpoint)
            weights = tensors(model)
            chunks = layout_chunks(recipe, "megatron", tp=2, seed=OTHER_SEED)
            load_into(chunks, tp1_checkpoint)
            problems = [k for c in chunks for k, v in tensors(c).items()
                        if not torch.equal(v, weights[k])]
            results[(rank, "tp1 -> tp2 chunks")] = problems
            # TP-2 chunks of the 5-stage layout into one checkpoint (read by the parent)
            save_chunks(layout_chunks(recipe, "modality", tp=2, seed=OTHER_SEED), tp2_checkpoint)
    finally:
        teardown()


def test_tp2_over_gloo(tmp_path):
    recipe = recipe_at(1)
    torch.manual_seed(5)
    source = build_llava(recipe)
    save(source.sharded_state_dict(), tmp_path / "tp1")
    (tmp_path / "tp2").mkdir()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_tp2_worker, args=(str(tmp_path / "store"), str(tmp_path / "tp1"),
                                    str(tmp_path / "tp2"), results), nprocs=2, join=True)
        got = dict(results)
    assert len(got) == 2 * (len(LAYOUTS) + 1)
    assert all(problems == [] for problems in got.values()), {
        k: v[:5] for k, v in got.items() if v}
    # the TP-2 chunks' checkpoint into a TP-1 LLaVAModel: the tensors of TP-1 chunks
    # built with the same seed (the whole tensors the TP-2 ranks held shards of)
    held = {k: v for c in layout_chunks(recipe, "modality", seed=OTHER_SEED)
            for k, v in tensors(c).items()}
    load_into([source], tmp_path / "tp2")
    assert_same(tensors(source), held, "TP-2 chunks -> TP-1 LLaVAModel")
    assert set(tensors(source)) == set(held)


# ---------------------------------------------------------------- Megatron's own save and load

@pytest.mark.parametrize("fmt", ["torch_dist", "torch_dcp", "torch"])
def test_checkpoint_formats_the_paths_take(tmp_path, fmt):
    """The drop-in path takes torch (its own loader) and torch_dist; the YAML path,
    whose layouts change with the plan, torch_dist only."""
    from test_patches import megatron_like

    from pipeweaver_megatron.megatron import providers
    from pipeweaver_megatron.megatron.model_args import FlagError
    from pipeweaver_megatron.megatron.user_run import check_user_args

    args = megatron_like(save=str(tmp_path), load=None, ckpt_format=fmt)
    if fmt == "torch_dcp":
        with pytest.raises(FlagError, match="--ckpt-format other than torch or torch_dist"):
            check_user_args(args)
    else:
        check_user_args(args)
    if fmt == "torch_dist":
        providers.check_args(args)
    else:
        with pytest.raises(providers.ProviderError, match="pass --ckpt-format torch_dist"):
            providers.check_args(args)


STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| loss: ([0-9.E+-]+) \|.*?grad norm: "
                  r"([0-9.E+-]+)")
YAML_RUN = ("--num-layers", "8", "--hidden-size", "128", "--num-attention-heads", "4",
            "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size",
            "1", "--global-batch-size", "8", "--train-iters", "4", "--lr", "3e-3",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "2048", "--transformer-impl",
            "local", "--calculate-per-token-loss", "--seed", "1234", "--pipeweaver",
            "--pipeweaver-model-config", "tiny-vlm", "--pipeweaver-search-budget-ms", "100",
            "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
            "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable",
            "--ckpt-format", "torch_dist")


def megatron_steps(script: Path, *flags, procs: int, port: int) -> dict[int, tuple[float, float]]:
    """Run the patched script through the CPU stand-in: {iteration: (loss, grad norm)}."""
    done = run(TORCHRUN, "--nproc-per-node", procs, "--master-port", port, "-m",
               "pipeweaver_megatron.cpu_standin", script, *YAML_RUN, *flags,
               cwd=script.parent, env=script_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return {int(i): (float(loss), float(norm)) for i, loss, norm in STEP.findall(done.stdout)}


def test_megatron_torch_dist_checkpoint_resumes_at_another_layout(tmp_path):
    """The YAML path (--pipeweaver-model-config) in Megatron's own pretrain: PP 2 under
    PipeWeaver's layout trains 4 iterations, saving at 2 through Megatron's
    generate_state_dict (the chunks' sharded_state_dict, the distributed optimizer's
    state keyed by it); PP 1 (megatron-1f1b, one chunk) loads iteration 2 and continues
    as the uninterrupted run. Megatron logs, after a resume, iteration 4's loss averaged
    with iteration 3's (test_cpu_standin's assert_resumed_exactly)."""
    checkout = fresh_checkout(tmp_path / "Megatron-LM")
    assert run("bash", ROOT / "scripts" / "apply_patches.sh", checkout).returncode == 0
    script, ckpt = checkout / "pretrain_vlm.py", tmp_path / "ckpt"
    first = megatron_steps(script, "--pipeline-model-parallel-size", "2", "--save", ckpt,
                           "--save-interval", "2", procs=2, port=29871)
    assert sorted(first) == [1, 2, 3, 4], first

    # what Megatron wrote: the whole model's chunk's keys, layout-free, and Adam's by them
    stored = FileSystemReader(str(ckpt / "iter_0000002")).read_metadata().state_dict_metadata
    model = load_model("tiny-vlm")
    entries_ = build_reference(model).sharded_state_dict().values()
    keys = {v.key for v in entries_}  # tensors, _extra_state objects, gated fc1 factories
    shapes = {v.key: v.global_shape for v in entries_ if isinstance(v, ShardedTensor)}
    assert {k: tuple(stored[k].size) for k in shapes} == shapes
    assert {k.split("/")[0] for k in stored
            if not k.startswith(("optimizer.", "rng_state"))} == keys
    adam = {k[len("optimizer.state.exp_avg."):] for k in stored
            if k.startswith("optimizer.state.exp_avg.")}
    assert adam and adam <= keys

    resumed = megatron_steps(script, "--pipeline-model-parallel-size", "1", "--load", ckpt,
                             "--ckpt-step", "2", "--pipeweaver-schedule", "megatron-1f1b",
                             procs=1, port=29872)
    assert sorted(resumed) == [3, 4], f"resumed run logged {sorted(resumed)} (did it load?)"
    assert resumed[3][0] == pytest.approx(first[3][0], rel=1e-5)
    assert resumed[3][1] == pytest.approx(first[3][1], abs=2e-3)
    assert resumed[4][0] == pytest.approx((first[3][0] + first[4][0]) / 2, rel=1e-5)
    assert resumed[4][1] == pytest.approx(first[4][1], abs=2e-3)
