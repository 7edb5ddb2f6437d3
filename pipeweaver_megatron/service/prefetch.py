"""PrefetchingIterator: the data-iterator wrapper that keeps the planner ahead."""

from __future__ import annotations

from collections import deque
from typing import Iterator, Protocol

from ..workload import GlobalBatch


class Submitter(Protocol):
    def submit(self, iteration: int, batch: GlobalBatch) -> None: ...


class PrefetchingIterator:
    """Yields (iteration, batch) in order, numbering from `start`; before yielding
    iteration i it has submitted batches i .. i + lookahead to the service (fewer at the
    end of the data). Every batch is submitted once and yielded once."""

    def __init__(self, batches: Iterator[GlobalBatch], service: Submitter, lookahead: int = 1,
                 start: int = 0) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self._source = iter(batches)
        self._service = service
        self.lookahead = lookahead
        self._next = start
        self._ahead: deque[tuple[int, GlobalBatch]] = deque()
        self._exhausted = False

    def __iter__(self) -> "PrefetchingIterator":
        return self

    def __next__(self) -> tuple[int, GlobalBatch]:
        while not self._exhausted and len(self._ahead) <= self.lookahead:
            try:
                batch = next(self._source)
            except StopIteration:
                self._exhausted = True
                break
            self._service.submit(self._next, batch)
            self._ahead.append((self._next, batch))
            self._next += 1
        if not self._ahead:
            raise StopIteration
        return self._ahead.popleft()

    @property
    def submitted(self) -> int:
        """Batches submitted but not yet yielded."""
        return len(self._ahead)
