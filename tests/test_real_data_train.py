"""scripts/pretrain_lmm.py on a real prepared dataset (--data-path) under torchrun on CPU.

A small captioning dataset is made here from scikit-image's photographs (PNG, so the
pixels a test decodes itself are the shard's) and pydoc's text, prepared for Energon.
Checked against what the test computes itself: the split's keys from the tar shards
Energon's split.yaml names, token ids from the `tokenizers` library, LM token counts from
the image sizes (PIL) and patches from numpy slices of the PIL-resized image; a resumed
run against the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeweaver_megatron.cli.main import main as cli_main
from pipeweaver_megatron.config import load_model
from pipeweaver_megatron.data import DataError
from pipeweaver_megatron.data.loader import BatchLoader
from pipeweaver_megatron.data.prepare import prepare_dataset
from pipeweaver_megatron.data.tokenizer import BpeTokenizer, ByteTokenizer, python_text, train_bpe
from pipeweaver_megatron.models.real_data import real_microbatch_data
from pipeweaver_megatron.workload import TokenRules, sample_workload

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera")
PATCH, MERGE = 4, 2  # tiny-vlm's vision rule (model_configs/tiny-vlm.yaml)


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]


def make_source(folder: Path, count: int, long_caption: int | None = None) -> list[dict]:
    """count captioning records (PNG images of 16-64 px sides, pydoc captions of 30-150
    characters); record `long_caption` gets a caption over tiny-vlm's 256-token budget."""
    (folder / "images").mkdir(parents=True)
    texts = [t for t in python_text() if 30 <= len(t) <= 150][:count]
    photos = [_photo(n) for n in PHOTOS]
    rng = np.random.default_rng(7)
    records = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = (int(v) for v in rng.integers(16, 65, size=2))
        Image.fromarray(np.ascontiguousarray(photo)).resize((w, h)).save(
            folder / "images" / f"{i}.png")
        caption = texts[i] if i != long_caption else " ".join(texts[:8])[:600]
        records.append({"key": f"cap-{i:03d}", "image": f"images/{i}.png", "caption": caption})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def split_keys(dataset: Path, split: str) -> list[str]:
    """Every sample key of a split, from the tar members of the shards split.yaml names."""
    parts = yaml.safe_load((dataset / ".nv-meta" / "split.yaml").read_text())["split_parts"]
    keys = set()
    for pattern in parts[split]:
        for shard in braceexpand.braceexpand(pattern):
            with tarfile.open(dataset / shard) as tar:
                keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return sorted(keys)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real")
    records = make_source(root / "src", 40)
    prepare_dataset(root / "src", root / "ds", kind="captioning", shard_size=4,
                    splits="train=0.9,val=0.1")
    train_bpe(root / "tok")
    return {"root": root, "dataset": root / "ds", "tokenizer": root / "tok",
            "records": {r["key"]: r for r in records}}


def train(tmp_path: Path, name: str, procs: int, *flags: str, port: int) -> list[dict]:
    log = tmp_path / f"{name}.jsonl"
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", str(procs), "--master-port", str(port),
                           str(ROOT / "scripts" / "pretrain_lmm.py"), "--pipeweaver",
                           "--pipeweaver-model-config", "tiny-vlm", "--pipeweaver-log", str(log),
                           "--pipeweaver-search-budget-ms", "100", "--lr", "3e-3", *flags],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_pp2_trains_planned_batches_and_a_resumed_run_trains_the_same_samples(data, tmp_path):
    """PP 2 on the dataset with the BPE: every iteration planned, losses finite and
    falling; a run stopped after iteration 2 and resumed trains the uninterrupted run's
    samples in the same order, with the same losses (the read-ahead batches re-read)."""
    flags = ("--pipeline-model-parallel-size", "2", "--data-path", str(data["dataset"]),
             "--tokenizer-model", str(data["tokenizer"]))
    whole = train(tmp_path, "whole", 2, *flags, "--train-iters", "5", port=29861)
    assert [r["iteration"] for r in whole] == list(range(5))
    assert all(r["source"] == "planner" for r in whole)
    losses = [r["loss"] for r in whole]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    train_keys = set(split_keys(data["dataset"], "train"))
    for r in whole:
        assert r["sample_keys"] and set(r["sample_keys"]) <= train_keys
        assert r["skipped_samples"] == 0 and r["data_read_s"] >= 0
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, "first", 2, *flags, "--train-iters", "2", "--save", str(ckpt),
                  port=29862)
    resumed = train(tmp_path, "resumed", 2, *flags, "--train-iters", "5", "--load", str(ckpt),
                    port=29863)
    assert [r["iteration"] for r in resumed] == [2, 3, 4]
    assert [r["sample_keys"] for r in first + resumed] == [r["sample_keys"] for r in whole]
    assert [r["loss"] for r in resumed] == pytest.approx(losses[2:], rel=1e-6)


