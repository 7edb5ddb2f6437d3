"""Packing samples into microbatches: greedy, order-preserving next-fit.

A sample is appended to the open microbatch while the microbatch stays within ALL
limits (LM tokens, images, clips, clip seconds); otherwise the open microbatch is closed
and the sample opens the next one. A sample that alone exceeds a limit is an error: a
data pipeline must split or truncate it before packing (the generators here do).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .meta import GlobalBatch, Microbatch, SampleMeta
from .rules import SampleCost, TokenRules

_EMPTY = SampleCost(text_tokens=0, image_lm_tokens=0, images=0, clips=0, seconds=0.0)


class _Open:
    """The microbatch being filled."""

    __slots__ = ("samples", "used")

    def __init__(self) -> None:
        self.samples: list[SampleMeta] = []
        self.used = _EMPTY

    def add(self, sample: SampleMeta, cost: SampleCost) -> None:
        self.samples.append(sample)
        u = self.used
        self.used = SampleCost(text_tokens=u.text_tokens + cost.text_tokens,
                               image_lm_tokens=u.image_lm_tokens + cost.image_lm_tokens,
                               images=u.images + cost.images, clips=u.clips + cost.clips,
                               seconds=u.seconds + cost.seconds)

    def close(self, index: int) -> Microbatch:
        return Microbatch(index=index, samples=tuple(self.samples))


def pack(samples: Iterable[SampleMeta], rules: TokenRules) -> list[Microbatch]:
    """Pack samples, in order, into microbatches (indices from 0).

    Raises WorkloadError, naming the sample, for a sample that alone exceeds a limit.
    """
    out: list[Microbatch] = []
    cur = _Open()
    for sample in samples:
        cost = rules.check(sample)
        if cur.samples and not rules.fits(cur.used, cost):
            out.append(cur.close(len(out)))
            cur = _Open()
        cur.add(sample, cost)
    if cur.samples:
        out.append(cur.close(len(out)))
    return out


class BatchStream:
    """Global batches of exactly `num_microbatches` packed microbatches from a sample source.

    The sample that closes a batch's last microbatch (it did not fit) is carried over into
    the next batch, so no sample is dropped or duplicated across batches. When the source
    ends, the last batch may hold fewer microbatches; after it, `next_batch()` raises
    StopIteration. The stream is also an iterator over its batches.
    """

    def __init__(self, source: Iterable[SampleMeta], rules: TokenRules,
                 num_microbatches: int, first_iteration: int = 0) -> None:
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self._source: Iterator[SampleMeta] = iter(source)
        self._rules = rules
        self._num_microbatches = num_microbatches
        self._iteration = first_iteration
        self._carry: tuple[SampleMeta, SampleCost] | None = None
        self._done = False

    @property
    def rules(self) -> TokenRules:
        """The rules the stream packs with."""
        return self._rules

    @property
    def num_microbatches(self) -> int:
        """Microbatches per global batch."""
        return self._num_microbatches

    @property
    def exhausted(self) -> bool:
        """The source has ended and its last batch was returned."""
        return self._done

    def _pull(self) -> tuple[SampleMeta, SampleCost] | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        sample = next(self._source, None)
        return None if sample is None else (sample, self._rules.check(sample))

    def next_batch(self) -> GlobalBatch:
        """The next global batch; StopIteration once the source is used up."""
        if self._done:
            raise StopIteration("the workload source is exhausted")
        microbatches: list[Microbatch] = []
        cur = _Open()
        while True:
            item = self._pull()
            if item is None:
                self._done = True
                if cur.samples:
                    microbatches.append(cur.close(len(microbatches)))
                if not microbatches:
                    raise StopIteration("the workload source is exhausted")
                break
            sample, cost = item
            if cur.samples and not self._rules.fits(cur.used, cost):
                microbatches.append(cur.close(len(microbatches)))
                if len(microbatches) == self._num_microbatches:
                    self._carry = item
                    break
                cur = _Open()
            cur.add(sample, cost)
        batch = GlobalBatch(iteration=self._iteration, microbatches=tuple(microbatches))
        self._iteration += 1
        return batch

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> GlobalBatch:
        return self.next_batch()
