"""Workload layer: packing properties, generators against their targets, dynamic, traces."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeweaver_megatron.config import ImageRule, VideoRule, load_model
from pipeweaver_megatron.workload import (
    DATASETS, BatchStream, ClipMeta, GlobalBatch, ImageMeta, Microbatch, SampleMeta,
    TokenRules, WorkloadError, dynamic_target, make_source, pack, read_trace, record_trace,
    sample_workload, summarize)

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
RULES = {name: TokenRules.from_model(load_model(name))
         for name in ("VLM-S", "tiny-vlm", "T2V-S", "tiny-t2v")}
IMAGE_SETS = ("laion2b", "obelics", "scienceqa")
VIDEO_SETS = ("sharegpt4video", "internvid", "mmtrail2m")


# --- strategies --------------------------------------------------------------------------

@st.composite
def rules_strategy(draw) -> TokenRules:
    video = None
    if draw(st.booleans()):
        seconds = draw(st.sampled_from([2.0, 4.0, 8.0, 16.0]))
        video = VideoRule(fps=8, max_clip_seconds=seconds,
                          max_clips_per_microbatch=draw(st.integers(1, 6)),
                          max_seconds_per_microbatch=seconds * draw(st.integers(1, 3)),
                          height=32, width=32, temporal_compression=4, spatial_compression=4,
                          patch_size=2, latent_channels=4)
    return TokenRules(model="prop", image_rule=ImageRule(patch_size=4, merge_size=2,
                                                         image_size=32),
                      video_rule=video, microbatch_tokens=draw(st.integers(64, 2000)),
                      max_images_per_microbatch=draw(st.integers(1, 12)))


@st.composite
def sample_strategy(draw, rules: TokenRules, sample_id: int) -> SampleMeta:
    budget = rules.microbatch_tokens
    images = draw(st.lists(st.builds(ImageMeta, height=st.integers(8, 64),
                                     width=st.integers(8, 64)), max_size=4))
    clips = []
    if rules.video_rule is not None:
        longest = rules.video_rule.max_clip_seconds
        clips = draw(st.lists(st.builds(ClipMeta, seconds=st.floats(0.25, longest)),
                              max_size=3))
    return SampleMeta(sample_id=sample_id, text_tokens=draw(st.integers(0, budget // 2)),
                      images=tuple(images), clips=tuple(clips))


def fits_alone(rules: TokenRules, sample: SampleMeta) -> bool:
    try:
        rules.check(sample)
    except WorkloadError:
        return False
    return True


@st.composite
def workload(draw, max_samples: int = 60) -> tuple[TokenRules, list[SampleMeta]]:
    rules = draw(rules_strategy())
    n = draw(st.integers(0, max_samples))
    candidates = [draw(sample_strategy(rules, i)) for i in range(n)]
    kept = [s for s in candidates if fits_alone(rules, s)]
    return rules, [SampleMeta(sample_id=i, text_tokens=s.text_tokens, images=s.images,
                              clips=s.clips) for i, s in enumerate(kept)]


def assert_within_limits(mb: Microbatch, rules: TokenRules) -> None:
    assert mb.samples, "an empty microbatch"
    assert mb.lm_tokens(rules) <= rules.microbatch_tokens
    assert mb.num_images <= rules.max_images_per_microbatch
    assert mb.num_clips <= rules.max_clips_per_microbatch
    assert mb.clip_seconds <= rules.max_seconds_per_microbatch + 1e-9


# --- packing -----------------------------------------------------------------------------

@PROPERTY
@given(workload())
def test_pack_places_every_sample_once_in_order_within_limits(case):
    rules, samples = case
    mbs = pack(samples, rules)
    assert [sid for mb in mbs for sid in mb.sample_ids] == [s.sample_id for s in samples]
    assert [mb.index for mb in mbs] == list(range(len(mbs)))
    for mb in mbs:
        assert_within_limits(mb, rules)
    for this, nxt in itertools.pairwise(mbs):  # next-fit: a microbatch closes only when full
        both = Microbatch(index=0, samples=this.samples + nxt.samples[:1])
        with pytest.raises(AssertionError):
            assert_within_limits(both, rules)


@PROPERTY
@given(workload(max_samples=20), st.data())
def test_oversize_sample_is_an_error_naming_it(case, data):
    rules, samples = case
    where = data.draw(st.integers(0, len(samples)))
    kind = data.draw(st.sampled_from(["tokens", "images"] + (["clips", "seconds"]
                                                             if rules.video_rule else [])))
    big_id = 10_000 + where
    image = ImageMeta(height=8, width=8)  # one LM token: the image cap binds first
    if kind == "tokens":
        big = SampleMeta(sample_id=big_id, text_tokens=rules.microbatch_tokens + 1)
        expected = "more than the microbatch budget"
    elif kind == "images":
        big = SampleMeta(sample_id=big_id, text_tokens=0,
                         images=(image,) * (rules.max_images_per_microbatch + 1))
        expected = "images"
    elif kind == "clips":
        clip = ClipMeta(seconds=rules.max_seconds_per_microbatch / 100)
        big = SampleMeta(sample_id=big_id, text_tokens=1,
                         clips=(clip,) * (rules.max_clips_per_microbatch + 1))
        expected = "video clips"
    else:
        clip = ClipMeta(seconds=rules.video_rule.max_clip_seconds)
        count = math.floor(rules.max_seconds_per_microbatch / clip.seconds) + 1
        big = SampleMeta(sample_id=big_id, text_tokens=1, clips=(clip,) * count)
        expected = "s of video" if count <= rules.max_clips_per_microbatch else "video clips"
    with pytest.raises(WorkloadError, match=f"sample {big_id} ") as err:
        pack(samples[:where] + [big] + samples[where:], rules)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_oversize_message_is_clear():
    rules = RULES["VLM-S"]
    sample = SampleMeta(sample_id=17, text_tokens=8000,
                        images=(ImageMeta(height=364, width=364),) * 6)
    with pytest.raises(WorkloadError) as err:
        pack([sample], rules)
    assert str(err.value) == ("sample 17 needs 9014 LM tokens (8000 text + 1014 image), "
                              "more than the microbatch budget of 8192")


def test_modalities_the_model_lacks_are_errors_naming_the_sample():
    image = ImageMeta(height=364, width=364)
    with pytest.raises(WorkloadError, match="sample 3 has 1 images and needs a vision "
                                            "encoder, but model T2V-S has none"):
        pack([SampleMeta(sample_id=3, text_tokens=5, images=(image,))], RULES["T2V-S"])
    with pytest.raises(WorkloadError, match="sample 4 has 1 video clips and needs a "
                                            "generator, but model VLM-S"):
        pack([SampleMeta(sample_id=4, text_tokens=5, clips=(ClipMeta(seconds=2.0),))],
             RULES["VLM-S"])


@PROPERTY
@given(workload(max_samples=50), st.integers(1, 5), st.booleans())
def test_batch_stream_never_drops_or_duplicates(case, num_microbatches, endless):
    rules, samples = case
    if endless:  # an endless source: stop after a few batches
        source = itertools.chain(samples, (SampleMeta(sample_id=len(samples) + i,
                                                      text_tokens=1) for i in itertools.count()))
        batches = list(itertools.islice(BatchStream(source, rules, num_microbatches), 4))
        assert all(b.num_microbatches == num_microbatches for b in batches)
    else:
        batches = list(BatchStream(iter(samples), rules, num_microbatches))
        assert all(b.num_microbatches == num_microbatches for b in batches[:-1])
        assert not batches or 1 <= batches[-1].num_microbatches <= num_microbatches
        assert sum(len(b.samples) for b in batches) == len(samples)
    ids = [sid for b in batches for sid in b.sample_ids]
    assert ids == list(range(len(ids)))
    assert [b.iteration for b in batches] == list(range(len(batches)))
    for b in batches:
        assert [mb.index for mb in b.microbatches] == list(range(b.num_microbatches))
        for mb in b.microbatches:
            assert_within_limits(mb, rules)


def test_batch_stream_ends_with_stop_iteration():
    rules = RULES["tiny-vlm"]
    stream = BatchStream([SampleMeta(sample_id=i, text_tokens=200) for i in range(5)], rules, 2)
    assert [b.num_microbatches for b in stream] == [2, 2, 1]
    assert stream.exhausted
    with pytest.raises(StopIteration):
        stream.next_batch()


# --- generators --------------------------------------------------------------------------

def within(sampled: np.ndarray, target: float) -> None:
    """Stated tolerance: 4 standard errors of the sampled mean, and at most 15%."""
    err = abs(float(sampled.mean()) - target)
    stderr = float(sampled.std()) / math.sqrt(len(sampled))
    assert err <= 4 * stderr + 1e-9 and err <= 0.15 * max(target, 1e-9), \
        f"sampled mean {sampled.mean():.4f} vs target {target:.4f} (stderr {stderr:.4f})"


@pytest.mark.parametrize("model,name", [(m, d) for m in ("VLM-S", "tiny-vlm") for d in IMAGE_SETS]
                         + [(m, d) for m in ("T2V-S", "tiny-t2v") for d in VIDEO_SETS])
def test_raw_documents_follow_declared_targets(model, name):
    rules, info = RULES[model], DATASETS[name]
    block = info.draw(np.random.default_rng(7), 5000, rules)
    targets = info.targets(rules)
    within(block.text_tokens, targets.mean_text_tokens)
    within(block.num_images, targets.mean_images)
    within(block.clip_seconds, targets.mean_clip_seconds)
    assert (block.clip_seconds > 0).mean() == targets.mean_clips
    assert (block.text_tokens >= 1).all()


@pytest.mark.parametrize("model,name", [("VLM-S", "laion2b"), ("VLM-S", "scienceqa"),
                                        ("tiny-vlm", "laion2b")]
                         + [(m, d) for m in ("T2V-S", "tiny-t2v") for d in VIDEO_SETS])
def test_emitted_samples_follow_targets_where_nothing_is_split(model, name):
    rules = RULES[model]
    samples = list(itertools.islice(make_source(name, rules, seed=3), 4000))
    targets = DATASETS[name].targets(rules)
    within(np.array([s.text_tokens for s in samples]), targets.mean_text_tokens)
    within(np.array([s.num_images for s in samples]), targets.mean_images)
    seconds = np.array([c.seconds for s in samples for c in s.clips] or [0.0])
    within(seconds, targets.mean_clip_seconds)


def test_published_figures():
    vlm = RULES["VLM-S"]
    assert DATASETS["laion2b"].targets(vlm).text_tokens_per_image == pytest.approx(16.4)
    obelics = DATASETS["obelics"].targets(vlm)
    assert obelics.mean_images == pytest.approx(2.5, abs=0.01)
    assert obelics.mean_text_tokens == pytest.approx(816, abs=1)
    assert DATASETS["scienceqa"].targets(vlm).mean_images == pytest.approx(0.487, abs=1e-3)
    assert DATASETS["internvid"].targets(RULES["T2V-S"]).mean_clip_seconds < 11.7
    block = DATASETS["obelics"].draw(np.random.default_rng(0), 20000, vlm)
    ratio = block.text_tokens / block.num_images
    assert ratio.min() >= 0.4 and ratio.max() <= 3115


@pytest.mark.parametrize("model,name", [(m, d) for m in ("VLM-S", "tiny-vlm")
                                        for d in IMAGE_SETS + ("dynamic",)]
                         + [(m, d) for m in ("T2V-S", "tiny-t2v") for d in VIDEO_SETS])
def test_every_generated_sample_fits_and_ids_are_consecutive(model, name):
    rules = RULES[model]
    samples = list(itertools.islice(make_source(name, rules, seed=1), 1500))
    assert [s.sample_id for s in samples] == list(range(len(samples)))
    for s in samples:
        rules.check(s)
    if DATASETS[name].modality == "image" and name != "dynamic":
        size = rules.image_rule.image_size
        assert all(i.height == i.width == size for s in samples for i in s.images)
    if DATASETS[name].modality == "video":
        assert all(s.num_clips == 1 and s.text_tokens >= 1 for s in samples)


def test_obelics_documents_are_split_for_a_tiny_budget_keeping_the_text_image_ratio():
    samples = list(itertools.islice(make_source("obelics", RULES["tiny-vlm"], seed=2), 30000))
    ratio = sum(s.text_tokens for s in samples) / sum(s.num_images for s in samples)
    assert ratio == pytest.approx(815.6 / 2.5035, rel=0.15)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_generators_are_deterministic_per_seed(name):
    rules = RULES["VLM-S" if DATASETS[name].modality == "image" else "T2V-S"]
    def first(seed):
        return list(itertools.islice(make_source(name, rules, seed), 3000))
    assert first(5) == first(5)
    assert first(5) != first(6)


def test_generator_needs_the_right_module_and_a_known_name():
    with pytest.raises(WorkloadError, match="dataset 'obelics' needs a vision encoder"):
        make_source("obelics", RULES["T2V-S"], 0)
    with pytest.raises(WorkloadError, match="dataset 'internvid' needs a generator"):
        make_source("internvid", RULES["VLM-S"], 0)
    with pytest.raises(WorkloadError, match="dynamic.*vision encoder"):
        make_source("dynamic", RULES["tiny-t2v"], 0)
    with pytest.raises(WorkloadError, match="unknown dataset 'coco'.*laion2b"):
        make_source("coco", RULES["VLM-S"], 0)


# --- dynamic -----------------------------------------------------------------------------

def test_dynamic_rises_and_falls_twice_on_vlm_s():
    model = load_model("VLM-S")
    rules = TokenRules.from_model(model)
    batches = sample_workload(model, "dynamic", 40, seed=0)
    means = summarize(batches, rules).mean_images_per_iteration
    assert len(means) == 40
    assert means[0] == means[20] == 0
    for lo, hi in ((5, 11), (25, 31)):
        assert 20 <= max(means[lo:hi]) <= 24
    assert max(means) <= 24 and means[3] < means[7] and means[17] < means[13]
    assert max(mb.num_images for b in batches for mb in b.microbatches) <= 32
    assert all(len(mb.samples) == 1 and mb.lm_tokens(rules) == rules.microbatch_tokens
               for b in batches for mb in b.microbatches)
    assert all(b.num_microbatches == 64 for b in batches)
    assert [dynamic_target(i, rules) for i in (0, 10, 20, 30)] == pytest.approx([0, 22, 0, 22])


def test_dynamic_scales_its_peak_to_a_tiny_model():
    rules = RULES["tiny-vlm"]
    assert dynamic_target(10, rules) == pytest.approx(22 / 32 * 8)
    batches = sample_workload(load_model("tiny-vlm"), "dynamic", 40, seed=1)
    means = summarize(batches, rules).mean_images_per_iteration
    assert means[0] == means[20] == 0
    assert 4.0 <= np.mean(means[8:13]) <= 7.0
    assert max(mb.num_images for b in batches for mb in b.microbatches) <= 8


# --- traces ------------------------------------------------------------------------------

@pytest.mark.parametrize("model,name", [("tiny-vlm", "obelics"), ("VLM-S", "dynamic"),
                                        ("T2V-S", "internvid")])
def test_trace_round_trip(tmp_path, model, name):
    spec = load_model(model)
    batches = sample_workload(spec, name, 3, seed=4)
    path = tmp_path / "sub" / "trace.jsonl"
    assert record_trace(batches, path) == sum(len(b.samples) for b in batches)
    replayed = sample_workload(spec, str(path), 3, seed=999)
    assert replayed == batches
    assert read_trace(path) == [s for b in batches for s in b.samples]


def test_trace_replays_custom_images_and_clips(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"sample_id": 0, "text_tokens": 10, "images": [[480, 640]]}\n\n'
                    '{"sample_id": 1, "text_tokens": 3, "clips": [2.5]}\n')
    samples = read_trace(path)
    assert samples[0].images == (ImageMeta(height=480, width=640),)
    assert samples[1].clips == (ClipMeta(seconds=2.5),)
    record_trace(samples, tmp_path / "again.jsonl")
    assert read_trace(tmp_path / "again.jsonl") == samples


@pytest.mark.parametrize("line,key", [
    ('{"sample_id": 2, "text_tokens": "many"}', "text_tokens"),
    ('{"sample_id": 2}', "text_tokens"),
    ('{"sample_id": -1, "text_tokens": 3}', "sample_id"),
    ('{"sample_id": 2, "text_tokens": 3, "images": [[364]]}', "images"),
    ('{"sample_id": 2, "text_tokens": 3, "clips": [0]}', "clips"),
    ('{"sample_id": 2, "text_tokens": 3, "frames": 8}', "frames"),
    ('{"sample_id": 0, "text_tokens": 3}', "sample_id"),
])
def test_malformed_trace_line_names_file_line_and_key(tmp_path, line, key):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sample_id": 0, "text_tokens": 1}\n{"sample_id": 1, "text_tokens": 1}\n'
                    + line + "\n")
    with pytest.raises(WorkloadError) as err:
        read_trace(path)
    assert f"{path}:3: key '{key}'" in str(err.value)


def test_trace_errors_for_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sample_id": 0, "text_tokens": 1\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl:1: not valid JSON"):
        read_trace(path)
    with pytest.raises(WorkloadError, match="no such trace file"):
        make_source(tmp_path / "missing.jsonl", RULES["VLM-S"], 0)


# --- summary -----------------------------------------------------------------------------

@pytest.mark.parametrize("model,name", [("VLM-S", "laion2b"), ("T2V-S", "sharegpt4video")])
def test_summary_is_consistent_and_serialisable(model, name):
    spec = load_model(model)
    rules = TokenRules.from_model(spec)
    batches = sample_workload(spec, name, 2, seed=0)
    assert all(isinstance(b, GlobalBatch) for b in batches)
    summary = summarize(batches, rules)
    assert summary.iterations == 2 and summary.microbatches == 2 * 64
    assert summary.samples == sum(len(b.samples) for b in batches)
    assert 0 < summary.fill_ratio <= 1
    assert json.loads(json.dumps(summary.to_dict()))["model"] == spec.name
    text = summary.format()
    assert "images per microbatch" in text and spec.name in text
    if name == "laion2b":
        assert summary.text_tokens_per_image == pytest.approx(16.4, rel=0.1)
        assert summary.mean_images_per_microbatch > 40
    else:
        assert summary.clips >= summary.microbatches and "generator" in text
        assert summary.generator_tokens_spread is not None
