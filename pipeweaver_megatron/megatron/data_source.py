"""pretrain_lmm.py's --data-path: the training loop's batches from a prepared dataset.

One BatchLoader per process over its data-parallel replica's share (see [Note: real-data
loader] in data/loader.py); the plan feed's first rank reads --pipeweaver-lookahead
batches ahead for the planner, and every rank takes the same batches for training. A
checkpoint carries each rank's loader state (the state before the first sample not yet
trained), and --load restores it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import ModelSpec
from ..data.errors import DataError
from ..data.loader import BatchLoader, LoadedBatch, LoaderState
from ..data.tokenizer import TextTokenizer, load_tokenizer
from ..workload import TokenRules
from .model_args import FlagError

DATA_KEY = "data"
"""The loader state's key in a checkpoint's extras."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepData:
    """One iteration's tensors and what the log says about them."""

    microbatches: list
    """MicrobatchData per microbatch, on the device."""
    keys: list[str]
    """The sample keys trained, in microbatch order."""
    skipped: tuple[str, ...]
    """Keys of bad samples skipped while reading the batch."""
    read_seconds: float
    """Time the loader took to read, decode, tokenize and pack the batch (on the plan
    feed's rank, ahead of the step, by the lookahead)."""
    prepare_seconds: float
    """Time to turn it into tensors (resize, patchify) on this rank."""


def open_tokenizer(args, model: ModelSpec) -> TextTokenizer:
    """--tokenizer-model (default byte-level); its ids must fit the LM's vocabulary."""
    try:
        tokenizer = load_tokenizer(args.tokenizer_model)
    except DataError as exc:
        raise FlagError(f"--tokenizer-model: {exc}") from None
    vocab = model.language_model.vocab_size
    if tokenizer.vocab_size > vocab:
        raise FlagError(f"--tokenizer-model {tokenizer.name}: {tokenizer.vocab_size} ids do not "
                        f"fit {model.name}'s vocab_size of {vocab}")
    return tokenizer


class DataSource:
    """The training loop's batches from --data-path for this process."""

    def __init__(self, args, model: ModelSpec, d_rank: int, dp: int,
                 state: LoaderState | None, first_iteration: int) -> None:
        self.model = model
        self.rules = TokenRules.from_model(model)
        if self.rules.image_rule is None:
            raise FlagError(f"--data-path: {model.name} has no vision encoder for the images")
        self.tokenizer = open_tokenizer(args, model)
        self.loader = BatchLoader(
            args.data_path, tokenizer=self.tokenizer, rules=self.rules,
            num_microbatches=model.parallel.num_microbatches, dp_rank=d_rank, dp_size=dp,
            split=args.data_split, skip_bad_samples=args.pipeweaver_skip_bad_samples,
            seed=args.seed, state=state, first_iteration=first_iteration)

    def planner_batches(self, first: int):
        """The GlobalBatch of every iteration from `first` on, for the plan feed."""
        return self.loader.planner_batches(first)

    def step(self, iteration: int, device) -> StepData:
        """The tensors of `iteration`'s batch: exactly the samples its plan was made for."""
        from ..models.real_data import real_microbatch_data

        loaded: LoadedBatch = self.loader.batch(iteration)
        began = time.perf_counter()
        data = [real_microbatch_data(self.model, mb, self.rules, loaded.samples,
                                     self.tokenizer.image_token_id).to(device)
                for mb in loaded.batch.microbatches]
        return StepData(microbatches=data, keys=loaded.keys, skipped=loaded.skipped,
                        read_seconds=loaded.read_seconds,
                        prepare_seconds=time.perf_counter() - began)

    def state_after(self, iteration: int) -> LoaderState:
        """What a checkpoint after `iteration` saves."""
        return self.loader.state_after(iteration)

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (restarts included)."""
        return self.loader.skipped


def saved_state(extras: dict, load: str) -> LoaderState:
    """The loader state of a loaded checkpoint; FlagError if it has none."""
    state = extras.get(DATA_KEY)
    if state is None:
        raise FlagError(f"--load {load}: the checkpoint holds no data loader state (saved "
                        "without --data-path); resume it without --data-path")
    return state
