"""Real data on disk: `pipeweaver data prepare` / `stats`, Energon reading, tokenizers.

Datasets are made here from a few of scikit-image's bundled photographs and pydoc's text.
Every count is checked against what the test computes itself from samples.jsonl and the
image files (PIL), never against the data layer's own bookkeeping; the BPE is checked
against Megatron-LM's own HuggingFaceTokenizer; reading goes through Energon.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeweaver_megatron.cli.main import main
from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.data import DataError
from pipeweaver_megatron.data.prepare import prepare_dataset
from pipeweaver_megatron.data.reader import EnergonReader
from pipeweaver_megatron.data.stats import dataset_stats, read_stats
from pipeweaver_megatron.data.tokenizer import (IMAGE, BpeTokenizer, ByteTokenizer, python_text,
                                                 train_bpe)

from megatron_lm import source as megatron_lm_source

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "coins")


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]


def _texts(count: int) -> list[str]:
    out = []
    for text in python_text():
        if 30 <= len(text) <= 160:
            out.append(text)
        if len(out) == count:
            return out
    raise AssertionError("pydoc has too few paragraphs")


def _save(folder: Path, name: str, photo: np.ndarray, size: tuple[int, int]) -> str:
    """A crop of the photo resized to size (h, w); saved as JPEG or PNG by the name."""
    h, w = photo.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(photo[h // 4:, w // 5:])).resize(size[::-1])
    img.save(folder / name)
    return name


def _write_jsonl(folder: Path, records: list[dict]) -> None:
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def photos():
    return [_photo(n) for n in PHOTOS]


@pytest.fixture(scope="module")
def captioning_src(tmp_path_factory, photos) -> Path:
    folder = tmp_path_factory.mktemp("cap-src")
    records = []
    for i, text in enumerate(_texts(12)):
        name = _save(folder, f"p{i}.{'jpg' if i % 3 else 'png'}", photos[i % len(photos)],
                     (16 + 4 * i, 60 - 3 * i))
        records.append({"key": f"k{i:02d}", "image": name, "caption": text, "n": i})
    _write_jsonl(folder, records)
    return folder


@pytest.fixture(scope="module")
def interleaved_src(tmp_path_factory, photos) -> Path:
    folder = tmp_path_factory.mktemp("doc-src")
    texts = iter(_texts(40))
    records = []
    for d in range(8):
        content = [{"text": next(texts)}]
        for j in range(d % 4):  # 0 to 3 images per document
            name = _save(folder, f"d{d}-{j}.jpg", photos[(d + j) % len(photos)],
                         (20 + 5 * j, 24 + 2 * d))
            content += [{"image": name}, {"text": next(texts)}]
        records.append({"key": f"doc{d}", "content": content})
    _write_jsonl(folder, records)
    return folder


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe(folder)
    return folder


@pytest.fixture(scope="module")
def captioning(tmp_path_factory, captioning_src) -> Path:
    out = tmp_path_factory.mktemp("cap") / "ds"
    prepare_dataset(captioning_src, out, kind="captioning", shard_size=2,
                    splits="train=0.5,val=0.5")
    return out


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory, interleaved_src) -> Path:
    out = tmp_path_factory.mktemp("doc") / "ds"
    prepare_dataset(interleaved_src, out, kind="interleaved", shard_size=2,
                    splits="train=0.75,val=0.25")
    return out


def _records(src: Path) -> list[dict]:
    return [json.loads(line) for line in (src / "samples.jsonl").read_text().splitlines()]


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def test_captioning_stats_equal_the_jsonl_counts(captioning, captioning_src, bpe):
    tok = BpeTokenizer(bpe)
    records = _records(captioning_src)
    want = {r["key"]: (len(tok.encode(r["caption"])), (_image_size(captioning_src / r["image"]),))
            for r in records}
    stats, kind = read_stats(captioning, tok)
    assert kind == "captioning"
    assert {s.key: (s.text_tokens, s.image_sizes) for s in stats} == want
    assert len(stats) == len(want)  # each sample read once

    summary = dataset_stats(captioning, tokenizer=str(bpe))
    assert summary.samples == len(records) and summary.images == len(records)
    assert summary.text_tokens_per_sample.max == max(t for t, _ in want.values())
    assert summary.image_height.min == min(s[0][0] for _, s in want.values())
    # encoder tokens per image straight from the model's image rule
    rule = load_model("tiny-vlm").modules_of("vision_encoder")[0].image
    enc = [rule.encoder_tokens(h, w) for _, ((h, w),) in want.values()]
    assert summary.encoder_tokens_per_image.max == max(enc)
    assert summary.packed.samples + len(summary.over_limit) == len(records)
    assert summary.packed.max_encoder_tokens_per_microbatch <= sum(enc)


def test_interleaved_samples_keep_content_order(interleaved, interleaved_src, bpe):
    tok = BpeTokenizer(bpe)
    records = {r["key"]: r for r in _records(interleaved_src)}
    seen = set()
    for split in ("train", "val"):
        for sample in EnergonReader(interleaved, split=split):
            record = records[sample.key]
            seen.add(sample.key)
            kinds = ["text" if isinstance(x, str) else "image" for x in sample.sequence]
            assert kinds == [next(iter(item)) for item in record["content"]]
            assert list(sample.texts) == [i["text"] for i in record["content"] if "text" in i]
            assert list(sample.image_sizes) == [_image_size(interleaved_src / i["image"])
                                                for i in record["content"] if "image" in i]
    assert seen == set(records)
    stats = dataset_stats(interleaved, tokenizer=str(bpe))
    images = [sum("image" in i for i in r["content"]) for r in records.values()]
    tokens = [sum(len(tok.encode(i["text"])) for i in r["content"] if "text" in i)
              for r in records.values()]
    assert (stats.samples, stats.images) == (len(records), sum(images))
    assert (stats.images_per_sample.min, stats.images_per_sample.max) == (0, 3)
    assert stats.text_tokens_per_sample.mean == pytest.approx(sum(tokens) / len(tokens))


def test_splits_are_disjoint_and_cover_every_key(captioning, captioning_src):
    keys = {r["key"] for r in _records(captioning_src)}
    per_split = {split: [s.key for s in EnergonReader(captioning, split=split)]
                 for split in ("train", "val")}
    train, val = (set(per_split[s]) for s in ("train", "val"))
    assert train and val and not train & val
    assert train | val == keys
    assert sum(len(v) for v in per_split.values()) == len(keys)


def test_two_dp_ranks_read_disjoint_samples_covering_the_split(captioning):
    split = [s.key for s in EnergonReader(captioning, split="train")]
    ranks = [[s.key for s in EnergonReader(captioning, split="train", rank=r, world_size=2)]
             for r in (0, 1)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(split)


def test_loader_state_resumes_with_the_next_samples(captioning):
    def reader():
        return EnergonReader(captioning, split="train", shuffle_buffer=3,
                             max_samples_per_sequence=2, repeat=True, seed=5)

    first = reader()
    stream = iter(first)
    [next(stream) for _ in range(4)]
    state = first.save_state()
    expected = [next(stream).key for _ in range(6)]
    resumed = reader()
    resumed.restore_state(state)
    stream = iter(resumed)
    assert [next(stream).key for _ in range(6)] == expected


def _corrupt(folder: Path, records: list[dict]) -> None:
    path = folder / records[3]["image"]
    path.write_bytes(path.read_bytes()[:40])  # a truncated image file


def _unlink(folder: Path, records: list[dict]) -> None:
    (folder / records[1]["image"]).unlink()


BAD = {  # name -> (edit of a copy of the source, line, key, a fragment of the reason)
    "corrupt image": (_corrupt, 4, "k03", "does not decode"),
    "missing field": (lambda f, r: r[5].pop("caption"), 6, "k05", "missing field 'caption'"),
    "duplicate key": (lambda f, r: r[7].update(key="k02"), 8, "k02",
                      "duplicate key (first on line 3)"),
    "missing image": (_unlink, 2, "k01", "no such file"),
    "empty caption": (lambda f, r: r[0].update(caption="  "), 1, "k00", "caption is empty"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_names_file_key_and_reason_and_writes_nothing(case, captioning_src, tmp_path):
    edit, line, key, reason = BAD[case]
    src = tmp_path / "src"
    src.mkdir()
    for f in captioning_src.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    records = _records(captioning_src)
    edit(src, records)
    _write_jsonl(src, records)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(DataError) as err:
        prepare_dataset(src, out_parent / "ds", kind="captioning", shard_size=2)
    message = str(err.value)
    assert f"{src / 'samples.jsonl'}:{line}" in message, message
    assert repr(key) in message and reason in message, message
    assert list(out_parent.iterdir()) == []


def test_an_empty_split_is_refused_and_writes_nothing(captioning_src, tmp_path, capsys):
    # 12 samples in one shard of 12: Energon's whole-shard split leaves one split empty
    code = main(["data", "prepare", str(captioning_src), "--out", str(tmp_path / "ds"),
                 "--shard-size", "12", "--split", "train=0.9,val=0.1"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"--split: split '(train|val)' gets no shard", err), err
    assert list(tmp_path.iterdir()) == []
    # without --shard-size the size is chosen so that every split gets a shard
    code = main(["data", "prepare", str(captioning_src), "--out", str(tmp_path / "ds"),
                 "--split", "train=0.9,val=0.1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and all(s["samples"] > 0 for s in result["splits"].values())
    assert sum(s["samples"] for s in result["splits"].values()) == 12


def test_stats_cli_json(captioning, captioning_src, capsys):
    assert main(["data", "stats", str(captioning), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    records = _records(captioning_src)
    assert stats["samples"] == len(records)
    # byte-level tokenizer by default: one id per UTF-8 byte
    assert stats["text_tokens_per_sample"]["max"] == max(len(r["caption"].encode()) for r in records)


def test_bpe_round_trips_and_matches_megatrons_huggingface_tokenizer(bpe):
    tok = BpeTokenizer(bpe)
    texts = _texts(20) + ["naïve café — ünïcode ✓", f"look {IMAGE} here{IMAGE}"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.image_token_id in tok.encode(f"a {IMAGE} b")
    assert tok.vocab_size == 2048
    assert sum(len(tok.encode(t)) for t in texts[:20]) < sum(len(t) for t in texts[:20]) / 2

    sys.path.insert(0, str(megatron_lm_source()))
    try:
        from megatron.training.tokenizer.tokenizer import _HuggingFaceTokenizer
    finally:
        sys.path.pop(0)
    reference = _HuggingFaceTokenizer(str(bpe))
    assert reference.vocab_size == tok.vocab_size
    assert reference.vocab[IMAGE] == tok.image_token_id
    for text in texts:
        assert reference.tokenize(text) == tok.encode(text)


def test_byte_tokenizer_needs_no_file():
    tok = ByteTokenizer()
    text = f"héllo {IMAGE} wörld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids.count(tok.image_token_id) == 1
    assert len(ids) == len(text.replace(IMAGE, "").encode()) + 1
    assert max(ids) < tok.vocab_size == 260


def test_demo_is_deterministic_and_fits_tiny_vlm(tmp_path):
    from pipeweaver_megatron.data.demo import build_demo

    runs = [build_demo(tmp_path / f"run{i}", captioning=12, interleaved=8) for i in (0, 1)]
    for kind in ("captioning", "interleaved"):
        files = [sorted((r.root / "src" / kind).rglob("*")) for r in runs]
        assert [f.relative_to(runs[0].root) for f in files[0]] == \
            [f.relative_to(runs[1].root) for f in files[1]]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*files) if a.is_file())
        stats = dataset_stats(runs[0].root / kind)  # byte-level: the most text tokens
        records = _records(runs[0].root / "src" / kind)
        assert stats.samples == len(records) and stats.over_limit == ()
        assert stats.image_height.max <= 64


def test_stats_of_a_metadataset_blending_both_kinds(captioning, interleaved, interleaved_src,
                                                    tmp_path):
    meta = tmp_path / "blend.yaml"
    meta.write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
        f"    blend_epochized:\n      - repetitions: 1\n        path: {captioning}\n"
        f"      - repetitions: 1\n        path: {interleaved}\n")
    train = {d: {s.key for s in EnergonReader(d, split="train")}
             for d in (captioning, interleaved)}
    stats = dataset_stats(meta)
    assert stats.kind == "captioning+interleaved"
    assert stats.splits == {"train": len(train[captioning]) + len(train[interleaved])}
    images = {r["key"]: sum("image" in i for i in r["content"]) for r in _records(interleaved_src)}
    assert stats.images == len(train[captioning]) + sum(images[k] for k in train[interleaved])


def test_samples_over_the_budget_are_named_and_left_out(captioning, captioning_src, write_spec):
    budget = 120
    spec = write_spec("tiny-vlm", lambda d: d["parallel"].update(microbatch_tokens=budget))
    rule = load_model("tiny-vlm").modules_of("vision_encoder")[0].image
    want = []
    for r in _records(captioning_src):
        h, w = _image_size(captioning_src / r["image"])
        if len(r["caption"].encode()) + rule.lm_tokens(h, w) > budget:
            want.append(r["key"])
    stats = dataset_stats(captioning, model=str(spec))
    assert want and sorted(stats.over_limit) == sorted(want)
    assert stats.packed.samples == stats.samples - len(want)
    assert f"{len(want)} samples exceed a microbatch limit" in stats.format()


def _copy_dataset(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _zero_an_image(dataset: Path, shard: str) -> str:
    """Overwrite one image's bytes inside a shard (same length); its key."""
    path = dataset / shard
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
    data = bytearray(path.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = bytes(member.size)
    path.write_bytes(bytes(data))
    return member.name.split(".", 1)[0]


def test_an_image_that_no_longer_decodes_is_named_or_skipped_and_counted(captioning,
                                                                         tmp_path):
    dataset = _copy_dataset(captioning, tmp_path / "ds")
    shard = yaml.safe_load((dataset / ".nv-meta" / "split.yaml").read_text())
    shard = sorted(braceexpand.braceexpand(shard["split_parts"]["train"][0]))[0]
    key = _zero_an_image(dataset, shard)
    with pytest.raises(DataError) as err:
        list(EnergonReader(dataset, split="train"))
    assert f"{dataset / shard}: sample {key!r}" in str(err.value)
    clean = {s.key for s in EnergonReader(captioning, split="train")}
    reader = EnergonReader(dataset, split="train", skip_bad_samples=1)
    assert {s.key for s in reader} == clean - {key}
    assert [(b.key, b.shard) for b in reader.skipped] == [(key, shard)]


def test_a_truncated_shard_is_named(captioning, tmp_path):
    dataset = _copy_dataset(captioning, tmp_path / "ds")
    shards = yaml.safe_load((dataset / ".nv-meta" / "split.yaml").read_text())["split_parts"]
    shard = sorted(braceexpand.braceexpand(shards["val"][-1]))[-1]
    with open(dataset / shard, "r+b") as handle:
        handle.truncate(3000)
    with pytest.raises(DataError) as err:
        list(EnergonReader(dataset, split="val"))
    assert str(err.value).startswith(f"{dataset / shard}: unreadable shard")
