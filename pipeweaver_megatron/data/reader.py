"""Reading a prepared dataset back through Energon: decoded samples with their keys.

One reader serves `pipeweaver data stats` and is meant for a training loader: it
iterates one split for one data-parallel rank (Energon's WorkerConfig rank/world_size),
yields DataSample values in Energon's order (images decoded to float CHW tensors in
[0, 1], text as str, in content order), and exposes Energon's savable loader state
(save_state / restore_state) so a resumed run continues where the saved one stopped.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import DataError
from .prepare import META_DIR, read_splits
from .records import DataKind

if TYPE_CHECKING:
    import torch

warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no "
                                          "accelerator is found")
"""Energon's loader always asks for pinned memory; on a CPU machine torch warns once per
iterator. Harmless, and only this message is silenced."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSample:
    """One decoded sample as Energon delivers it."""

    key: str
    """The sample key of samples.jsonl (Energon's __key__)."""
    kind: DataKind
    """Sample form."""
    sequence: tuple[str | torch.Tensor, ...]
    """Text runs and images (float CHW tensors in [0, 1]) in content order; a captioning
    sample is (image, caption)."""
    shard: str
    """The tar shard it came from (for error messages and audits)."""
    restore_key: tuple[Any, ...]
    """Energon's __restore_key__: reloads exactly this sample."""

    @property
    def texts(self) -> tuple[str, ...]:
        """The text runs, in order."""
        return tuple(x for x in self.sequence if isinstance(x, str))

    @property
    def images(self) -> tuple[torch.Tensor, ...]:
        """The images, in order."""
        return tuple(x for x in self.sequence if not isinstance(x, str))

    @property
    def image_sizes(self) -> tuple[tuple[int, int], ...]:
        """(height, width) of each image, in pixels."""
        return tuple((int(x.shape[-2]), int(x.shape[-1])) for x in self.images)


@dataclass(frozen=True, kw_only=True, slots=True)
class BadSample:
    """A sample Energon could not load (an image that does not decode, a broken part)."""

    key: str
    """Its sample key ("" when Energon could not tell)."""
    shard: str
    """Its tar shard."""
    reason: str
    """The error, on one line."""


