"""Token rules: how a sample's images and clips turn into tokens, and the microbatch limits."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..config import ImageRule, ModelSpec, ModuleKind, VideoRule
from .meta import ClipMeta, ImageMeta, SampleMeta, WorkloadError

_SECONDS_SLACK = 1e-9


@functools.lru_cache(maxsize=4096)
def _image_tokens(rule: ImageRule, height: int, width: int) -> tuple[int, int]:
    return rule.encoder_tokens(height, width), rule.lm_tokens(height, width)


@functools.lru_cache(maxsize=4096)
def _clip_tokens(rule: VideoRule, seconds: float) -> int:
    return rule.tokens(seconds)


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleCost:
    """What one sample takes from a microbatch's limits."""

    text_tokens: int
    """Text tokens."""
    image_lm_tokens: int
    """LM tokens of the sample's images."""
    images: int
    """Image count."""
    clips: int
    """Clip count."""
    seconds: float
    """Total clip length in seconds."""

    @property
    def lm_tokens(self) -> int:
        """LM sequence length of the sample."""
        return self.text_tokens + self.image_lm_tokens


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenRules:
    """The model's token rules and microbatch limits, all that packing needs to know."""

    model: str = ""
    """Model name, for error messages."""
    image_rule: ImageRule | None = None
    """Image token rule of the vision encoder; None for a model without one."""
    video_rule: VideoRule | None = None
    """Clip token rule and clip limits of the generator; None for a model without one."""
    microbatch_tokens: int = 8192
    """LM-token budget of one microbatch."""
    max_images_per_microbatch: int = 48
    """At most this many images in one microbatch."""
    num_microbatches: int = 1
    """Microbatches per global batch of one pipeline (paces the per-iteration "dynamic"
    generator)."""

    def __post_init__(self) -> None:
        for key in ("microbatch_tokens", "max_images_per_microbatch", "num_microbatches"):
            if getattr(self, key) < 1:
                raise WorkloadError(f"token rules: {key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_model(cls, model: ModelSpec) -> TokenRules:
        """Rules of a model: its (first) vision encoder, its (first) generator, its limits."""
        encoders = model.modules_of(ModuleKind.VISION_ENCODER)
        generators = model.modules_of(ModuleKind.GENERATOR)
        par = model.parallel
        return cls(model=model.name,
                   image_rule=encoders[0].image if encoders else None,
                   video_rule=generators[0].video if generators else None,
                   microbatch_tokens=par.microbatch_tokens,
                   max_images_per_microbatch=par.max_images_per_microbatch,
                   num_microbatches=par.num_microbatches)

    @property
    def max_clips_per_microbatch(self) -> int:
        """At most this many clips in one microbatch (0 without a generator)."""
        return self.video_rule.max_clips_per_microbatch if self.video_rule else 0

    @property
    def max_seconds_per_microbatch(self) -> float:
        """Total clip length limit of one microbatch (0 without a generator)."""
        return self.video_rule.max_seconds_per_microbatch if self.video_rule else 0.0

    @property
    def default_image(self) -> ImageMeta:
        """An image of the encoder's default size."""
        rule = self.require_image_rule("the default image")
        return ImageMeta(height=rule.image_size, width=rule.image_size)

    def require_image_rule(self, what: str) -> ImageRule:
        """The image rule; WorkloadError saying `what` needs a vision encoder if none."""
        if self.image_rule is None:
            raise WorkloadError(f"{what} needs a vision encoder, but model {self.model or '?'} "
                                "has none")
        return self.image_rule

    def require_video_rule(self, what: str) -> VideoRule:
        """The video rule; WorkloadError saying `what` needs a generator if none."""
        if self.video_rule is None:
            raise WorkloadError(f"{what} needs a generator, but model {self.model or '?'} "
                                "has none")
        return self.video_rule

    def encoder_tokens(self, image: ImageMeta) -> int:
        """Vision-encoder sequence length of one image."""
        rule = self.require_image_rule("an image")
        return _image_tokens(rule, image.height, image.width)[0]

    def image_lm_tokens(self, image: ImageMeta) -> int:
        """LM tokens of one image after the patch merger."""
        rule = self.require_image_rule("an image")
        return _image_tokens(rule, image.height, image.width)[1]

    def generator_tokens(self, clip: ClipMeta) -> int:
        """Generator (DiT) sequence length of one clip."""
        return _clip_tokens(self.require_video_rule("a video clip"), float(clip.seconds))

    def lm_tokens(self, sample: SampleMeta) -> int:
        """LM sequence length of a sample: text plus image tokens (clips take none)."""
        return self.cost(sample).lm_tokens

    def cost(self, sample: SampleMeta) -> SampleCost:
        """What the sample takes from a microbatch; errors if the model cannot take it."""
        image_lm = 0
        if sample.images:
            rule = self.require_image_rule(f"sample {sample.sample_id} has "
                                         f"{len(sample.images)} images and")
            image_lm = sum(_image_tokens(rule, i.height, i.width)[1] for i in sample.images)
        if sample.clips:
            self.require_video_rule(f"sample {sample.sample_id} has {len(sample.clips)} video "
                                  "clips and")
        return SampleCost(text_tokens=sample.text_tokens, image_lm_tokens=image_lm,
                          images=len(sample.images), clips=len(sample.clips),
                          seconds=sample.clip_seconds)

    def check(self, sample: SampleMeta) -> SampleCost:
        """The sample's cost; WorkloadError if it alone exceeds any microbatch limit."""
        cost = self.cost(sample)
        sid = sample.sample_id
        if cost.lm_tokens > self.microbatch_tokens:
            raise WorkloadError(
                f"sample {sid} needs {cost.lm_tokens} LM tokens ({cost.text_tokens} text + "
                f"{cost.image_lm_tokens} image), more than the microbatch budget of "
                f"{self.microbatch_tokens}")
        if cost.images > self.max_images_per_microbatch:
            raise WorkloadError(f"sample {sid} has {cost.images} images, more than the limit "
                                f"of {self.max_images_per_microbatch} images per microbatch")
        if cost.clips:
            video = self.require_video_rule(f"sample {sid}")
            if cost.clips > video.max_clips_per_microbatch:
                raise WorkloadError(f"sample {sid} has {cost.clips} video clips, more than the "
                                    f"limit of {video.max_clips_per_microbatch} per microbatch")
            if cost.seconds > video.max_seconds_per_microbatch + _SECONDS_SLACK:
                raise WorkloadError(f"sample {sid} has {cost.seconds:g} s of video, more than "
                                    f"the limit of {video.max_seconds_per_microbatch:g} s per "
                                    "microbatch")
            longest = max(c.seconds for c in sample.clips)
            if longest > video.max_clip_seconds + _SECONDS_SLACK:
                raise WorkloadError(f"sample {sid} has a {longest:g} s clip, longer than the "
                                    f"model's max_clip_seconds of {video.max_clip_seconds:g}")
        return cost

    def fits(self, used: SampleCost, extra: SampleCost) -> bool:
        """Whether a microbatch that already holds `used` can also take `extra`."""
        return (used.lm_tokens + extra.lm_tokens <= self.microbatch_tokens
                and used.images + extra.images <= self.max_images_per_microbatch
                and used.clips + extra.clips <= self.max_clips_per_microbatch
                and used.seconds + extra.seconds
                <= self.max_seconds_per_microbatch + _SECONDS_SLACK)
