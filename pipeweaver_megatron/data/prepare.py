"""`pipeweaver data prepare`: a source folder -> WebDataset tar shards prepared for Energon.

[Note: whole shards] Energon assigns whole shards to splits (split.yaml), so a split's
share is a multiple of the shard size. Without --shard-size the size is chosen so that
every split gets at least one shard; with one that leaves a split empty the prepare
fails naming the split. The split ratios are kept as given in split.yaml's origin, but
the sample counts per split are what the shards make them (PreparedDataset.splits).

Everything is written into a temporary folder next to --out and moved into place only
when Energon's prepare succeeded and every split holds a shard: bad data writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import DataError
from .records import DataKind, ImageFile, Record, TextItem, read_records

META_DIR = ".nv-meta"
"""Energon's metadata folder inside a prepared dataset."""
DEFAULT_SHARD_SIZE = 100
"""Samples per shard when --shard-size is not given (fewer where a split needs a shard)."""
_SPLIT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}
"""Image formats stored as they are; others are re-encoded as PNG."""

INTERLEAVED_LOADER = '''\
"""Written by `pipeweaver data prepare`: builds InterleavedSample.sequence from the
document's JSON part (its content items in order; an image item names its tar part,
which Energon has decoded to a tensor)."""


def sample_loader(raw: dict) -> dict:
    content = raw["json"]["content"]
    return dict(sequence=[item["text"] if "text" in item else raw[item["image"]]
                          for item in content])


def part_filter(part: str) -> bool:
    return True
'''


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitRatio:
    """One --split entry."""

    name: str
    """Split name (train, val, test, ...)."""
    ratio: float
    """Its share (> 0; the shares are normalised by Energon)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitInfo:
    """What one split got."""

    name: str
    """Split name."""
    shards: tuple[str, ...]
    """Its shard files, relative to the dataset folder."""
    samples: int
    """Samples in those shards."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PreparedDataset:
    """The result of a prepare."""

    path: Path
    """The dataset folder (Energon reads it as it is)."""
    kind: DataKind
    """Sample form."""
    samples: int
    """Samples over all shards."""
    shard_size: int
    """Samples per shard (the last one may hold fewer)."""
    shards: int
    """Tar shards written."""
    splits: tuple[SplitInfo, ...]
    """Per split, in --split order."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"path": str(self.path), "kind": self.kind.value, "samples": self.samples,
                "shard_size": self.shard_size, "shards": self.shards,
                "splits": {s.name: {"samples": s.samples, "shards": list(s.shards)}
                           for s in self.splits}}


def parse_splits(text: str) -> tuple[SplitRatio, ...]:
    """`train=0.98,val=0.02` -> split ratios; DataError naming --split otherwise."""
    out: list[SplitRatio] = []
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not _SPLIT_RE.match(name):
            raise DataError("--split", f"{part!r} is not NAME=RATIO (e.g. train=0.98,val=0.02)")
        try:
            ratio = float(value)
        except ValueError:
            raise DataError("--split", f"{name}: ratio {value!r} is not a number") from None
        if not math.isfinite(ratio) or ratio <= 0:
            raise DataError("--split", f"{name}: ratio must be > 0, got {value}")
        if any(s.name == name for s in out):
            raise DataError("--split", f"split {name!r} given twice")
        out.append(SplitRatio(name=name, ratio=ratio))
    return tuple(out)


def _shards_per_split(shards: int, splits: tuple[SplitRatio, ...]) -> list[int]:
    """Shards each split would get from Energon's whole-shard assignment (cumulative
    ratio times the shard count, rounded down): used only to choose a default shard size;
    the split.yaml Energon writes is checked afterwards."""
    total = sum(s.ratio for s in splits)
    counts, start, cumulative = [], 0, 0.0
    for split in splits:
        cumulative += split.ratio / total
        end = int(shards * cumulative)
        counts.append(end - start)
        start = end
    return counts


def choose_shard_size(samples: int, splits: tuple[SplitRatio, ...],
                      requested: int | None = None) -> int:
    """--shard-size if given, else the largest size up to DEFAULT_SHARD_SIZE that gives
    every split a shard; DataError when the samples are too few for the splits."""
    if requested is not None:
        if requested < 1:
            raise DataError("--shard-size", f"must be >= 1, got {requested}")
        return requested
    for size in range(min(DEFAULT_SHARD_SIZE, samples), 0, -1):
        if min(_shards_per_split(math.ceil(samples / size), splits)) >= 1:
            return size
    raise DataError("--split", f"{samples} samples cannot give each of the "
                               f"{len(splits)} splits a whole shard")


def _image_part(image: ImageFile) -> tuple[str, bytes]:
    """(extension, bytes) of an image as it goes into a shard."""
    ext = _KEEP_FORMATS.get(image.format)
    if ext is not None:
        return ext, image.path.read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(image.path) as img:
        img.convert("RGB").save(buf, "PNG")
    return "png", buf.getvalue()


def sample_parts(record: Record, kind: DataKind) -> dict[str, bytes]:
    """A record's tar members by field name (the part of the member name after the key).

    captioning: KEY.jpg|png (the image), KEY.txt (the caption), KEY.json (key, image
    name and size, meta); interleaved: KEY.json ({"key", "content": [{"text": ...},
    {"image": "img0.jpg"}, ...], "images", "meta"}) and one KEY.imgN.jpg|png per image.
    """
    info = [{"source": i.name, "height": i.height, "width": i.width} for i in record.images]
    if kind is DataKind.CAPTIONING:
        image, caption = record.images[0], record.texts[0]
        ext, data = _image_part(image)
        doc = {"key": record.key, "image": info[0], "meta": record.meta}
        return {ext: data, "txt": caption.encode("utf-8"),
                "json": json.dumps(doc, ensure_ascii=False).encode("utf-8")}
    parts: dict[str, bytes] = {}
    content: list[dict[str, str]] = []
    for item in record.content:
        if isinstance(item, TextItem):
            content.append({"text": item.text})
            continue
        ext, data = _image_part(item.image)
        name = f"img{sum(1 for c in content if 'image' in c)}.{ext}"
        parts[name] = data
        content.append({"image": name})
    doc = {"key": record.key, "content": content, "images": info, "meta": record.meta}
    parts["json"] = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    return parts


def write_shards(records: list[Record], kind: DataKind, folder: Path,
                 shard_size: int) -> list[str]:
    """Tar shards of shard_size records each, in record order; their names."""
    names: list[str] = []
    for start in range(0, len(records), shard_size):
        name = f"shard-{len(names):06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for record in records[start:start + shard_size]:
                for field, data in sample_parts(record, kind).items():
                    member = tarfile.TarInfo(f"{record.key}.{field}")
                    member.size = len(data)
                    member.mode = 0o644
                    tar.addfile(member, io.BytesIO(data))
        names.append(name)
    return names


def dataset_yaml(kind: DataKind) -> dict[str, Any]:
    """Energon's .nv-meta/dataset.yaml: the sample type and how tar parts fill it."""
    sample_type = {"__module__": "megatron.energon",
                   "__class__": "CaptioningSample" if kind is DataKind.CAPTIONING
                   else "InterleavedSample"}
    if kind is DataKind.CAPTIONING:
        return {"sample_type": sample_type, "field_map": {"image": "jpg,png", "caption": "txt"}}
    return {"sample_type": sample_type, "sample_loader": "sample_loader.py:sample_loader",
            "part_filter": "sample_loader.py:part_filter"}