class _BadSampleHandler:
    """Energon's global_error_handler: records the bad sample, and raises DataError
    naming dataset, shard and key once more than `limit` were skipped (Energon's own
    default logs and skips, silently losing the sample)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.skipped: list[BadSample] = []

    @staticmethod
    def where(sample: Any, sources: Any) -> tuple[str, str]:
        """(key, shard) of a failed sample: from its source info, else from the raw
        WebDataset dict Energon passes (its __key__ and __shard__)."""
        source = next(iter(sources or ()), None)
        if source is not None and getattr(source, "file_names", ()):
            return source.file_names[0].split(".", 1)[0], source.shard_name
        raw = getattr(sample, "data", sample)
        raw = raw[0] if isinstance(raw, (list, tuple)) and raw else raw
        if isinstance(raw, dict):
            return str(raw.get("__key__", "")), str(raw.get("__shard__", ""))
        return str(getattr(sample, "__key__", "")), ""

    def __call__(self, exc: Exception, sample: Any, sources: Any = None) -> None:
        key, shard = self.where(sample, sources)
        root = exc
        while root.__cause__ is not None:  # Energon and WebDataset wrap the real error
            root = root.__cause__
        reason = " ".join(f"{type(root).__name__}: {root}".split())[:300]
        bad = BadSample(key=key, shard=shard, reason=reason)
        if len(self.skipped) >= self.limit:
            raise DataError(str(self.path / shard) if shard else str(self.path),
                            f"Energon cannot load it: {reason}" + (
                                f" ({len(self.skipped)} bad samples skipped before, the "
                                f"limit is {self.limit})" if self.limit else ""), key)
        self.skipped.append(bad)


def _to_sample(raw: Any) -> DataSample:
    """Our view of an Energon CaptioningSample or InterleavedSample."""
    from megatron.energon import CaptioningSample, InterleavedSample

    sources = getattr(raw, "__sources__", None) or ()
    shard = sources[0].shard_name if sources else ""
    if isinstance(raw, CaptioningSample):
        return DataSample(key=raw.__key__, kind=DataKind.CAPTIONING,
                          sequence=(raw.image, raw.caption), shard=shard,
                          restore_key=tuple(raw.__restore_key__))
    if isinstance(raw, InterleavedSample):
        return DataSample(key=raw.__key__, kind=DataKind.INTERLEAVED,
                          sequence=tuple(raw.sequence), shard=shard,
                          restore_key=tuple(raw.__restore_key__))
    raise DataError(shard or "dataset", f"Energon gave a {type(raw).__name__}, not a "
                                        "CaptioningSample or InterleavedSample", raw.__key__)


def unreadable_shards(path: str | Path, split: str | None = None) -> list[tuple[str, str]]:
    """(shard, reason) for each shard of the split (default: all) that is missing, not a
    tar file, cut short, or holds fewer samples than Energon's .info.json counted. Reads
    tar headers only; meant for the failure path."""
    folder = Path(path)
    counts = json.loads((folder / META_DIR / ".info.json").read_text())["shard_counts"]
    shards = read_splits(folder)[split] if split is not None else tuple(counts)
    bad: list[tuple[str, str]] = []
    for shard in shards:
        file = folder / shard
        try:
            size = file.stat().st_size
            with tarfile.open(file) as tar:
                members = tar.getmembers()
        except (OSError, tarfile.TarError) as exc:
            bad.append((shard, f"{type(exc).__name__}: {exc}"))
            continue
        short = [m.name for m in members if m.offset_data + m.size > size]
        keys = {m.name.split(".", 1)[0] for m in members if m.offset_data + m.size <= size}
        if short:
            bad.append((shard, f"cut short at {size} bytes (in {short[0]})"))
        elif len(keys) < counts.get(shard, 0):
            bad.append((shard, f"holds {len(keys)} of the {counts[shard]} samples indexed"))
    return bad


def split_names(path: str | Path) -> tuple[str, ...]:
    """The splits of a prepared dataset (in split.yaml order) or of an Energon metadataset
    YAML (its `splits`); DataError if it is neither."""
    folder = Path(path)
    if folder.is_file() and folder.suffix in (".yaml", ".yml"):
        import yaml

        config = yaml.safe_load(folder.read_text()) or {}
        if not isinstance(config, dict) or not isinstance(config.get("splits"), dict):
            raise DataError(str(folder), "not an Energon metadataset (no `splits` mapping)")
        return tuple(config["splits"])
    if not (folder / META_DIR / "split.yaml").is_file():
        raise DataError(str(folder), f"not a prepared dataset (no {META_DIR}/split.yaml; "
                                     "make one with `pipeweaver data prepare`)")
    return tuple(read_splits(folder))


class EnergonReader:
    """The samples of one split for one data-parallel rank, through Energon.

    path: a prepared dataset folder or an Energon metadataset YAML (MetadatasetV2: blends
    of prepared datasets; a `blend` of weights needs repeat, `blend_epochized` does not).
    shuffle_buffer: Energon's shuffle buffer (None reads shards and samples in order);
    repeat: loop over the split forever (training) instead of once (stats, audits);
    skip_bad_samples: how many samples Energon cannot load (e.g. an image that does not
    decode) may be skipped, each listed in `skipped`; one more raises DataError naming
    the shard and the key.
    """

    def __init__(self, path: str | Path, *, split: str = "train", rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int | None = None,
                 max_samples_per_sequence: int | None = None, repeat: bool = False,
                 seed: int = 0, skip_bad_samples: int = 0) -> None:
        from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

        names = split_names(path)
        if split not in names:
            raise DataError(str(path), f"no split {split!r} (it has {', '.join(names)})")
        if not 0 <= rank < world_size:
            raise DataError("rank", f"rank {rank} is not in [0, {world_size})")
        self.path = Path(path)
        self.split = split
        self._bad = _BadSampleHandler(self.path, skip_bad_samples)
        self.worker_config = WorkerConfig(rank=rank, world_size=world_size, num_workers=0,
                                          seed_offset=seed, global_error_handler=self._bad)
        dataset = get_train_dataset(
            self.path, split_part=split, worker_config=self.worker_config, batch_size=None,
            shuffle_buffer_size=shuffle_buffer, max_samples_per_sequence=max_samples_per_sequence,
            repeat=repeat)
        self.loader = get_savable_loader(dataset)
        """Energon's SavableDataLoader (its save_state_rank / restore_state_rank)."""

    def __iter__(self) -> Iterator[DataSample]:
        try:
            for raw in self.loader:
                yield _to_sample(raw)
        except DataError:
            raise
        except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
            raise self._unreadable(exc) from exc

    def _unreadable(self, exc: Exception) -> DataError:
        """DataError naming the broken shard when Energon cannot read on."""
        bad = unreadable_shards(self.path, self.split) if self.path.is_dir() else []
        if bad:
            shard, reason = bad[0]
            more = f" ({len(bad) - 1} more broken shards)" if len(bad) > 1 else ""
            return DataError(str(self.path / shard), f"unreadable shard: {reason}{more}")
        return DataError(str(self.path), f"Energon cannot read split {self.split!r}: "
                                         f"{type(exc).__name__}: {exc}")

    @property
    def skipped(self) -> tuple[BadSample, ...]:
        """The bad samples skipped so far (at most skip_bad_samples; one more raises
        DataError naming its shard and key)."""
        return tuple(self._bad.skipped)

    def save_state(self) -> Any:
        """Energon's state of this rank's loader (picklable); restore_state resumes it."""
        return self.loader.save_state_rank()

    def restore_state(self, state: Any) -> None:
        """Continue from a save_state() result (before iterating)."""
        self.loader.restore_state_rank(state)
