"""A training loader over a prepared dataset: global batches of real samples, per
data-parallel rank, with the state to resume at the first sample not yet trained.

[Note: real-data loader] Every process reads its data-parallel replica's samples through
its own SampleSource (data/samples.py: an EnergonReader of rank = DP rank, world = DP
size), so the TP and PP ranks of one replica read the same samples without
communication. Samples are tokenized, checked against the model's microbatch limits
(SampleSource skips or names the bad ones), and packed in Energon's order by the same
BatchStream the synthetic workload uses (global batches of the spec's microbatches;
the sample that closes a full batch opens the next one). The planner reads batches
ahead (`batch(i)` reads up to i; the plan feed asks for i + lookahead) and training
takes them in order, so the step trains exactly the samples the planner saw.

Restart: before each sample is pulled from Energon its loader state is taken, so the
state of a batch is the state before its first sample. A checkpoint after iteration i
stores the state of batch i + 1 (`state_after(i)`): a resumed run re-reads the samples
that sat in the read-ahead (or were carried over) instead of skipping them.

Bad samples: a sample Energon cannot load (e.g. a corrupt image) and a sample that alone
exceeds a microbatch limit raise DataError naming the shard and key, unless
skip_bad_samples allows skipping it; skips are counted over both kinds and over restarts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..workload import BatchStream, GlobalBatch, TokenRules, WorkloadError
from .errors import DataError
from .reader import EnergonReader
from .samples import LoaderState, SampleSource
from .tokenizer import TextTokenizer


@dataclass(kw_only=True)
class LoadedBatch:
    """One iteration's global batch with its samples."""

    batch: GlobalBatch
    """What the planner plans."""
    samples: dict[int, Any]
    """TokenizedSample by sample_id."""
    state: LoaderState
    """The loader's state before the batch's first sample."""
    read_seconds: float
    """Time spent reading, decoding, tokenizing and packing it."""
    skipped: tuple[str, ...] = field(default_factory=tuple)
    """Keys of bad samples skipped while reading it (again when a later epoch meets one)."""

    @property
    def keys(self) -> list[str]:
        """The sample keys in microbatch order."""
        return [self.samples[s.sample_id].key for mb in self.batch.microbatches
                for s in mb.samples]


class BatchLoader:
    """Global batches of one data-parallel replica (see [Note: real-data loader])."""

    def __init__(self, path: str | Path, *, tokenizer: TextTokenizer, rules: TokenRules,
                 num_microbatches: int, dp_rank: int = 0, dp_size: int = 1,
                 split: str = "train", skip_bad_samples: int = 0, seed: int = 0,
                 state: LoaderState | None = None, first_iteration: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rules = rules
        self.source = SampleSource(path, tokenizer=tokenizer, check=rules.check,
                                   dp_rank=dp_rank, dp_size=dp_size, split=split,
                                   skip_bad_samples=skip_bad_samples, seed=seed, state=state)
        self.reader = self.source.reader
        self._held: dict[int, Any] = {}
        self._before: dict[int, LoaderState] = {}
        self._ready: dict[int, LoadedBatch] = {}
        self._stream = BatchStream(self._samples(), rules, num_microbatches, first_iteration)
        self._read_to = first_iteration - 1

    @property
    def skipped(self) -> int:
        """Bad samples skipped since the run's start (restarts included), each once."""
        return self.source.skipped

    def _samples(self) -> Iterator:
        for tokenized, before in self.source:
            sample_id = tokenized.meta.sample_id
            self._held[sample_id] = tokenized
            self._before[sample_id] = before
            yield tokenized.meta

    def _read_next(self) -> None:
        began = time.perf_counter()
        try:
            batch = self._stream.next_batch()
        except StopIteration:
            raise DataError(str(self.reader.path), "the split ran out of samples") from None
        ids = [s.sample_id for mb in batch.microbatches for s in mb.samples]
        state = self._before[ids[0]]
        samples = {i: self._held.pop(i) for i in ids}
        for i in ids:
            self._before.pop(i, None)
        skips = self.source.take_skips()
        self._ready[batch.iteration] = LoadedBatch(
            batch=batch, samples=samples, state=state, skipped=skips,
            read_seconds=time.perf_counter() - began)
        self._read_to = batch.iteration

    def batch(self, iteration: int) -> LoadedBatch:
        """The global batch of `iteration` (reading up to it); earlier ones are released."""
        while self._read_to < iteration:
            self._read_next()
        for done in [i for i in self._ready if i < iteration]:
            del self._ready[done]
        if iteration not in self._ready:
            raise RuntimeError(f"batch {iteration} was released already")
        return self._ready[iteration]

    def planner_batches(self, first: int) -> Iterator[GlobalBatch]:
        """Every global batch from `first` on, read as the planner asks for them."""
        iteration = first
        while True:
            while self._read_to < iteration:
                self._read_next()
            yield self._ready[iteration].batch
            iteration += 1

    def state_after(self, iteration: int) -> LoaderState:
        """The state to resume with once `iteration` is trained: before the first sample
        of the next batch (read ahead, carried over, or not read yet)."""
        if iteration + 1 in self._ready:
            return self._ready[iteration + 1].state
        if self._read_to != iteration:
            raise RuntimeError(f"loader state after {iteration}: batches are read up to "
                               f"{self._read_to}")
        if self._held:  # the sample that closed the batch: the next one's first
            return self._before[min(self._held)]
        return self.source.state()


def prepared_source(path: str | Path, rules: TokenRules, split: str = "train",
                    tokenizer: TextTokenizer | None = None) -> Iterator:
    """SampleMeta of a prepared dataset's split, read once through Energon in order
    (`--workload DIR`); WorkloadError naming shard and key for a sample over a limit."""
    from ..models.real_data import tokenize_sample
    from .tokenizer import ByteTokenizer

    tok = tokenizer or ByteTokenizer()
    try:
        for sample_id, sample in enumerate(EnergonReader(path, split=split)):
            meta = tokenize_sample(sample.key, sample.shard, sample.sequence, tok,
                                   sample_id).meta
            try:
                rules.check(meta)
            except WorkloadError as exc:
                raise WorkloadError(f"{Path(path) / sample.shard}: sample {sample.key!r}: "
                                    f"{exc}") from None
            yield meta
    except DataError as exc:
        raise WorkloadError(str(exc)) from None


def is_prepared_dataset(path: str | Path) -> bool:
    """A folder Energon prepared (it has .nv-meta), or an Energon metadataset YAML."""
    from .prepare import META_DIR

    folder = Path(path)
    return (folder / META_DIR).is_dir() or (folder.is_file() and folder.suffix in (".yaml", ".yml"))
