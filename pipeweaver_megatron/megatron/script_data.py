"""The user's data: the script's own microbatches, read ahead for the planner.

Megatron builds the script's datasets and data iterators (pretrain_vlm.py: its
train_valid_test_datasets_provider, Megatron's samplers over data parallelism) and hands
an iterator to every forward_backward call. ScriptBatches reads it whole iterations at a
time, lookahead iterations ahead of training, through the script's own get_batch (which
also broadcasts over tensor parallelism), turns every microbatch into MicrobatchData
(models.llava_data.llava_microbatch; pretrain_gpt.py's: models.gpt.gpt_microbatch) and
its metadata into a GlobalBatch for the planner; forward_backward then takes exactly those microbatches, in order. Every
microbatch Megatron's iterator yields is planned once and trained once; the ones read
ahead beyond the last iteration are never trained, and Megatron's sampler, which
counts consumed samples by trained iterations, hands them out again after a resume.

[Note: metadata of a LLaVA microbatch] One sample per microbatch (--micro-batch-size 1)
whose images are its tiles (each a fixed img_h x img_w tile, as TokenRules prices a
CLIP ViT) and whose text tokens are the rest of the LM sequence LLaVA builds, so
TokenRules' LM tokens equal the combined sequence the chunks run. Sample ids count the
replica's microbatches from the first iteration read (iteration * microbatches + j).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator

from ..workload import GlobalBatch, ImageMeta, Microbatch, SampleMeta


class ScriptBatches:
    """The script's microbatches of one data iterator, read ahead by iterations."""

    def __init__(self, get_batch: Callable[[Any], Any], convert: Callable[[Any, int], Any],
                 num_microbatches: int, image_size: tuple[int, int], start: int = 0,
                 last: int | None = None) -> None:
        """get_batch: the script's (reads one microbatch from Megatron's iterator);
        convert(batch, index) -> MicrobatchData; start: the first iteration read; last:
        the last iteration that will be trained (nothing is read beyond it)."""
        self.get_batch, self.convert = get_batch, convert
        self.count, self.image_size = num_microbatches, image_size
        self.next_read, self.last = start, last
        self._data: deque[tuple[int, list, list]] = deque()
        self.taken_keys: list[str | None] = []
        """The sample keys of the iteration take() returned last, where the iterator
        names them (vlm_data.VlmSamples.last_key; None each for the mock dataset)."""
        self._meta: deque[GlobalBatch] = deque()

    def fill(self, data_iterator: Any, upto: int) -> None:
        """Read iterations up to `upto` (capped at the last one) from Megatron's iterator."""
        if self.last is not None:
            upto = min(upto, self.last)
        source = getattr(data_iterator, "iterable", data_iterator)  # under RerunDataIterator
        while self.next_read <= upto:
            iteration = self.next_read
            data, keys = [], []
            for j in range(self.count):
                data.append(self.convert(self.get_batch(data_iterator), j))
                keys.append(getattr(source, "last_key", None))
            self._data.append((iteration, data, keys))
            self._meta.append(self.metadata(iteration, data))
            self.next_read += 1

    def metadata(self, iteration: int, data: list) -> GlobalBatch:
        """The GlobalBatch the planner sees (see [Note: metadata of a LLaVA microbatch];
        a GPT microbatch is one sample of text tokens alone)."""
        height, width = self.image_size
        microbatches = []
        for j, microbatch in enumerate(data):
            text = microbatch.text
            images = microbatch.images
            text_tokens = int(text.tokens.numel()) - sum(images.lm_tokens)
            count = len(images.indices)
            sample = SampleMeta(sample_id=iteration * self.count + j, text_tokens=text_tokens,
                                images=(ImageMeta(height=height, width=width),) * count
                                if count else ())
            microbatches.append(Microbatch(index=j, samples=(sample,)))
        return GlobalBatch(iteration=iteration, microbatches=tuple(microbatches))

    def planned(self) -> Iterator[GlobalBatch]:
        """The metadata of every iteration read, once each, in order (the planner feed's
        source: it asks only for iterations fill has read)."""
        while self._meta:
            yield self._meta.popleft()

    def take(self, iteration: int) -> list:
        """The MicrobatchData of `iteration` (read before by fill)."""
        if not self._data or self._data[0][0] != iteration:
            held = [item[0] for item in self._data]
            raise RuntimeError(f"the data read ahead holds iterations {held}, training asks "
                               f"for {iteration}")
        _, data, self.taken_keys = self._data.popleft()
        return data
