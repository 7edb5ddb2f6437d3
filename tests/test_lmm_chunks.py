"""LMM chunks on real megatron-core layers (CPU, one process): every stage's chunk emits
exactly the tensors ir.messages describes, and chaining the stage chunks of a
layout by hand, with detached tensors and gradients passed between stages as a runtime
would, gives the single-process reference's losses and every gradient, by name."""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from pipeweaver_megatron import schedules  # noqa: E402
from pipeweaver_megatron.config import get_hardware, load_model  # noqa: E402
from pipeweaver_megatron.ir import Part  # noqa: E402
from pipeweaver_megatron.models import init_single_process, teardown  # noqa: E402
from pipeweaver_megatron.models.data import microbatch_data, select  # noqa: E402
from pipeweaver_megatron.models.lmm import LMMChunk, build_reference, stage_chunk  # noqa: E402
from pipeweaver_megatron.planner import partition, split_batch  # noqa: E402
from pipeweaver_megatron.ir.messages import (  # noqa: E402
    merged_inputs, stage_inputs, stage_outputs,
)
from pipeweaver_megatron.semu import CostModel  # noqa: E402
from pipeweaver_megatron.workload import (  # noqa: E402
    ClipMeta, GlobalBatch, ImageMeta, Microbatch, SampleMeta, TokenRules, sample_workload,
)