def test_pp2_dp2_ranks_train_disjoint_samples_that_cover_the_epoch(data, tmp_path):
    """PP 2 x DP 2 (byte-level tokenizer): in each replica's key stream, the keys before
    the first repeat (its epoch) are distinct; the replicas' epochs are disjoint and
    together are the train split's keys, each once."""
    records = train(tmp_path, "dp2", 4, "--pipeline-model-parallel-size", "2",
                    "--global-batch-size", "8", "--data-path", str(data["dataset"]),
                    "--train-iters", "5", port=29864)
    assert [r["iteration"] for r in records] == list(range(5))
    assert all(math.isfinite(r["loss"]) and r["source"] == "planner" for r in records)
    epochs = []
    for d in range(2):
        stream = [k for r in records for k in r["sample_keys_by_dp_rank"][d]]
        repeat = next((i for i, k in enumerate(stream) if k in stream[:i]), None)
        assert repeat is not None, f"replica {d} did not finish an epoch in 5 iterations"
        epochs.append(stream[:repeat])
    assert records[0]["sample_keys"] == records[0]["sample_keys_by_dp_rank"][0]
    assert not set(epochs[0]) & set(epochs[1])
    assert sorted(epochs[0] + epochs[1]) == split_keys(data["dataset"], "train")


def _expected_patches(path: Path) -> tuple[np.ndarray, int]:
    """Patches of an image file by PIL and numpy alone: resize to the merge-window grid,
    then window by window (row-major), patch by patch within a window, (channel, row,
    col) within a patch. Also its LM tokens."""
    img = Image.open(path).convert("RGB")
    unit = PATCH * MERGE
    rows = max(1, round(img.height / unit)) * MERGE
    cols = max(1, round(img.width / unit)) * MERGE
    pixels = np.asarray(img.resize((cols * PATCH, rows * PATCH), Image.BICUBIC),
                        dtype=np.float32) / 255.0
    out = []
    for wr in range(rows // MERGE):
        for wc in range(cols // MERGE):
            for i in range(MERGE):
                for j in range(MERGE):
                    r, c = (wr * MERGE + i) * PATCH, (wc * MERGE + j) * PATCH
                    out.append(pixels[r:r + PATCH, c:c + PATCH, :].transpose(2, 0, 1).reshape(-1))
    return np.stack(out), rows * cols // MERGE**2


def test_microbatch_tensors_are_the_tokenized_text_and_the_patchified_pixels(data):
    """One microbatch: its token ids are the image tokens then the caption's ids (the
    `tokenizers` library's encoding) per sample; labels and loss mask are next-token on
    text only; its patches are the PNG's pixels patchified by numpy."""
    from tokenizers import Tokenizer

    model = load_model("tiny-vlm", {"pp": 2})
    rules = TokenRules.from_model(model)
    tok = BpeTokenizer(data["tokenizer"])
    loader = BatchLoader(data["dataset"], tokenizer=tok, rules=rules,
                         num_microbatches=model.parallel.num_microbatches)
    loaded = loader.batch(0)
    mb = max(loaded.batch.microbatches, key=lambda m: len(m.samples))
    out = real_microbatch_data(model, mb, rules, loaded.samples, tok.image_token_id)
    hf = Tokenizer.from_file(str(data["tokenizer"] / "tokenizer.json"))
    image_id = hf.token_to_id("<image>")
    ids, patches, is_image = [], [], []
    for sample in mb.samples:
        record = data["records"][loaded.samples[sample.sample_id].key]
        expected, lm = _expected_patches(data["root"] / "src" / record["image"])
        text = hf.encode(record["caption"], add_special_tokens=False).ids
        ids += [image_id] * lm + text
        is_image += [True] * lm + [False] * len(text)
        patches.append(expected)
    assert out.text.tokens.tolist() == ids
    assert out.text.image_positions.tolist() == [p for p, f in enumerate(is_image) if f]
    np.testing.assert_allclose(out.images.patches.numpy(), np.concatenate(patches), atol=1e-6)
    start = 0
    for sample, length in zip(mb.samples, out.text.sample_lengths):
        seq = ids[start:start + length]
        assert out.text.labels[start:start + length - 1].tolist() == seq[1:]
        want = [0.0 if f else 1.0 for f in is_image[start + 1:start + length]] + [0.0]
        assert out.text.loss_mask[start:start + length].tolist() == want
        start += length


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """12 samples in 3 shards, all train: one caption over the token budget, one image
    overwritten with zeros inside its shard (prepare checked it while it was good)."""
    root = tmp_path_factory.mktemp("bad")
    make_source(root / "src", 12, long_caption=5)
    prepare_dataset(root / "src", root / "ds", kind="captioning", shard_size=4, splits="train=1")
    corrupt = "cap-009"
    for shard in sorted((root / "ds").glob("*.tar")):
        with tarfile.open(shard) as tar:
            member = next((m for m in tar.getmembers() if m.name == f"{corrupt}.png"), None)
        if member is not None:
            with open(shard, "r+b") as f:
                f.seek(member.offset_data)
                f.write(b"\0" * member.size)
            return {"dataset": root / "ds", "long": ("cap-005", "shard-000001.tar"),
                    "corrupt": (corrupt, shard.name)}
    raise AssertionError("no shard holds the image to corrupt")


def test_bad_samples_are_named_or_skipped_up_to_the_limit_and_logged(bad, tmp_path):
    rules = TokenRules.from_model(load_model("tiny-vlm", {"pp": 2}))
    named = set()
    for limit in (0, 1):
        loader = BatchLoader(bad["dataset"], tokenizer=ByteTokenizer(), rules=rules,
                             num_microbatches=8, skip_bad_samples=limit)
        with pytest.raises(DataError) as caught:
            for i in range(4):
                loader.batch(i)
        message = str(caught.value)
        hits = [k for k in ("long", "corrupt") if all(x in message for x in bad[k])]
        assert len(hits) == 1, message
        named.add(hits[0])
    assert named == {"long", "corrupt"}  # the first error, then the second once one is skipped
    records = train(tmp_path, "skip", 2, "--pipeline-model-parallel-size", "2", "--data-path",
                    str(bad["dataset"]), "--pipeweaver-skip-bad-samples", "2",
                    "--train-iters", "2", port=29865)
    skipped = [k for r in records for k in r["skipped_keys"]]
    assert set(skipped) == {"cap-005", "cap-009"} and records[-1]["skipped_samples"] == 2
    trained = {k for r in records for k in r["sample_keys"]}
    assert not trained & {"cap-005", "cap-009"} and len(trained) == 10


def test_simulate_and_plan_take_a_prepared_dataset_as_workload(data, capsys):
    """--workload DIR: the batches are the train split's samples (text tokens = UTF-8
    bytes under the byte-level tokenizer, image sizes from the PNGs), each once, and
    `pipeweaver simulate` / `plan` run on them."""
    batches = sample_workload("tiny-vlm", data["dataset"], 100)
    got = sorted((s.text_tokens, tuple((i.height, i.width) for i in s.images))
                 for b in batches for mb in b.microbatches for s in mb.samples)
    want = []
    for key in split_keys(data["dataset"], "train"):
        record = data["records"][key]
        with Image.open(data["root"] / "src" / record["image"]) as img:
            want.append((len(record["caption"].encode("utf-8")), ((img.height, img.width),)))
    assert got == sorted(want)
    assert cli_main(["simulate", "--model", "tiny-vlm", "--workload", str(data["dataset"]),
                     "--schedule", "pipeweaver", "--budget-ms", "50", "--iterations", "2",
                     "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["iteration_time_s"]) == 2
    assert cli_main(["plan", "--model", "tiny-vlm", "--workload", str(data["dataset"]),
                     "--budget-ms", "50"]) == 0