def read_splits(folder: Path) -> dict[str, tuple[str, ...]]:
    """Shard files per split, from the split.yaml Energon wrote (brace patterns expanded)."""
    import braceexpand

    config = yaml.safe_load((folder / META_DIR / "split.yaml").read_text())
    return {name: tuple(s for pattern in patterns for s in braceexpand.braceexpand(pattern))
            for name, patterns in (config.get("split_parts") or {}).items()}


def _energon_prepare(folder: Path, shards: list[str], splits: tuple[SplitRatio, ...],
                     seed: int | None) -> None:
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    chatter = io.StringIO()  # Energon prints progress lines
    with contextlib.redirect_stdout(chatter):
        BaseWebdatasetFactory.prepare_dataset(
            folder, shards, split_parts_ratio=[(s.name, s.ratio) for s in splits],
            shuffle_seed=seed, workers=1)


def prepare_dataset(src: str | Path, out: str | Path, *, kind: DataKind | str = "captioning",
                    shard_size: int | None = None, splits: str | tuple[SplitRatio, ...] =
                    "train=0.98,val=0.02", seed: int | None = 42) -> PreparedDataset:
    """Check every record of SRC/samples.jsonl, write shards into OUT and prepare them
    for Energon (index, split.yaml, dataset.yaml). DataError on bad data or flags, with
    nothing written. OUT must not exist or be an empty folder. seed: Energon's shard
    shuffle before the split (None keeps the shard order)."""
    kind = DataKind(kind)
    ratios = parse_splits(splits) if isinstance(splits, str) else tuple(splits)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError("--out", f"{target} exists and is not an empty folder")
    records = read_records(src, kind)
    size = choose_shard_size(len(records), ratios, shard_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        names = write_shards(records, kind, work, size)
        _energon_prepare(work, names, ratios, seed)
        (work / META_DIR / "dataset.yaml").write_text(yaml.safe_dump(dataset_yaml(kind),
                                                                     sort_keys=False))
        if kind is DataKind.INTERLEAVED:
            (work / META_DIR / "sample_loader.py").write_text(INTERLEAVED_LOADER)
        got = read_splits(work)
        empty = [s.name for s in ratios if not got.get(s.name)]
        if empty:
            raise DataError("--split", f"split {empty[0]!r} gets no shard: Energon assigns "
                                       f"whole shards, and {len(records)} samples in "
                                       f"{len(names)} shards of {size} leave it empty (use a "
                                       "smaller --shard-size or a larger ratio)")
        os.chmod(work, 0o755)
        if target.exists():
            target.rmdir()
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    counts = {name: len(records[i * size:(i + 1) * size]) for i, name in enumerate(names)}
    return PreparedDataset(
        path=target, kind=kind, samples=len(records), shard_size=size, shards=len(names),
        splits=tuple(SplitInfo(name=s.name, shards=got[s.name],
                               samples=sum(counts[n] for n in got[s.name])) for s in ratios))
