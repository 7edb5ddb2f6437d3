"""pretrain_vlm.py's --data-path: a prepared Energon dataset as the script's microbatches.

pretrain_vlm.py builds only a mock dataset. With the patches applied, `--data-path DIR`
(a folder `pipeweaver data prepare` made, or an Energon metadataset YAML) replaces it,
with and without --pipeweaver, so both schedules train the same samples: Megatron
passes the iterators through (--dataloader-type external) and the script's own get_batch
reads them (on every rank; it broadcasts TP rank 0's), one sample per microbatch as
--micro-batch-size 1 means.

[Note: a pretrain_vlm.py sample] A sample's content (text runs and images, in order;
a captioning sample is its image, then its caption) becomes one sequence: each text run
the tokenizer's ids, each image DEFAULT_IMAGE_TOKEN_INDEX (-200, one position, which
LLaVAModel expands to the tile's img_seq_len embeddings), then the tokenizer's EOD.
tokens are the sequence but its last item and labels the sequence from its second item
(the mock dataset's shift; LLaVAModel finds the images in both); the loss mask is 0 at
an image and where the label is an image, 1 elsewhere (LLaVAModel masks the same
positions of the combined sequence). Each image is resized to one img_h x img_w tile
(PIL, bicubic on 8-bit pixels, as LLaVAModel takes one tile per image when get_batch
passes no tile counts) and normalised with CLIP's mean and std. The tokenizer is
Megatron's (--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR reads `pipeweaver
data demo`'s BPE); under NullTokenizer, which cannot read text, the byte-level tokenizer (ids 0..259, EOD
<eos>). A sample without images (get_batch's broadcast cannot carry an empty image
tensor) or whose LM sequence exceeds --decoder-seq-length (the text plus img_seq_len
per image) is bad data: DataError naming the shard and key, or one of
--pipeweaver-skip-bad-samples N skips.

Restart (Megatron's --dataloader-save, which examples/multimodal uses for Energon): the
train iterator's save_state() is the loader state before the first sample not yet
trained; Megatron saves it per data-parallel rank (from TP rank 0 of the first pipeline
stage) as DIR/iter_N/mp_rank_00[_000]/train_dataloader_dprankDDD.pt with every
checkpoint, and a run with --load restores it, so a resumed run trains the next unseen
sample. --dataloader-save defaults to --save. Under --pipeweaver the drop-in reads
--pipeweaver-lookahead iterations ahead; it tells the iterator what it trained
(track_training / trained), so the samples read ahead are re-read after a restart, not
skipped. Validation reads the "val" split round and round (each evaluation continues
where the last stopped), the test set the "test" split when the dataset has one.
"""

from __future__ import annotations

import glob
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data.errors import DataError
from ..data.samples import LoaderState, SampleSource
from ..data.tokenizer import EOS, ByteTokenizer
from ..workload import SampleMeta, WorkloadError
from .model_args import FlagError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's pixel normalisation (OpenAI's; Megatron-LM's examples/multimodal uses it)."""
STATE_FILE = "train_dataloader_dprank{:03d}.pt"
"""Megatron's name of one data-parallel rank's loader state (checkpointing.py)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VlmLimits:
    """What one pretrain_vlm.py microbatch can take."""

    img_h: int
    img_w: int
    img_seq_len: int
    """LM embeddings of one tile (get_num_image_embeddings)."""
    max_tokens: int
    """--decoder-seq-length: LLaVAModel's longest LM sequence."""

    def check(self, meta: SampleMeta) -> None:
        """WorkloadError for a sample the script cannot train (see the module note)."""
        if not meta.images:
            raise WorkloadError(f"sample {meta.sample_id} has no image (pretrain_vlm.py's "
                                "get_batch broadcasts every sample's images)")
        tokens = meta.text_tokens + len(meta.images) * self.img_seq_len
        if tokens > self.max_tokens:
            raise WorkloadError(
                f"sample {meta.sample_id} needs {tokens} LM tokens ({meta.text_tokens} text + "
                f"{len(meta.images)} images x {self.img_seq_len}), more than "
                f"--decoder-seq-length {self.max_tokens} (raise --seq-length)")


