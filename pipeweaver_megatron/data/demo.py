"""`pipeweaver data demo`: a small real dataset made from what the installed packages ship.

Photographs bundled with scikit-image (astronaut, coffee, chelsea, rocket, ...; never
`eagle`, which downloads) are cropped, flipped and resized so image sizes and counts
vary, and paired with real English text from Python's pydoc_data.topics. Two source
folders (captioning and interleaved) are written, prepared for Energon with
`prepare_dataset`, and a byte-level BPE is trained on the same text. Sizes are chosen
so that every sample fits the model's microbatch limits even under the byte-level
tokenizer (one id per UTF-8 byte). Seeded: the same seed gives the same files.

    OUT/tokenizer/            tokenizer.json (+ config) for HuggingFaceTokenizer
    OUT/src/{captioning,interleaved}/   samples.jsonl and images (the record form)
    OUT/{captioning,interleaved}/       prepared Energon datasets (train/val splits)
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import load_model
from ..workload import ImageMeta, TokenRules
from .errors import DataError
from .prepare import PreparedDataset, choose_shard_size, parse_splits, prepare_dataset
from .records import SAMPLES_FILE, DataKind
from .tokenizer import SPECIAL_TOKENS, python_text, train_bpe

PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
          "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
          "microaneurysms", "moon", "page", "retina", "rocket", "text")
"""scikit-image's bundled photographs (skimage.data functions that read a shipped file)."""
SPLITS = "train=0.9,val=0.1"
SHARD_SIZE = 20
"""Samples per shard (fewer for a demo too small to give both splits a shard of 20)."""
_MARGIN = len(SPECIAL_TOKENS)
"""LM tokens kept free for the special tokens a task encoder may add (BOS, EOS, ...)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoData:
    """What `build_demo` made."""

    root: Path
    """The output folder."""
    tokenizer: Path
    """The BPE tokenizer folder."""
    captioning: PreparedDataset
    """The prepared captioning dataset."""
    interleaved: PreparedDataset
    """The prepared interleaved dataset."""


def load_photos() -> list[tuple[str, np.ndarray]]:
    """The bundled photographs as uint8 RGB arrays (H, W, 3)."""
    from skimage import data

    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append((name, np.ascontiguousarray(img[..., :3].astype(np.uint8))))
    return out


class _Maker:
    """Draws images and texts from one seeded generator."""

    def __init__(self, seed: int, rules: TokenRules) -> None:
        self.rng = np.random.default_rng(seed)
        self.rules = rules
        self.photos = load_photos()
        self.texts = [t for t in python_text() if len(t) >= 40]
        self.next_text = int(self.rng.integers(len(self.texts)))

    def image(self, folder: Path, stem: str, lo: int, hi: int) -> tuple[str, int, dict[str, Any]]:
        """A crop of a photo, maybe flipped, resized to sides in [lo, hi]: (file name,
        LM tokens under the model's rule, provenance)."""
        name, photo = self.photos[int(self.rng.integers(len(self.photos)))]
        height, width = photo.shape[:2]
        ch = int(height * self.rng.uniform(0.3, 1.0))
        cw = int(width * self.rng.uniform(0.3, 1.0))
        y, x = int(self.rng.integers(height - ch + 1)), int(self.rng.integers(width - cw + 1))
        crop = photo[y:y + ch, x:x + cw]
        flip = bool(self.rng.random() < 0.5)
        if flip:
            crop = crop[:, ::-1]
        th, tw = (int(self.rng.integers(lo, hi + 1)) for _ in range(2))
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((tw, th), Image.BILINEAR)
        fmt, ext = ("JPEG", "jpg") if self.rng.random() < 0.7 else ("PNG", "png")
        file = f"{stem}.{ext}"
        buf = io.BytesIO()
        img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        (folder / file).write_bytes(buf.getvalue())
        meta = {"photo": name, "crop": [y, x, ch, cw], "flip": flip}
        return file, self.rules.image_lm_tokens(ImageMeta(height=th, width=tw)), meta

    def text(self, max_bytes: int) -> str:
        """The next paragraph's leading sentences, cut to at most max_bytes UTF-8 bytes."""
        paragraph = self.texts[self.next_text % len(self.texts)]
        self.next_text += 1 + int(self.rng.integers(3))
        out = ""
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            candidate = f"{out} {sentence}".strip()
            if len(candidate.encode("utf-8")) > max_bytes:
                break
            out = candidate
        if not out:  # a long first sentence: cut at a word
            for word in paragraph.split():
                candidate = f"{out} {word}".strip()
                if len(candidate.encode("utf-8")) > max_bytes:
                    break
                out = candidate
        return out or paragraph.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _write(folder: Path, records: list[dict[str, Any]]) -> None:
    with (folder / SAMPLES_FILE).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def captioning_source(folder: Path, maker: _Maker, count: int) -> None:
    """count captioning records: one image (sides 16-64 px) and a caption."""
    (folder / "images").mkdir(parents=True)
    budget = maker.rules.microbatch_tokens - _MARGIN
    records = []
    for i in range(count):
        key = f"cap-{i:06d}"
        file, lm, meta = maker.image(folder / "images", key, 16, 64)
        cap = int(maker.rng.integers(40, max(41, min(budget - lm, 200))))
        records.append({"key": key, "image": f"images/{file}", "caption": maker.text(cap),
                        **meta})
    _write(folder, records)


def interleaved_source(folder: Path, maker: _Maker, count: int) -> None:
    """count interleaved documents: 1-4 images (sides 16-40 px) between text runs, from
    text-heavy to image-heavy."""
    (folder / "images").mkdir(parents=True)
    cap = min(maker.rules.max_images_per_microbatch, 4)
    records = []
    for i in range(count):
        key = f"doc-{i:06d}"
        images = [maker.image(folder / "images", f"{key}-{j}", 16, 40)
                  for j in range(int(maker.rng.integers(1, cap + 1)))]
        room = maker.rules.microbatch_tokens - _MARGIN - sum(lm for _, lm, _ in images)
        runs = len(images) + 1
        content: list[dict[str, str]] = []
        image_first = bool(maker.rng.random() < 0.3)
        for j in range(runs):
            if j or not image_first:
                content.append({"text": maker.text(max(20, room // runs))})
            if j < len(images):
                content.append({"image": f"images/{images[j][0]}"})
        records.append({"key": key, "content": content,
                        "photos": [meta for _, _, meta in images]})
    _write(folder, records)


def build_demo(out: str | Path, *, model: str = "tiny-vlm", seed: int = 0,
               captioning: int = 240, interleaved: int = 160) -> DemoData:
    """Make OUT (which must not exist or be empty): the BPE, both source folders and
    both prepared datasets."""
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError("--out", f"{root} exists and is not an empty folder")
    rules = TokenRules.from_model(load_model(model))
    if rules.image_rule is None:
        raise DataError("--model", f"{model} has no vision encoder")
    root.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = root / "tokenizer"
        train_bpe(tokenizer)
        maker = _Maker(seed, rules)
        captioning_source(root / "src" / "captioning", maker, captioning)
        interleaved_source(root / "src" / "interleaved", maker, interleaved)
        counts = {DataKind.CAPTIONING: captioning, DataKind.INTERLEAVED: interleaved}
        prepared = {kind: prepare_dataset(
            root / "src" / kind.value, root / kind.value, kind=kind, splits=SPLITS, seed=seed,
            shard_size=min(SHARD_SIZE, choose_shard_size(counts[kind], parse_splits(SPLITS))))
            for kind in DataKind}
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return DemoData(root=root, tokenizer=tokenizer, captioning=prepared[DataKind.CAPTIONING],
                    interleaved=prepared[DataKind.INTERLEAVED])

