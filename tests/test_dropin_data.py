"""Megatron-LM's pretrain_vlm.py on a prepared Energon dataset (--data-path), with and
without --pipeweaver, inside Megatron's real pretrain() through the CPU stand-in.

The microbatches are checked against what the test computes itself (token ids from the
`tokenizers` library, pixels from PIL and numpy); the training runs against Megatron's
own LLaVA at PP 1 in one process on the same data (every run starts from one checkpoint
the reference saved, as in test_megatron_dropin.py); a run stopped and resumed against
the uninterrupted one; two data-parallel replicas against the split's keys read from
the tar shards.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from megatron_lm import LOSS, VALID, logged, patched_script, standin
from pipeweaver_megatron.data import DataError
from pipeweaver_megatron.data.demo import build_demo
from pipeweaver_megatron.data.prepare import prepare_dataset
from pipeweaver_megatron.data.samples import SampleSource
from pipeweaver_megatron.data.tokenizer import BpeTokenizer, train_bpe
from pipeweaver_megatron.megatron.examples import tiny_llava_on
from pipeweaver_megatron.megatron.vlm_data import CLIP_MEAN, CLIP_STD, VlmLimits, VlmSamples
from test_real_data_train import make_source, split_keys

IMAGE = -200  # megatron-core's DEFAULT_IMAGE_TOKEN_INDEX
PIPEWEAVER = ["--pipeweaver", "--pipeline-model-parallel-size", "2", "--pipeweaver-hardware",
              "cpu", "--pipeweaver-search-budget-ms", "100"]
_PORT = iter(range(29950, 29990))


def flags(dataset: Path, tokenizer: Path, seq_length: int) -> list[str]:
    return [*tiny_llava_on(dataset, tokenizer, seq_length), "--eval-interval", "2"]


def keys_of(log: Path) -> dict[int, list]:
    """{iteration: every replica's sample keys} of a --pipeweaver-log."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["iteration"]: r["sample_keys_by_dp_rank"] for r in records}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`pipeweaver data demo`'s datasets and BPE."""
    return build_demo(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """40 captioning samples in shards of 4 (36 train, 4 val) and a BPE."""
    root = tmp_path_factory.mktemp("small")
    records = make_source(root / "src", 40, long_caption=9)
    prepare_dataset(root / "src", root / "ds", kind="captioning", shard_size=4,
                    splits="train=0.9,val=0.1")
    train_bpe(root / "tok")
    assert "cap-009" in split_keys(root / "ds", "train")  # the split is seeded
    return {"src": root / "src", "dataset": root / "ds", "tokenizer": root / "tok",
            "records": {r["key"]: r for r in records}}


def samples(data: dict, limits: VlmLimits, **kw) -> VlmSamples:
    tok = BpeTokenizer(data["tokenizer"])
    source = SampleSource(data["dataset"], tokenizer=tok, check=limits.check, **kw)
    return VlmSamples(source, limits, Tokenizer.from_file(
        str(data["tokenizer"] / "tokenizer.json")).token_to_id("<eos>"))


LIMITS = VlmLimits(img_h=32, img_w=32, img_seq_len=17, max_tokens=4096)


def test_a_sample_is_the_microbatch_get_batch_reads(small):
    """Captioning: [image, caption ids] -> labels [caption ids, EOD], loss everywhere but
    the image; the tile is the PIL-resized PNG normalised with CLIP's mean and std."""
    tok = Tokenizer.from_file(str(small["tokenizer"] / "tokenizer.json"))
    eod = tok.token_to_id("<eos>")
    reader = samples(small, LIMITS)
    for _ in range(3):
        batch = next(reader)
        record = small["records"][reader.last_key]
        ids = tok.encode(record["caption"], add_special_tokens=False).ids
        assert batch["tokens"].tolist() == [[IMAGE, *ids]]
        assert batch["labels"].tolist() == [[*ids, eod]]
        assert batch["loss_mask"].tolist() == [[0.0] + [1.0] * len(ids)]
        assert batch["position_ids"].tolist() == [list(range(len(ids) + 1))]
        picture = Image.open(small["src"] / record["image"]).convert("RGB")
        pixels = np.asarray(picture.resize((32, 32), Image.BICUBIC), np.float32) / 255.0
        want = (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        assert batch["image"].shape == (1, 3, 32, 32)
        np.testing.assert_allclose(batch["image"][0].permute(1, 2, 0).numpy(), want, atol=1e-5)


def test_an_interleaved_document_keeps_its_order(demo):
    """Several images between text runs: one -200 per image where the record puts it,
    no loss on an image or on the text right before one."""
    data = {"dataset": demo.interleaved.path, "tokenizer": demo.tokenizer}
    tok = Tokenizer.from_file(str(demo.tokenizer / "tokenizer.json"))
    records = {}
    for line in (demo.root / "src" / "interleaved" / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["key"]] = record
    reader = samples(data, LIMITS)
    for _ in range(4):
        batch = next(reader)
        sequence = []
        for item in records[reader.last_key]["content"]:
            sequence += ([IMAGE] if "image" in item
                         else tok.encode(item["text"], add_special_tokens=False).ids)
        sequence.append(tok.token_to_id("<eos>"))
        assert batch["tokens"][0].tolist() == sequence[:-1]
        assert batch["labels"][0].tolist() == sequence[1:]
        want = [float(a != IMAGE and b != IMAGE) for a, b in zip(sequence, sequence[1:])]
        assert batch["loss_mask"][0].tolist() == want
        assert batch["image"].shape[0] == sequence.count(IMAGE)


def test_a_sample_over_the_sequence_length_is_named_or_skipped(small):
    """Sample cap-009's caption does not fit 81 LM tokens (64 text + one tile)."""
    limits = VlmLimits(img_h=32, img_w=32, img_seq_len=17, max_tokens=81)
    with pytest.raises(DataError, match=r"\.tar: sample 'cap-009': it needs \d+ LM tokens"):
        reader = samples(small, limits)
        for _ in range(36):
            next(reader)
    reader = samples(small, limits, skip_bad_samples=1)
    keys = []
    for _ in range(35):
        next(reader)
        keys.append(reader.last_key)
    assert reader.skipped == 1 and "cap-009" not in keys
    assert sorted(keys) == sorted(set(split_keys(small["dataset"], "train")) - {"cap-009"})


def test_the_saved_state_is_before_the_first_untrained_sample(small):
    """Read 6 ahead, 4 trained: a reader restored from save_state() (pickled, as
    Megatron's torch.save stores it) yields samples 5, 6, ... of the uninterrupted
    stream; reading further ahead does not move the state."""
    whole = samples(small, LIMITS)
    stream = []
    for _ in range(10):
        next(whole)
        stream.append(whole.last_key)
    reader = samples(small, LIMITS)
    reader.track_training()
    saved = []
    for ahead in (6, 3):
        for _ in range(ahead):
            next(reader)
        if not saved:
            reader.trained(4)
        saved.append(pickle.dumps(reader.save_state()))
    for state in saved:
        resumed = samples(small, LIMITS, state=pickle.loads(state))
        again = []
        for _ in range(6):
            next(resumed)
            again.append(resumed.last_key)
        assert again == stream[4:10]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return patched_script(tmp_path_factory.mktemp("megatron"), "pretrain_vlm.py")


def test_pipeweaver_on_the_dataset_matches_megatron_and_resumes_on_the_next_sample(
        vlm, demo, tmp_path):
    """Interleaved documents (1-4 images each): --pipeweaver PP 2 trains Megatron's PP-1
    losses (and validation) on the same samples; stopped at iteration 2 and resumed, it
    trains the uninterrupted run's keys in the same order."""
    base = flags(demo.interleaved.path, demo.tokenizer, 192)

    def megatron(extra: list, procs: int = 1) -> str:
        return standin(vlm, [*base, *extra], procs, next(_PORT))

    start = tmp_path / "start"
    megatron(["--pipeline-model-parallel-size", "1", "--train-iters", "1", "--lr", "0",
              "--min-lr", "0", "--eval-iters", "0", "--save", str(start), "--save-interval", "1"])
    common = ["--train-iters", "4", "--eval-iters", "1"]
    reference = megatron(["--pipeline-model-parallel-size", "1", "--load", str(start),
                          "--finetune", *common])
    whole_log = tmp_path / "whole.jsonl"
    whole = megatron([*PIPEWEAVER, "--load", str(start), "--finetune", *common,
                      "--pipeweaver-log", str(whole_log)], procs=2)
    theirs, ours = logged(LOSS, reference), logged(LOSS, whole)
    assert sorted(theirs) == sorted(ours) == [1, 2, 3, 4]
    for i in ours:
        assert ours[i] == pytest.approx(theirs[i], rel=1e-5), (i, ours, theirs)
    assert logged(VALID, whole)[2] == pytest.approx(logged(VALID, reference)[2], rel=1e-5)

    saved, first_log, second_log = tmp_path / "saved", tmp_path / "first.jsonl", \
        tmp_path / "second.jsonl"
    megatron([*PIPEWEAVER, "--load", str(start), "--finetune", *common, "--exit-interval", "2",
              "--save", str(saved), "--save-interval", "2", "--pipeweaver-log", str(first_log)],
             procs=2)
    assert list(saved.glob("iter_0000002/mp_rank_00*/train_dataloader_dprank000.pt"))
    second = megatron([*PIPEWEAVER, "--load", str(saved), "--train-iters", "4",
                       "--eval-iters", "0", "--pipeweaver-log", str(second_log)], procs=2)
    whole_keys = keys_of(whole_log)
    assert sorted(whole_keys) == [0, 1, 2, 3]
    assert {**keys_of(first_log), **keys_of(second_log)} == whole_keys
    resumed = logged(LOSS, second)
    assert resumed[3] == pytest.approx(ours[3], rel=1e-5)
    assert resumed[4] == pytest.approx((ours[3] + ours[4]) / 2, rel=1e-5)


def test_pp2_dp2_replicas_train_disjoint_samples_that_make_the_epoch(vlm, small, tmp_path):
    """Two PP-2 replicas, 2 samples each per iteration, for 10 iterations: in each
    replica's key stream the keys before its first repeat (its epoch) are distinct, the
    two epochs are disjoint and together are the train split's keys but the over-long
    cap-009, which is skipped and named in Megatron's output."""
    log = tmp_path / "dp2.jsonl"
    out = standin(vlm, [*flags(small["dataset"], small["tokenizer"], 64), *PIPEWEAVER,
                        "--train-iters", "10", "--eval-iters", "0",
                        "--pipeweaver-skip-bad-samples", "1", "--pipeweaver-log", str(log)],
                  4, next(_PORT))
    assert sorted(logged(LOSS, out)) == list(range(1, 11))
    assert "skipped bad sample 'cap-009'" in out
    keys = keys_of(log)
    assert sorted(keys) == list(range(10))
    assert all(len(keys[i][d]) == 2 for i in range(10) for d in range(2))
    epochs = []
    for d in range(2):
        stream = [k for i in range(10) for k in keys[i][d]]
        repeat = next((i for i, k in enumerate(stream) if k in stream[:i]), None)
        assert repeat is not None, f"replica {d} did not finish an epoch in 10 iterations"
        epochs.append(stream[:repeat])
    assert not set(epochs[0]) & set(epochs[1])
    train = set(split_keys(small["dataset"], "train")) - {"cap-009"}
    assert sorted(epochs[0] + epochs[1]) == sorted(train)
