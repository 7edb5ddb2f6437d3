"""Layer-spec choice of the LMM chunks: megatron-core's local spec with SDPA core
attention where Transformer Engine or CUDA is missing (this machine, CI), the TE spec
where both are present, and one set of parameter names for checkpoints and references
whichever spec built the chunk ([Note: TE parameter names] in models/layer_specs.py).

The TE chunk itself runs only on a GPU with transformer_engine installed; that test is
skipped elsewhere, with the reason."""

from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from pipeweaver_megatron.config import load_model  # noqa: E402
from pipeweaver_megatron.models import te_usable  # noqa: E402
from pipeweaver_megatron.models.attention import SDPAttention  # noqa: E402
from pipeweaver_megatron.models.data import microbatch_data  # noqa: E402
from pipeweaver_megatron.models.layer_specs import local_name, te_name  # noqa: E402
from pipeweaver_megatron.models.lmm import build_reference  # noqa: E402
from pipeweaver_megatron.workload import TokenRules, sample_workload  # noqa: E402

SEED = 5


pytestmark = pytest.mark.usefixtures("megatron_single_process")


def tensors(chunk) -> dict:
    return {k: v.detach().clone() for k, v in chunk.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_default_spec_follows_what_is_installed(name):
    chunk = build_reference(load_model(name), seed=SEED)
    assert chunk.use_te == te_usable()
    cores = [type(m) for m in chunk.modules() if type(m).__name__.endswith("DotProductAttention")
             or isinstance(m, SDPAttention)]
    assert cores, "no core attention found"
    if not te_usable():
        assert set(cores) == {SDPAttention}


@pytest.mark.skipif(te_usable(), reason="Transformer Engine and CUDA are present here")
def test_te_spec_without_te_is_a_clear_error():
    with pytest.raises(ValueError, match="transformer_engine and a CUDA device"):
        build_reference(load_model("tiny-vlm"), seed=SEED, use_te=True)


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_fused_norm_names_map_both_ways(name):
    chunk = build_reference(load_model(name), seed=SEED, use_te=False)
    names = list(tensors(chunk))
    renamed = {n: te_name(n) for n in names}
    moved = [n for n in names if renamed[n] != n]
    layers = sum(1 for n in names if n.endswith(".input_layernorm.weight"))
    # every layer's two fused norms (weight, and bias under LayerNorm) and nothing else
    assert layers and all(".input_layernorm." in n or ".pre_mlp_layernorm." in n for n in moved)
    assert sum(n.endswith(".pre_mlp_layernorm.weight") for n in moved) == layers
    assert all(local_name(renamed[n]) == n for n in names)
    assert len(set(renamed.values())) == len(names)


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_chunk_loads_a_reference_saved_under_te_names(name):
    """A TE-named state (what a TE run saves) loads into a local chunk by meaning, and
    the chunk then holds exactly the original tensors."""
    model = load_model(name)
    source = tensors(build_reference(model, seed=SEED, use_te=False))
    target = build_reference(model, seed=SEED + 1, use_te=False)
    assert any(not torch.equal(v, source[k]) for k, v in tensors(target).items())
    target.load_from({te_name(k): v for k, v in source.items()})
    got = tensors(target)
    assert got.keys() == source.keys()
    assert all(torch.equal(got[k], source[k]) for k in source)


@pytest.mark.skipif(not te_usable(), reason="needs transformer_engine and a CUDA device")
@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_te_chunk_matches_the_local_reference(name):
    """The same weights through the TE spec and the local spec give the same loss and
    gradients on one packed microbatch (fp32; TE's fused kernels reorder sums)."""
    model = load_model(name)
    rules = TokenRules.from_model(model)
    device = torch.device(torch.cuda.current_device())
    local = build_reference(model, seed=SEED, use_te=False).to(device)
    te = build_reference(model, seed=SEED + 1, use_te=True).load_from(tensors(local)).to(device)
    batch = sample_workload(model, None, 1, seed=3)[0]
    data = microbatch_data(model, batch.microbatches[0], rules, seed=0).to(device)
    results = []
    for chunk in (local, te):
        chunk.zero_grad(set_to_none=True)
        out = chunk({}, data)
        out.loss.backward()
        results.append((out.loss.detach(), {local_name(k): p.grad for k, p in
                                            chunk.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-4)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-3, atol=1e-4, msg=key)


def test_checkpoints_keep_local_names_and_load_under_either(tmp_path):
    """A rank file holds the local spec's names; a file written with TE's names (what a
    run under the TE spec saved before) loads by meaning; a missing tensor is an error
    naming the file."""
    from pipeweaver_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint

    model = load_model("tiny-vlm")
    chunk = build_reference(model, seed=SEED, use_te=False)
    optimizer = torch.optim.Adam(chunk.parameters())
    path = save_checkpoint(str(tmp_path), 0, 3, [chunk], optimizer)
    state = torch.load(path, weights_only=False)
    assert set(state["chunks"][0]) == set(tensors(chunk))
    assert all(local_name(n) == n for n in state["meta"]["params"][0])

    state["chunks"][0] = {te_name(k): v for k, v in state["chunks"][0].items()}
    torch.save(state, path)
    fresh = build_reference(model, seed=SEED + 1, use_te=False)
    assert load_checkpoint(str(tmp_path), 0, [fresh], torch.optim.Adam(fresh.parameters())) == 3
    got, want = tensors(fresh), tensors(chunk)
    assert all(torch.equal(got[k], want[k]) for k in want)

    dropped = next(iter(state["chunks"][0]))
    del state["chunks"][0][dropped]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"rank_00000\.pt: chunk .* does not match"):
        load_checkpoint(str(tmp_path), 0, [fresh], torch.optim.Adam(fresh.parameters()))