SEED = 11
SUB_SIZE = {"vision": 1, "dit": 1}  # one image / clip per sub-microbatch: the most messages


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    # One intra-op thread: these tensors are tiny, and on a busy 2-core machine OpenMP
    # threads waiting for a descheduled peer made runs up to 100x slower.
    warnings.filterwarnings("ignore", category=UserWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_single_process(seed=1234)
    yield
    teardown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setups():
    """Per model: spec, rules, reference chunk, and its weights."""
    found = {}
    for name in ("tiny-vlm", "tiny-t2v"):
        model = load_model(name)
        reference = build_reference(model, seed=SEED)
        found[name] = (model, TokenRules.from_model(model), reference,
                       {k: v.clone() for k, v in reference.state_dict().items()
                        if isinstance(v, torch.Tensor)})
    return found


def layouts(model):
    return {"pipeweaver": partition(CostModel(model, get_hardware(model.hardware))).layout,
            "megatron-pp4-vp2": schedules.megatron_layout(model, 4, 2),
            "megatron-pp2": schedules.megatron_layout(model, 2, 1)}


def run_pipeline(model, layout, chunks, microbatch, data, rules, subs):
    """Forward every (stage, sub-microbatch) in stage order, then backward in reverse,
    with detached inputs and output gradients passed between stages. Checks every
    message against ir.messages. Returns (loss sum, tokens)."""
    spec_of = {}
    outputs, leaves, results, order = {}, {}, {}, []
    for stage in layout.stages:
        module = stage.parts[0].module
        for k, members in enumerate(subs.get(module, [None])):
            received = stage_inputs(model, layout, stage.index, microbatch, members, rules,
                                    "float32", subs=subs)
            inputs, mine = defaultdict(list), []
            for message in received:
                for spec in message.tensors:
                    sent = outputs[(message.src, message.sub)][spec.name]
                    assert tuple(sent.shape) == spec.shape, (stage.index, spec)
                    leaf = sent.detach().requires_grad_()
                    mine.append(((message.src, message.sub), spec.name, leaf))
                    inputs[spec.name].append(leaf)
            inputs = {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in inputs.items()}
            want = {t.name: t.shape for t in merged_inputs(received)}
            assert {n: tuple(t.shape) for n, t in inputs.items()} == want
            result = chunks[stage.index](inputs, select(data, module, members))
            spec_of[(stage.index, k)] = stage_outputs(model, layout, stage.index, microbatch,
                                                      members, rules, "float32")
            got = [(n, tuple(t.shape), "float32") for n, t in result.outputs.items()]
            assert got == [(t.name, t.shape, t.dtype) for t in spec_of[(stage.index, k)]], \
                (stage.index, k)
            assert all(t._base is None for t in result.outputs.values())
            outputs[(stage.index, k)], leaves[(stage.index, k)] = result.outputs, mine
            results[(stage.index, k)] = result
            order.append((stage.index, k))
    grads = defaultdict(dict)
    loss, tokens = 0.0, 0
    for key in reversed(order):
        result = results[key]
        if result.loss is not None:
            loss += result.loss.item()
            tokens += result.num_tokens
            result.loss.backward()
        else:
            # An input a chunk did not use (the cond of a microbatch without clips) gets
            # no gradient; a runtime sends zeros for it, as here.
            pairs = [(t, grads[key].get(n, torch.zeros_like(t)))
                     for n, t in result.outputs.items() if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        for src, name, leaf in leaves[key]:
            if leaf.grad is not None:
                before = grads[src].get(name)
                grads[src][name] = leaf.grad if before is None else before + leaf.grad
    return loss, tokens


def reference_run(reference, data):
    result = reference({}, data)
    result.loss.backward()
    return result.loss.item(), result.num_tokens


def assert_same_gradients(reference, chunks):
    owner = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            assert name not in owner, f"{name} on two stages"
            owner[name] = param
    names = dict(reference.named_parameters())
    assert set(owner) == set(names)
    for name, want in names.items():
        got = owner[name].grad
        if want.grad is None:
            assert got is None or not got.any(), name
            continue
        assert got is not None, name
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got, want.grad, rtol=0, atol=1e-5 * scale, msg=name)


def compare(setups, name, layout_name, batch, subs_for=None):
    """Pipeline of one layout vs the reference on every microbatch of batch."""
    model, rules, reference, weights = setups[name]
    layout = layouts(model)[layout_name]
    chunks = [stage_chunk(model, layout, s.index, seed=SEED + 1).load_from(weights)
              for s in layout.stages]
    reference.zero_grad(set_to_none=True)
    split = split_batch(model, batch, rules, subs_for) if subs_for else None
    for m, microbatch in enumerate(batch.microbatches):
        data = microbatch_data(model, microbatch, rules, seed=m)
        subs = {mod: split.members[mod][m] for mod in model.order} if split else {}
        got = run_pipeline(model, layout, chunks, microbatch, data, rules, subs)
        want = reference_run(reference, data)
        assert got[1] == want[1]
        assert got[0] == pytest.approx(want[0], rel=1e-5), (m, got, want)
    assert_same_gradients(reference, chunks)


def workload_batch(model, picks):
    batch = sample_workload(model, "obelics" if model.name == "tiny-vlm" else None, 1, seed=3)[0]
    return GlobalBatch(iteration=0, microbatches=tuple(
        Microbatch(index=i, samples=batch.microbatches[p].samples) for i, p in enumerate(picks)))


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_pipeweaver_layout_with_sub_microbatches_matches_reference(setups, name):
    model = setups[name][0]
    batch = workload_batch(model, [0, 4, 7])
    if name == "tiny-t2v":  # a sample with two clips: each cross-attends its own caption
        two = (SampleMeta(sample_id=70, text_tokens=6, clips=(ClipMeta(seconds=1.5),
                                                              ClipMeta(seconds=2.5))),
               SampleMeta(sample_id=71, text_tokens=11, clips=(ClipMeta(seconds=3.0),)))
        batch = GlobalBatch(iteration=0, microbatches=batch.microbatches + (
            Microbatch(index=3, samples=two),))
    compare(setups, name, "pipeweaver", batch, SUB_SIZE)
    for weight, param in setups[name][2].named_parameters():  # the reference
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient: {weight}"


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
@pytest.mark.parametrize("layout_name", ["megatron-pp4-vp2", "megatron-pp2"])
def test_megatron_layout_matches_reference(setups, name, layout_name):
    model = setups[name][0]
    compare(setups, name, layout_name, workload_batch(model, [1, 5]))


def edge_batch(model, rules):
    """A text-only microbatch, one with the most images (of several sizes, one sample
    without any), and one mixing both."""
    cap = rules.max_images_per_microbatch
    sizes = [(32, 32), (16, 48), (48, 16), (40, 40), (8, 8), (32, 24), (24, 64), (16, 16)]
    images = tuple(ImageMeta(height=h, width=w) for h, w in (sizes * cap)[:cap])
    full = (SampleMeta(sample_id=900, text_tokens=20, images=images[:5]),
            SampleMeta(sample_id=901, text_tokens=0, images=images[5:]),
            SampleMeta(sample_id=902, text_tokens=9))
    text_only = (SampleMeta(sample_id=910, text_tokens=40), SampleMeta(sample_id=911,
                                                                       text_tokens=17))
    mixed = (SampleMeta(sample_id=920, text_tokens=30),
             SampleMeta(sample_id=921, text_tokens=12, images=images[:1]))
    micro = [Microbatch(index=i, samples=s) for i, s in enumerate((text_only, full, mixed))]
    assert micro[1].num_images == cap
    return GlobalBatch(iteration=0, microbatches=tuple(micro))


@pytest.mark.parametrize("layout_name", ["pipeweaver", "megatron-pp4-vp2"])
def test_no_images_and_the_most_images(setups, layout_name):
    model, rules = setups["tiny-vlm"][:2]
    compare(setups, "tiny-vlm", layout_name, edge_batch(model, rules),
            SUB_SIZE if layout_name == "pipeweaver" else None)


@pytest.mark.parametrize("layout_name", ["pipeweaver", "megatron-pp4-vp2"])
def test_t2v_microbatch_without_clips(setups, layout_name):
    """No clips: no DiT work on the modality-aware layout; Megatron's mixed stage passes
    empty DiT states through and the loss is an empty sum."""
    model, rules = setups["tiny-t2v"][:2]
    batch = GlobalBatch(iteration=0, microbatches=(
        Microbatch(index=0, samples=(SampleMeta(sample_id=40, text_tokens=13),)),
        Microbatch(index=1, samples=(SampleMeta(sample_id=41, text_tokens=5,
                                                clips=(ClipMeta(seconds=1.0),)),))))
    compare(setups, "tiny-t2v", layout_name, batch,
            SUB_SIZE if layout_name == "pipeweaver" else None)


def test_chunks_built_with_the_reference_seed_hold_its_weights(setups):
    model, _, reference, weights = setups["tiny-vlm"]
    layout = layouts(model)["megatron-pp4-vp2"]
    for stage in layout.stages:
        for name, tensor in stage_chunk(model, layout, stage.index, seed=SEED).state_dict().items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, weights[name]), name


