"""Workload traces: JSONL, one sample per line, so users can feed their own dataset.

A line: {"sample_id": 0, "text_tokens": 812, "images": [[364, 364], [480, 640]],
"clips": [4.5]}. "images" (pairs of height, width in pixels) and "clips" (seconds) may be
left out when empty. Blank lines are skipped. Every error names the file, the line number
and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .meta import ClipMeta, GlobalBatch, ImageMeta, Microbatch, SampleMeta, WorkloadError

_KEYS = ("sample_id", "text_tokens", "images", "clips")


def _samples_of(items: Iterable[GlobalBatch | Microbatch | SampleMeta]) -> Iterator[SampleMeta]:
    for item in items:
        if isinstance(item, GlobalBatch):
            yield from item.samples
        elif isinstance(item, Microbatch):
            yield from item.samples
        elif isinstance(item, SampleMeta):
            yield item
        else:
            raise TypeError(f"cannot record {type(item).__name__} in a workload trace")


def sample_to_json(sample: SampleMeta) -> dict[str, Any]:
    """The JSON object of one trace line."""
    return {"sample_id": sample.sample_id, "text_tokens": sample.text_tokens,
            "images": [[i.height, i.width] for i in sample.images],
            "clips": [c.seconds for c in sample.clips]}


def record_trace(items: Iterable[GlobalBatch | Microbatch | SampleMeta],
                 path: str | Path) -> int:
    """Write the samples of batches, microbatches or samples to a JSONL trace.

    Returns the number of samples written. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as out:
        for sample in _samples_of(items):
            out.write(json.dumps(sample_to_json(sample), separators=(",", ":")) + "\n")
            count += 1
    return count


def _int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _parse(obj: Any, where: str) -> SampleMeta:
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in _KEYS:
            raise WorkloadError(f"{where}: key {key!r}: unknown key; allowed: "
                                f"{', '.join(_KEYS)}")
    for key in ("sample_id", "text_tokens"):
        if key not in obj:
            raise WorkloadError(f"{where}: key {key!r}: missing")
        if not _int(obj[key], 0):
            raise WorkloadError(f"{where}: key {key!r}: expected an integer >= 0, "
                                f"got {obj[key]!r}")
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(_int(v, 1) for v in p) for p in images):
        raise WorkloadError(f"{where}: key 'images': expected a list of [height, width] pairs "
                            f"of positive integers, got {images!r}")
    clips = obj.get("clips", [])
    if not isinstance(clips, list) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
            and c > 0 for c in clips):
        raise WorkloadError(f"{where}: key 'clips': expected a list of positive clip lengths "
                            f"in seconds, got {clips!r}")
    return SampleMeta(sample_id=obj["sample_id"], text_tokens=obj["text_tokens"],
                      images=tuple(ImageMeta(height=h, width=w) for h, w in images),
                      clips=tuple(ClipMeta(seconds=float(c)) for c in clips))


def _lines(path: Path) -> Iterator[SampleMeta]:
    seen: dict[int, int] = {}
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{where}: not valid JSON: {exc.msg} at column "
                                    f"{exc.colno}") from None
            sample = _parse(obj, where)
            if sample.sample_id in seen:
                raise WorkloadError(f"{where}: key 'sample_id': {sample.sample_id} already "
                                    f"appeared on line {seen[sample.sample_id]}")
            seen[sample.sample_id] = number
            yield sample


def iter_trace(path: str | Path) -> Iterator[SampleMeta]:
    """Replay a trace lazily (a missing file is reported at once)."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: no such trace file")
    return _lines(path)


def read_trace(path: str | Path) -> list[SampleMeta]:
    """All samples of a trace."""
    return list(iter_trace(path))
