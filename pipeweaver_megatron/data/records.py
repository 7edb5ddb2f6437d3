"""The records of a source folder's samples.jsonl, checked before anything is written.

A source folder holds image files and `samples.jsonl`, one JSON object per line:

- captioning: ``{"key": "k1", "image": "a.jpg", "caption": "..."}``
- interleaved: ``{"key": "d1", "content": [{"text": "..."}, {"image": "a.jpg"}, ...]}``

`key` is unique and names the sample in the shards, the loader and the training logs;
image paths are relative to the folder; every image must decode with PIL; every text
must be non-empty. Other fields are kept as the sample's metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import DataError

SAMPLES_FILE = "samples.jsonl"
"""The record file inside a source folder."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
"""WebDataset cuts a tar member's name at its first dot into key and field, and Energon
skips names starting with '__': keys are letters, digits, '_' and '-'."""


class DataKind(str, Enum):
    """The two sample forms a dataset may hold."""

    CAPTIONING = "captioning"
    """One image and its caption (Energon's CaptioningSample)."""
    INTERLEAVED = "interleaved"
    """Text runs with images between them (Energon's InterleavedSample)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageFile:
    """An image a record names, checked to decode."""

    path: Path
    """The file, inside the source folder."""
    name: str
    """As the record wrote it (relative to the source folder)."""
    format: str
    """PIL's format name (JPEG, PNG, ...)."""
    height: int
    """Height in pixels."""
    width: int
    """Width in pixels."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TextItem:
    """A text run of an interleaved document."""

    text: str
    """The text (non-empty)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageItem:
    """An image of an interleaved document."""

    image: ImageFile
    """The checked image."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """One checked sample of samples.jsonl, in content order."""

    key: str
    """Unique sample key."""
    line: int
    """Line number in samples.jsonl (1-based)."""
    content: tuple[TextItem | ImageItem, ...]
    """Text runs and images in order (captioning: the image, then the caption)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The record's other fields, kept as metadata."""

    @property
    def texts(self) -> tuple[str, ...]:
        """The text runs, in order."""
        return tuple(i.text for i in self.content if isinstance(i, TextItem))

    @property
    def images(self) -> tuple[ImageFile, ...]:
        """The images, in order."""
        return tuple(i.image for i in self.content if isinstance(i, ImageItem))


class _Checker:
    """Checks the records of one source folder; every error names file, line and key."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.file = src / SAMPLES_FILE
        self.images: dict[str, ImageFile] = {}

    def fail(self, line: int, reason: str, key: str | None = None) -> DataError:
        return DataError(f"{self.file}:{line}", reason, key)

    def text(self, value: Any, line: int, key: str, what: str) -> TextItem:
        if not isinstance(value, str):
            raise self.fail(line, f"{what} must be a string, got {type(value).__name__}", key)
        if not value.strip():
            raise self.fail(line, f"{what} is empty", key)
        return TextItem(text=value)

    def image(self, value: Any, line: int, key: str, what: str) -> ImageItem:
        if not isinstance(value, str) or not value:
            raise self.fail(line, f"{what} must be a file name relative to {self.src}", key)
        if value in self.images:
            return ImageItem(image=self.images[value])
        path = (self.src / value).resolve()
        if not path.is_relative_to(self.src.resolve()):
            raise self.fail(line, f"{what} {value!r} lies outside the source folder", key)
        if not path.is_file():
            raise self.fail(line, f"{what} {value!r}: no such file in {self.src}", key)
        try:
            with Image.open(path) as img:
                img.load()
                checked = ImageFile(path=path, name=value, format=img.format or "",
                                    height=img.height, width=img.width)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise self.fail(line, f"{what} {value!r} does not decode: {exc}", key) from None
        self.images[value] = checked
        return ImageItem(image=checked)

    def record(self, raw: Any, line: int, kind: DataKind) -> Record:
        if not isinstance(raw, dict):
            raise self.fail(line, f"a record must be a JSON object, got {type(raw).__name__}")
        key = raw.get("key")
        if not isinstance(key, str) or not key:
            raise self.fail(line, "missing field 'key' (a non-empty string)")
        if not _KEY_RE.match(key):
            raise self.fail(line, "a key may hold only letters, digits, '_' and '-' (WebDataset "
                                  "splits tar member names at the first dot)", key)
        if kind is DataKind.CAPTIONING:
            for name in ("image", "caption"):
                if name not in raw:
                    raise self.fail(line, f"missing field {name!r} (a captioning record has "
                                          "key, image, caption)", key)
            content: tuple[TextItem | ImageItem, ...] = (
                self.image(raw["image"], line, key, "image"),
                self.text(raw["caption"], line, key, "caption"))
            meta = {k: v for k, v in raw.items() if k not in ("key", "image", "caption")}
        else:
            content = self.content(raw, line, key)
            meta = {k: v for k, v in raw.items() if k not in ("key", "content")}
        return Record(key=key, line=line, content=content, meta=meta)

    def content(self, raw: dict[str, Any], line: int, key: str) -> tuple[TextItem | ImageItem, ...]:
        items = raw.get("content")
        if items is None:
            raise self.fail(line, "missing field 'content' (an interleaved record has key, "
                                  "content)", key)
        if not isinstance(items, list) or not items:
            raise self.fail(line, "'content' must be a non-empty list of {\"text\": ...} and "
                                  "{\"image\": ...} items", key)
        out: list[TextItem | ImageItem] = []
        for i, item in enumerate(items):
            what = f"content[{i}]"
            if not isinstance(item, dict) or len(item) != 1 or not ({"text", "image"} & set(item)):
                raise self.fail(line, f"{what} must be {{\"text\": ...}} or {{\"image\": ...}}, "
                                      f"got {item!r:.60}", key)
            if "text" in item:
                out.append(self.text(item["text"], line, key, f"{what}.text"))
            else:
                out.append(self.image(item["image"], line, key, f"{what}.image"))
        if not any(isinstance(i, TextItem) for i in out):
            raise self.fail(line, "'content' has no text item", key)
        return tuple(out)


def read_records(src: str | Path, kind: DataKind | str) -> list[Record]:
    """Every record of SRC/samples.jsonl, checked: unique keys, required fields, images
    that exist and decode, non-empty text. DataError (file:line, key, reason) on the
    first bad record; nothing is written."""
    kind = DataKind(kind)
    folder = Path(src)
    checker = _Checker(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "no such source folder")
    if not checker.file.is_file():
        raise DataError(str(checker.file), f"no {SAMPLES_FILE} in the source folder")
    records: list[Record] = []
    seen: dict[str, int] = {}
    with checker.file.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                text = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise checker.fail(number, f"not UTF-8: {exc}") from None
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise checker.fail(number, f"not JSON: {exc}") from None
            record = checker.record(raw, number, kind)
            if record.key in seen:
                raise checker.fail(number, f"duplicate key (first on line {seen[record.key]})",
                                   record.key)
            seen[record.key] = number
            records.append(record)
    if not records:
        raise DataError(str(checker.file), "no records")
    return records