class MegatronText:
    """Megatron's tokenizer as the data layer's TextTokenizer (encode alone is used)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer, self.name = tokenizer, name

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    @property
    def image_token_id(self) -> int:
        return -1  # images are DEFAULT_IMAGE_TOKEN_INDEX, never a text id

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.tokenize(text))

    def decode(self, ids) -> str:
        return self._tokenizer.detokenize(list(ids))


def script_tokenizer(args) -> tuple[Any, int]:
    """(TextTokenizer, EOD id) of the run's Megatron tokenizer (see the module note)."""
    if args.tokenizer_type == "NullTokenizer":
        text = ByteTokenizer()
        vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size
        if vocab < text.vocab_size:
            raise FlagError(f"--data-path with --tokenizer-type NullTokenizer reads text as "
                            f"bytes (ids up to {text.vocab_size - 1}): --vocab-size {vocab} is "
                            f"too small")
        return text, text.encode(EOS)[0]
    from megatron.training import get_tokenizer

    tokenizer = get_tokenizer()
    return MegatronText(tokenizer, args.tokenizer_type), int(tokenizer.eod)


def clip_tile(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, height, width] float32: a CHW image in [0, 1] resized (PIL, bicubic, 8-bit) and
    normalised with CLIP's mean and std."""
    from ..models.real_data import resize_pixels

    tile = torch.from_numpy(resize_pixels(image, height, width)).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((tile - mean) / std).contiguous()


def vlm_sample(content, limits: VlmLimits, eod: int) -> dict[str, torch.Tensor]:
    """The microbatch pretrain_vlm.py's get_batch reads, of a tokenized sample's content
    (text runs as ids, images as CHW tensors in [0, 1]): tokens, labels, loss_mask,
    position_ids [1, S] and image [images, 3, img_h, img_w] (see the module note)."""
    from megatron.core.models.multimodal.llava_model import DEFAULT_IMAGE_TOKEN_INDEX

    sequence: list[int] = []
    tiles = []
    for item in content:
        if isinstance(item, tuple):
            sequence.extend(item)
        else:
            sequence.append(DEFAULT_IMAGE_TOKEN_INDEX)
            tiles.append(clip_tile(item, limits.img_h, limits.img_w))
    sequence.append(eod)
    ids = torch.tensor(sequence, dtype=torch.int64)
    tokens, labels = ids[:-1], ids[1:]
    loss_mask = ((tokens != DEFAULT_IMAGE_TOKEN_INDEX)
                 & (labels != DEFAULT_IMAGE_TOKEN_INDEX)).float()
    return {"tokens": tokens[None], "labels": labels[None], "loss_mask": loss_mask[None],
            "position_ids": torch.arange(tokens.numel(), dtype=torch.int64)[None],
            "image": torch.stack(tiles)}


