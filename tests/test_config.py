"""Config layer: shipped specs load, match published sizes, and broken specs are rejected
with file, key and reason."""

from __future__ import annotations

import pytest

from pipeweaver_megatron.config import (PROFILES, ConfigError, ModuleKind, get_hardware,
                                        list_models, load_model, resolve_model)

PAPER_SETUPS = ["vlm-s", "vlm-m", "vlm-l", "t2v-s", "t2v-l", "vlm-xl-8k", "vlm-xl-16k",
                "t2v-xl-3k", "t2v-xl-6k"]


def test_every_shipped_setup_loads():
    names = list_models()
    for name in PAPER_SETUPS + ["tiny-vlm", "tiny-t2v"]:
        assert name in names
    for name in names:
        model = load_model(name)
        assert model.order[-1] in {m.name for m in model.modules}


@pytest.mark.parametrize("setup,module,published", [
    # Published parameter counts: Llama 3 8B model card (8.03B), Qwen2-72B (72.7B),
    # ViT-22B paper (21.743B), GPT-3 paper (175B).
    ("vlm-s", "lm", 8.03e9),
    ("vlm-l", "lm", 72.7e9),
    ("vlm-l", "vision", 21.743e9),
    ("vlm-xl-8k", "lm", 175.0e9),
])
def test_parameter_counts_match_published_models(setup, module, published):
    model = load_model(setup)
    assert model.module_params(module) == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("setup,module,nominal", [
    # The paper names these by rounded size: ViT 5B, Qwen2 32B, DiT 5B, DiT 30B.
    ("vlm-s", "vision", 5e9), ("vlm-m", "lm", 32e9), ("t2v-s", "dit", 5e9),
    ("t2v-l", "dit", 30e9),
])
def test_parameter_counts_match_paper_names(setup, module, nominal):
    assert load_model(setup).module_params(module) == pytest.approx(nominal, rel=0.15)


def test_paper_setups_parallel_settings():
    expected = {"vlm-s": (4, 4, 16), "vlm-m": (8, 4, 32), "vlm-l": (8, 8, 64),
                "t2v-s": (4, 4, 16), "t2v-l": (8, 8, 64), "vlm-xl-8k": (8, 8, 8192),
                "vlm-xl-16k": (8, 16, 16384), "t2v-xl-3k": (8, 4, 3072),
                "t2v-xl-6k": (8, 8, 6144)}
    for name, (tp, pp, gpus) in expected.items():
        par = load_model(name).parallel
        assert (par.tp, par.pp, par.world_size) == (tp, pp, gpus), name


def test_image_rule_gives_the_papers_169_tokens(vlm_s):
    rule = vlm_s.module("vision").image
    assert rule.encoder_tokens(364, 364) == 676
    assert rule.lm_tokens(364, 364) == 169
    # Resizing rounds to whole 28-pixel merge windows: 400x300 -> 14x11 windows.
    assert rule.lm_tokens(400, 300) == 14 * 11


def test_video_rule_movie_gen_style():
    dit = load_model("t2v-s").module("dit")
    rule = dit.video
    # 16 s at 16 fps = 256 frames -> 32 latent frames of (512/8/2)^2 = 1024 tokens.
    assert rule.tokens(16) == 32 * 1024
    assert rule.tokens(0.1) == 1024


def test_tiny_models_fit_a_cpu_and_pp4_with_two_chunks():
    for name in ("tiny-vlm", "tiny-t2v"):
        model = load_model(name)
        assert 1e6 <= model.total_params <= 10e6, model.total_params
        assert model.parallel.pp == 4 and model.parallel.vp == 2
        for module in model.modules:
            if module.is_transformer:
                assert module.num_layers >= 8


def test_resolve_by_name_any_case_and_by_path(tmp_path):
    assert resolve_model("VLM-S") == resolve_model("vlm-s")
    path = resolve_model("tiny-vlm")
    assert load_model(str(path)).name == "tiny-vlm"


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError, match="known: .*vlm-s"):
        load_model("no-such-model")


def test_hardware_profiles():
    for name in ("H800", "H100", "H200", "A100", "H20", "cpu"):
        profile = get_hardware(name)
        assert profile.peak_flops > 0 and profile.memory_capacity > 0
    assert get_hardware("h100").peak_flops == 989e12
    assert PROFILES["H800"].intra_node_bandwidth < PROFILES["H100"].intra_node_bandwidth
    assert not PROFILES["cpu"].can_offload and PROFILES["H100"].can_offload


def _module(data, name):
    return next(m for m in data["modules"] if m["name"] == name)