def test_packed_samples_do_not_attend_across_boundaries(setups):
    """Perturbing the second sample (its tokens and images; for a DiT its clip's
    latents and its caption) leaves the first sample's outputs unchanged."""
    model, rules = setups["tiny-vlm"][:2]
    first = SampleMeta(sample_id=1, text_tokens=30, images=(ImageMeta(height=32, width=32),))
    second = SampleMeta(sample_id=2, text_tokens=25, images=(ImageMeta(height=16, width=32),))
    microbatch = Microbatch(index=0, samples=(first, second))
    chunk = LMMChunk(model, (Part("vision", 0, 8), Part("projector", 0, 1), Part("lm", 0, 7)))
    data = microbatch_data(model, microbatch, rules)
    split = rules.lm_tokens(first)
    text = data.text
    tokens = text.tokens.clone()
    tokens[split:] = (tokens[split:] + 6) % 2047 + 1
    tokens[text.image_positions] = 0
    patches = data.images.patches.clone()
    patches[data.images.encoder_tokens[0]:] += 1.0
    other = replace(data, text=replace(text, tokens=tokens),
                    images=replace(data.images, patches=patches))
    with torch.no_grad():
        a = chunk({}, data).outputs["hidden"]
        b = chunk({}, other).outputs["hidden"]
    torch.testing.assert_close(a[:split], b[:split], atol=1e-6, rtol=0)
    assert not torch.allclose(a[split:], b[split:])

    t2v, t2v_rules = setups["tiny-t2v"][:2]
    samples = (SampleMeta(sample_id=5, text_tokens=12, clips=(ClipMeta(seconds=2.0),
                                                               ClipMeta(seconds=1.0))),
               SampleMeta(sample_id=6, text_tokens=9, clips=(ClipMeta(seconds=1.0),)))
    data = microbatch_data(t2v, Microbatch(index=0, samples=samples), t2v_rules)
    chunk = LMMChunk(t2v, (Part("lm", 0, 8), Part("dit", 0, 4)))
    clip_split = sum(data.clips.lengths[:2])
    text_split = data.text.sample_lengths[0]
    tokens = data.text.tokens.clone()
    tokens[text_split:] = (tokens[text_split:] + 2) % 2047 + 1
    latents = data.clips.latents.clone()
    latents[clip_split:] += 1.0
    other = replace(data, text=replace(data.text, tokens=tokens),
                    clips=replace(data.clips, latents=latents))
    with torch.no_grad():
        a, b = chunk({}, data).outputs, chunk({}, other).outputs
    torch.testing.assert_close(a["hidden"][:clip_split], b["hidden"][:clip_split], atol=1e-6,
                               rtol=0)
    assert not torch.allclose(a["hidden"][clip_split:], b["hidden"][clip_split:])
    torch.testing.assert_close(a["cond"][:text_split], b["cond"][:text_split], atol=1e-6, rtol=0)


