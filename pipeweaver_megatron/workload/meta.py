"""Per-sample metadata and the microbatches and global batches built from it.

Only metadata travels here: token counts, image sizes and clip lengths, never pixels.
Quantities that depend on the model (LM tokens of an image, encoder and generator
sequence lengths) are computed with a `TokenRules` passed in explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rules import TokenRules


class WorkloadError(ValueError):
    """Workload metadata is invalid or does not fit the model; one line naming the culprit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageMeta:
    """One image of a sample, by its size in pixels."""

    height: int
    """Image height in pixels (before the encoder's resize to its patch grid)."""
    width: int
    """Image width in pixels."""

    def __post_init__(self) -> None:
        for key in ("height", "width"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkloadError(f"image {key} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClipMeta:
    """One video clip of a sample (text-to-video: the clip the generator denoises)."""

    seconds: float
    """Clip length in seconds."""

    def __post_init__(self) -> None:
        value = self.seconds
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise WorkloadError(f"clip seconds must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleMeta:
    """One training sample: its text, its images and its video clips."""

    sample_id: int
    """Position of the sample in its data source (unique within a run)."""
    text_tokens: int
    """Text tokens in the LM sequence (the prompt, for text-to-video)."""
    images: tuple[ImageMeta, ...] = ()
    """Images interleaved with the text; each occupies LM tokens after the projector."""
    clips: tuple[ClipMeta, ...] = ()
    """Video clips the generator produces; they occupy no LM tokens."""

    def __post_init__(self) -> None:
        for key in ("sample_id", "text_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise WorkloadError(f"sample {self.sample_id!r}: {key} must be an integer >= 0, "
                                    f"got {value!r}")
        if not isinstance(self.images, tuple):
            object.__setattr__(self, "images", tuple(self.images))
        if not isinstance(self.clips, tuple):
            object.__setattr__(self, "clips", tuple(self.clips))
        if not all(isinstance(i, ImageMeta) for i in self.images):
            raise WorkloadError(f"sample {self.sample_id}: images must be ImageMeta values")
        if not all(isinstance(c, ClipMeta) for c in self.clips):
            raise WorkloadError(f"sample {self.sample_id}: clips must be ClipMeta values")

    @property
    def num_images(self) -> int:
        """Images of the sample."""
        return len(self.images)

    @property
    def num_clips(self) -> int:
        """Video clips of the sample."""
        return len(self.clips)

    @property
    def clip_seconds(self) -> float:
        """Total length of the sample's clips in seconds."""
        return float(sum(c.seconds for c in self.clips))


@dataclass(frozen=True, kw_only=True, slots=True)
class Microbatch:
    """One packed sequence: samples that together fit the microbatch limits."""

    index: int
    """Position within its global batch (0-based)."""
    samples: tuple[SampleMeta, ...]
    """The packed samples, in source order."""

    def __post_init__(self) -> None:
        if not isinstance(self.samples, tuple):
            object.__setattr__(self, "samples", tuple(self.samples))

    @property
    def sample_ids(self) -> tuple[int, ...]:
        """Ids of the packed samples."""
        return tuple(s.sample_id for s in self.samples)

    @property
    def text_tokens(self) -> int:
        """Text tokens of all samples."""
        return sum(s.text_tokens for s in self.samples)

    @property
    def images(self) -> tuple[ImageMeta, ...]:
        """All images, in order."""
        return tuple(i for s in self.samples for i in s.images)

    @property
    def num_images(self) -> int:
        """Images of all samples."""
        return sum(len(s.images) for s in self.samples)

    @property
    def clips(self) -> tuple[ClipMeta, ...]:
        """All video clips, in order."""
        return tuple(c for s in self.samples for c in s.clips)

    @property
    def num_clips(self) -> int:
        """Video clips of all samples."""
        return sum(len(s.clips) for s in self.samples)

    @property
    def clip_seconds(self) -> float:
        """Total video length in seconds."""
        return float(sum(c.seconds for s in self.samples for c in s.clips))

    def lm_tokens(self, rules: TokenRules) -> int:
        """LM sequence length: text tokens plus every image's LM tokens."""
        return sum(rules.lm_tokens(s) for s in self.samples)

    def image_lm_tokens(self, rules: TokenRules) -> int:
        """LM tokens taken by images."""
        return self.lm_tokens(rules) - self.text_tokens

    def image_encoder_tokens(self, rules: TokenRules) -> tuple[int, ...]:
        """Vision-encoder sequence length of each image, in order."""
        return tuple(rules.encoder_tokens(i) for i in self.images)

    def encoder_tokens(self, rules: TokenRules) -> int:
        """Vision-encoder tokens of all images."""
        return sum(self.image_encoder_tokens(rules))

    def clip_generator_tokens(self, rules: TokenRules) -> tuple[int, ...]:
        """Generator (DiT) sequence length of each clip, in order."""
        return tuple(rules.generator_tokens(c) for c in self.clips)

    def generator_tokens(self, rules: TokenRules) -> int:
        """Generator tokens of all clips."""
        return sum(self.clip_generator_tokens(rules))


@dataclass(frozen=True, kw_only=True, slots=True)
class GlobalBatch:
    """The microbatches one pipeline runs in one training iteration."""

    iteration: int
    """Training iteration (0-based)."""
    microbatches: tuple[Microbatch, ...]
    """Packed microbatches, in order."""

    def __post_init__(self) -> None:
        if not isinstance(self.microbatches, tuple):
            object.__setattr__(self, "microbatches", tuple(self.microbatches))

    @property
    def samples(self) -> tuple[SampleMeta, ...]:
        """All samples, in order."""
        return tuple(s for mb in self.microbatches for s in mb.samples)

    @property
    def sample_ids(self) -> tuple[int, ...]:
        """Ids of all samples, in order."""
        return tuple(s.sample_id for mb in self.microbatches for s in mb.samples)

    @property
    def num_microbatches(self) -> int:
        """Microbatches in the batch."""
        return len(self.microbatches)
