"""Tokenized samples of one data-parallel replica's share, each with the state before it.

The one sample stream under both training loaders: BatchLoader (pretrain_lmm.py, packed
global batches) and megatron.vlm_data (pretrain_vlm.py, one sample per microbatch). It
reads the split through its own EnergonReader (rank = DP rank, world = DP size),
tokenizes every sample, checks it against the loader's limits and yields it with the
LoaderState taken before Energon delivered it, so a loader can save the state before the
first sample it has not trained.

Bad samples: one Energon cannot load (e.g. a corrupt image) and one the check refuses
(WorkloadError: over the token budget, no image where the model needs one) raise
DataError naming the shard and the key, unless skip_bad_samples allows skipping it;
skips are counted by key over both kinds and over restarts (the state carries them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..workload import SampleMeta, WorkloadError
from .errors import DataError
from .reader import EnergonReader
from .tokenizer import TextTokenizer


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderState:
    """Where a loader resumes (saved in checkpoints, one per data-parallel rank)."""

    energon: Any
    """Energon's savable-loader state before the first sample to read."""
    next_sample_id: int
    """The sample_id that sample gets (ids count the kept samples from the run's start)."""
    skipped: tuple[str, ...]
    """Keys of the bad samples skipped before it (each once, whichever epoch met it)."""
    rank: int
    """The data-parallel rank it belongs to."""
    world: int
    """The data-parallel size it was saved under."""


_UNLIMITED = 1 << 62
"""The reader's own skip limit: SampleSource counts bad samples itself, by key."""


class SampleSource:
    """The tokenized samples of one split for one data-parallel rank (see the module
    docstring). check(meta) raises WorkloadError for a sample the loader cannot take;
    repeat: loop over the split for ever (training) instead of once."""

    def __init__(self, path: str | Path, *, tokenizer: TextTokenizer,
                 check: Callable[[SampleMeta], Any], dp_rank: int = 0, dp_size: int = 1,
                 split: str = "train", skip_bad_samples: int = 0, seed: int = 0,
                 state: LoaderState | None = None, repeat: bool = True) -> None:
        if state is not None and (state.rank, state.world) != (dp_rank, dp_size):
            raise DataError(str(path), f"the saved loader state is data-parallel rank "
                                       f"{state.rank} of {state.world}, this run is rank "
                                       f"{dp_rank} of {dp_size}: resume with the same DP size")
        self.tokenizer, self.check = tokenizer, check
        self.rank, self.world = dp_rank, dp_size
        self.limit = skip_bad_samples
        self._bad: dict[str, None] = dict.fromkeys(state.skipped if state is not None else ())
        if len(self._bad) > skip_bad_samples:
            raise DataError("--pipeweaver-skip-bad-samples",
                            f"the resumed run had skipped {len(self._bad)} bad samples, more "
                            f"than {skip_bad_samples}")
        self.reader = EnergonReader(path, split=split, rank=dp_rank, world_size=dp_size,
                                    repeat=repeat, seed=seed,
                                    skip_bad_samples=_UNLIMITED)  # counted here, by key
        if state is not None:
            self.reader.restore_state(state.energon)
        self.next_id = state.next_sample_id if state is not None else 0
        self._new_skips: list[str] = []
        self.reasons: dict[str, str] = {}
        """Why each sample skipped by this process was skipped (its shard and reason)."""

    @property
    def skipped(self) -> int:
        """Bad samples skipped since the run's start (restarts included), each once."""
        return len(self._bad)

    def take_skips(self) -> tuple[str, ...]:
        """Keys of the bad samples skipped since the last call (again when a later epoch
        meets one)."""
        skips, self._new_skips = tuple(self._new_skips), []
        return skips

    def state(self) -> LoaderState:
        """The state before the next sample Energon delivers."""
        return LoaderState(energon=self.reader.save_state(), next_sample_id=self.next_id,
                           skipped=tuple(self._bad), rank=self.rank, world=self.world)

    def __iter__(self) -> Iterator[tuple[Any, LoaderState]]:
        """(models.real_data.TokenizedSample, the state before it), in Energon's order;
        sample ids count the kept samples."""
        from ..models.real_data import tokenize_sample

        samples = iter(self.reader)
        seen = len(self.reader.skipped)
        while True:
            before = self.state()
            try:
                sample = next(samples)
            except StopIteration:
                return
            for bad in self.reader.skipped[seen:]:
                self._skip(bad.key, bad.shard, f"Energon cannot load it: {bad.reason}")
            seen = len(self.reader.skipped)
            tokenized = tokenize_sample(sample.key, sample.shard, sample.sequence,
                                        self.tokenizer, self.next_id)
            try:
                self.check(tokenized.meta)
            except WorkloadError as exc:
                self._skip(sample.key, sample.shard,
                           str(exc).replace(f"sample {self.next_id} ", "it ", 1))
                continue
            self.next_id += 1
            yield tokenized, before

    def _skip(self, key: str, shard: str, reason: str) -> None:
        """Skip a bad sample, or raise DataError naming it once the limit is reached (a
        sample met again in a later epoch was counted already)."""
        if key not in self._bad and len(self._bad) >= self.limit:
            more = (f"{len(self._bad)} bad samples skipped before, the limit is {self.limit}"
                    if self.limit else "--pipeweaver-skip-bad-samples N skips up to N")
            raise DataError(str(self.reader.path / shard), f"{reason} ({more})", key)
        self._bad[key] = None
        self._new_skips.append(key)
        self.reasons[key] = f"{shard}: {reason}"