BROKEN = [
    ("unknown top-level key", "vlm-s", lambda d: d.update(pipeline=3), "pipeline", "unknown key"),
    ("unknown module key", "tiny-vlm", lambda d: _module(d, "lm").update(num_layer=4),
     "modules[2].num_layer", "unknown key"),
    ("heads do not divide hidden", "tiny-vlm",
     lambda d: _module(d, "lm").update(num_attention_heads=3),
     "modules[2].num_attention_heads", "do not divide hidden_size 128"),
    ("groups do not divide heads", "tiny-vlm",
     lambda d: _module(d, "lm").update(num_query_groups=3),
     "modules[2].num_query_groups", "do not divide 4 attention heads"),
    ("pp larger than layers", "tiny-vlm", lambda d: d["parallel"].update(pp=9),
     "parallel.pp", "pp=9 is larger than the 8 layers"),
    ("tp does not divide heads", "tiny-vlm", lambda d: d["parallel"].update(tp=3),
     "parallel.tp", "tp=3 does not divide the 4 heads"),
    ("wrong type", "tiny-vlm", lambda d: d["parallel"].update(tp="two"),
     "parallel.tp", "expected an integer"),
    ("bad kind", "tiny-vlm", lambda d: _module(d, "lm").update(kind="decoder"),
     "modules[2].kind", "not one of"),
    ("unknown component", "vlm-s", lambda d: d["modules"][0].update(component="vit-9b"),
     "modules[0].component", "unknown component"),
    ("topology names a missing module", "tiny-vlm",
     lambda d: d.update(topology=["vision -> projector -> llm"]), "topology", "unknown module"),
    ("cycle", "tiny-t2v", lambda d: d.update(topology=["lm -> dit -> lm"]), "topology", "cycle"),
    ("projector width", "tiny-vlm", lambda d: _module(d, "projector").update(input_size=100),
     "modules", "input_size 100"),
    ("negative global batch", "tiny-vlm", lambda d: d["parallel"].update(global_batch_size=0),
     "parallel.global_batch_size", "must be >= 1"),
    ("image rule key", "tiny-vlm",
     lambda d: _module(d, "vision")["image"].update(patch=4), "modules[0].image.patch",
     "unknown key"),
    ("missing key", "tiny-vlm", lambda d: d.pop("parallel"), "parallel", "missing"),
]


@pytest.mark.parametrize("label,base,edit,key,reason", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_spec_names_file_key_and_reason(write_spec, label, base, edit, key, reason):
    path = write_spec(base, edit)
    with pytest.raises(ConfigError) as info:
        load_model(str(path))
    message = str(info.value)
    assert str(path) in message
    assert info.value.key.startswith(key), message
    assert reason in message


def test_yaml_syntax_error_names_file_and_line(write_spec):
    path = write_spec("tiny-vlm", text="name: x\nmodules: [\n  - {a: 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+") as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_component_file_errors_name_the_component(tmp_path, monkeypatch):
    from pipeweaver_megatron.config import loader

    comp = tmp_path / "components"
    comp.mkdir()
    (comp / "bad.yaml").write_text("kind: language_model\nnum_layerz: 3\n")
    (tmp_path / "m.yaml").write_text(
        "name: m\nmodules: [{name: lm, component: bad}]\ntopology: []\nparallel: {}\n")
    monkeypatch.setattr(loader, "config_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="bad.yaml: num_layerz: unknown key"):
        load_model(str(tmp_path / "m.yaml"))


def test_module_kinds_of_paper_setups():
    vlm = load_model("vlm-m")
    assert [m.kind for m in map(vlm.module, vlm.order)] == [
        ModuleKind.VISION_ENCODER, ModuleKind.PROJECTOR, ModuleKind.LANGUAGE_MODEL]
    t2v = load_model("t2v-l")
    assert [m.kind for m in map(t2v.module, t2v.order)] == [
        ModuleKind.LANGUAGE_MODEL, ModuleKind.GENERATOR]
    assert t2v.module("dit").cross_attention and t2v.condition_hidden("dit") == 5120


def test_fixed_tiles_ignore_the_image_size_and_count_class_tokens():
    from pipeweaver_megatron.config import ImageRule, SpecError

    clip = ImageRule(patch_size=14, merge_size=1, fixed_height=336, fixed_width=336,
                     class_tokens=1)
    assert clip.encoder_tokens(77, 1000) == clip.encoder_tokens(336, 336) == 24 * 24 + 1
    assert clip.lm_tokens(10, 10) == 577
    dropped = ImageRule(patch_size=14, merge_size=1, fixed_height=336, fixed_width=224,
                        class_tokens=1, drop_class_tokens=True)
    assert (dropped.encoder_tokens(1, 1), dropped.lm_tokens(1, 1)) == (24 * 16 + 1, 24 * 16)
    for bad, key in ((dict(fixed_height=336), "fixed_height"),
                     (dict(class_tokens=1, merge_size=2), "class_tokens"),
                     (dict(drop_class_tokens=True), "drop_class_tokens"),
                     (dict(fixed_height=8, fixed_width=8, patch_size=14, merge_size=1),
                      "fixed_height")):
        with pytest.raises(SpecError) as error:
            ImageRule(**bad)
        assert error.value.key == key