def test_data_is_regenerated_identically_and_selects_sub_microbatches(setups):
    model, rules = setups["tiny-vlm"][:2]
    microbatch = workload_batch(model, [4]).microbatches[0]
    a, b = (microbatch_data(model, microbatch, rules, seed=2) for _ in range(2))
    assert torch.equal(a.text.tokens, b.text.tokens) and torch.equal(a.images.patches,
                                                                     b.images.patches)
    moved = a.to(a.text.tokens.device)
    assert moved is not a and torch.equal(moved.images.positions, a.images.positions)
    alone = Microbatch(index=0, samples=microbatch.samples[-1:])
    c = microbatch_data(model, alone, rules, seed=2)
    n = c.text.tokens.numel()
    assert torch.equal(c.text.tokens, a.text.tokens[-n:]), "a sample's data depends on its packing"
    text = a.text
    assert (text.tokens[text.image_positions] == 0).all()
    assert text.image_positions.numel() == microbatch.image_lm_tokens(rules)
    assert text.loss_mask[text.image_positions - 1].sum() == 0, "loss on predicting an image"
    assert text.cu_seqlens.tolist()[-1] == microbatch.lm_tokens(rules)
    sub = select(a, "vision", (1, 2))
    assert sub.images.indices == (1, 2)
    assert sub.images.cu_seqlens.tolist() == [0, 64, 128]
    assert torch.equal(sub.images.patches, a.images.patches[64:192])
    with pytest.raises(ValueError, match="never split"):
        select(a, "lm", (0,))


def test_sequence_parallel_shapes_divide_the_sequence(setups):
    model, rules = setups["tiny-t2v"][:2]
    layout = layouts(model)["pipeweaver"]
    microbatch = workload_batch(model, [0]).microbatches[0]
    s = microbatch.lm_tokens(rules)
    dit = next(st.index for st in layout.stages if st.parts[0].module == "dit")
    specs = stage_outputs(model, layout, dit, microbatch, None, rules, "bfloat16", tp=2,
                          sequence_parallel=True)
    assert [(t.name, t.shape, t.dtype) for t in specs] == [
        ("hidden", (-(-microbatch.generator_tokens(rules) // 2), 1, 96), "bfloat16"),
        ("cond", (-(-s // 2), 1, 128), "bfloat16")]
    # as Megatron's --sequence-parallel, it means nothing without tensor parallelism
    assert not build_reference(model, sequence_parallel=True).sequence_parallel