class VlmSamples:
    """One split's samples for this data-parallel rank as pretrain_vlm.py microbatches,
    with Megatron's save_state (see the module docstring)."""

    def __init__(self, source: SampleSource, limits: VlmLimits, eod: int) -> None:
        self.source, self.limits, self.eod = source, limits, eod
        self._samples = iter(source)
        self._yielded: deque[tuple[str, LoaderState]] = deque()
        """(key, state before it) of the samples yielded and not known trained."""
        self._tracking = False
        self.last_key: str | None = None

    def __iter__(self) -> VlmSamples:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokenized, before = next(self._samples)
        for key in self.source.take_skips():
            print(f"--data-path: skipped bad sample {key!r} ({self.source.reasons[key]}; "
                  f"{self.source.skipped} of at most {self.source.limit})", flush=True)
        self.last_key = tokenized.key
        if self._tracking:
            self._yielded.append((tokenized.key, before))
        return vlm_sample(tokenized.content, self.limits, self.eod)

    def track_training(self) -> None:
        """Samples yielded from now on count as trained only once trained() says so
        (the drop-in reads ahead); otherwise every sample yielded is trained."""
        self._tracking = True

    def trained(self, count: int) -> None:
        """The oldest `count` samples yielded and not yet marked have been trained."""
        for _ in range(min(count, len(self._yielded))):
            self._yielded.popleft()

    def save_state(self) -> LoaderState:
        """The state before the first sample not yet trained (Megatron saves it)."""
        return self._yielded[0][1] if self._yielded else self.source.state()

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (restarts included)."""
        return self.source.skipped


def saved_state(args, dp_rank: int) -> LoaderState | None:
    """The loader state of the checkpoint --load resumes (args.iteration; None for a run
    from iteration 0, --finetune, or a checkpoint saved without --data-path)."""
    folder = getattr(args, "dataloader_save", None) or getattr(args, "load", None)
    if not (folder and getattr(args, "load", None) and getattr(args, "iteration", 0)):
        return None
    pattern = os.path.join(folder, f"iter_{args.iteration:07d}", "mp_rank_00*",
                           STATE_FILE.format(dp_rank))
    found = sorted(glob.glob(pattern))
    if not found:
        if getattr(args, "dataloader_save", None):
            raise FlagError(f"--dataloader-save {folder}: no loader state of iteration "
                            f"{args.iteration} for data-parallel rank {dp_rank} ({pattern})")
        print(f"--data-path: {args.load} holds no loader state of iteration {args.iteration}: "
              "training starts at the dataset's first sample", flush=True)
        return None
    saved = torch.load(found[0], map_location="cpu", weights_only=False)
    return saved["dataloader_state_dict"]


def install_state_saver() -> Callable[[], None]:
    """Megatron's checkpointing saves train_iterator.iterable.save_state(); with virtual
    stages its train iterator is a list, one per model chunk (the drop-in reads the
    first, the others are None): pass it the first. Returns a function that restores
    Megatron's."""
    from megatron.training import checkpointing

    original = checkpointing.maybe_save_dataloader_state

    def save(train_iterator, iteration, dataloader_save_path):
        if isinstance(train_iterator, (list, tuple)):
            train_iterator = next((it for it in train_iterator if it is not None), None)
        return original(train_iterator, iteration, dataloader_save_path)

    checkpointing.maybe_save_dataloader_state = save
    return lambda: setattr(checkpointing, "maybe_save_dataloader_state", original)


def vlm_datasets_provider(args_of: Callable[[], Any]) -> Callable:
    """pretrain_vlm.py's train_valid_test_datasets_provider for --data-path (see the
    module docstring); args_of() gives Megatron's arguments."""

    def provider(train_val_test_num_samples: Any = None):
        from megatron.core import parallel_state
        from megatron.core.models.vision.clip_vit_model import get_num_image_embeddings

        args = args_of()
        paths = args.data_path if isinstance(args.data_path, list) else [args.data_path]
        if len(paths) != 1:
            raise FlagError(f"--data-path takes one prepared dataset or Energon metadataset "
                            f"YAML (blend datasets there), got {len(paths)}: {paths}")
        if args.dataloader_type != "external":
            raise FlagError(f"--data-path DIR is read as an Energon dataset: pass "
                            f"--dataloader-type external, not {args.dataloader_type}")
        if args.micro_batch_size != 1:
            raise FlagError("--data-path: one sample per microbatch, --micro-batch-size 1")
        if not getattr(args, "dataloader_save", None) and getattr(args, "save", None):
            args.dataloader_save = args.save
        limits = VlmLimits(img_h=args.img_h, img_w=args.img_w, max_tokens=args.decoder_seq_length,
                           img_seq_len=get_num_image_embeddings(
                               args.img_h, args.img_w, args.patch_dim, "clip",
                               args.disable_vision_class_token, 1, False))
        text, eod = script_tokenizer(args)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        skip = getattr(args, "pipeweaver_skip_bad_samples", 0)
        from ..data.reader import split_names

        names = split_names(paths[0])

        def split(name: str, state: LoaderState | None = None) -> VlmSamples | None:
            if name not in names:
                return None
            source = SampleSource(paths[0], tokenizer=text, check=limits.check, split=name,
                                  dp_rank=dp_rank, dp_size=dp_size, skip_bad_samples=skip,
                                  seed=args.seed, state=state)
            return VlmSamples(source, limits, eod)

        try:
            train = split("train", saved_state(args, dp_rank))
            if train is None:
                raise DataError(paths[0], f"no split 'train' (it has {', '.join(names)})")
            valid = split("val")
            if valid is None and args.eval_iters:
                raise DataError(paths[0], f"--eval-iters {args.eval_iters} needs a 'val' split "
                                          f"(it has {', '.join(names)}); pass --eval-iters 0")
            return train, valid, split("test")
        except DataError as exc:
            raise FlagError(f"--data-path: {exc}") from None

    provider.is_distributed = True  # every rank reads its replica's share itself
    return provider
