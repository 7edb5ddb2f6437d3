"""Sample a workload for a model and summarise it per microbatch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelSpec, load_model
from .datasets import make_source
from .meta import GlobalBatch
from .packing import BatchStream
from .rules import TokenRules


def sample_workload(model: ModelSpec | str, dataset: str | Path | None = None,
                    iterations: int = 1, seed: int = 0) -> list[GlobalBatch]:
    """`iterations` global batches of model.parallel.num_microbatches microbatches each.

    model: a ModelSpec or a model name/path; dataset: a registry name or a .jsonl trace
    (default: the model's own dataset). A trace may end early and yield fewer batches.
    """
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    rules = TokenRules.from_model(spec)
    source = make_source(spec.dataset if dataset is None else dataset, rules, seed)
    stream = BatchStream(source, rules, spec.parallel.num_microbatches)
    return list(islice(stream, iterations))


def _ratio(top: float, bottom: float) -> float | None:
    return float(top) / float(bottom) if bottom > 0 else None


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadSummary:
    """Per-microbatch statistics of sampled global batches."""

    model: str
    """Model the rules came from."""
    iterations: int
    """Global batches."""
    microbatches: int
    """Microbatches over all batches."""
    samples: int
    """Samples over all batches."""
    images: int
    """Images over all batches."""
    mean_images_per_microbatch: float
    """Average images per microbatch."""
    min_images_per_microbatch: int
    """Fewest images in a microbatch."""
    max_images_per_microbatch: int
    """Most images in a microbatch."""
    text_tokens_per_image: float | None
    """Text tokens / images over all batches (None without images)."""
    mean_text_tokens_per_microbatch: float
    """Average text tokens per microbatch."""
    mean_lm_tokens_per_microbatch: float
    """Average LM sequence length per microbatch."""
    fill_ratio: float
    """Average LM tokens / the microbatch budget."""
    min_encoder_tokens_per_microbatch: int
    """Fewest vision-encoder tokens in a microbatch (a linear proxy of encoder FLOPs)."""
    max_encoder_tokens_per_microbatch: int
    """Most vision-encoder tokens in a microbatch."""
    encoder_tokens_spread: float | None
    """Heaviest / lightest microbatch by encoder tokens (None when the lightest has 0)."""
    clips: int
    """Video clips over all batches."""
    mean_clips_per_microbatch: float
    """Average clips per microbatch."""
    mean_clip_seconds: float | None
    """Average clip length in seconds (None without clips)."""
    min_generator_tokens_per_microbatch: int
    """Fewest generator tokens in a microbatch (a linear proxy of DiT FLOPs)."""
    max_generator_tokens_per_microbatch: int
    """Most generator tokens in a microbatch."""
    generator_tokens_spread: float | None
    """Heaviest / lightest microbatch by generator tokens (None when the lightest has 0)."""
    mean_images_per_iteration: tuple[float, ...]
    """Average images per microbatch of each global batch, in order."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["mean_images_per_iteration"] = list(self.mean_images_per_iteration)
        return data

    def format(self) -> str:
        """A small human-readable table."""
        def num(value: float | None, digits: int = 2) -> str:
            return "-" if value is None else f"{value:,.{digits}f}"
        rows = [
            ("model", self.model),
            ("iterations / microbatches / samples",
             f"{self.iterations} / {self.microbatches} / {self.samples}"),
            ("images per microbatch (mean, min-max)",
             f"{num(self.mean_images_per_microbatch)} ({self.min_images_per_microbatch}-"
             f"{self.max_images_per_microbatch})"),
            ("text tokens per image", num(self.text_tokens_per_image, 1)),
            ("text / LM tokens per microbatch",
             f"{num(self.mean_text_tokens_per_microbatch, 0)} / "
             f"{num(self.mean_lm_tokens_per_microbatch, 0)}"),
            ("budget fill", f"{self.fill_ratio:.1%}"),
        ]
        if self.images or not self.clips:
            rows += [
                ("encoder tokens per microbatch (min-max)",
                 f"{self.min_encoder_tokens_per_microbatch:,}-"
                 f"{self.max_encoder_tokens_per_microbatch:,}"),
                ("encoder load spread (max/min)", num(self.encoder_tokens_spread)),
            ]
        if self.clips:
            rows += [
                ("clips per microbatch", num(self.mean_clips_per_microbatch)),
                ("seconds per clip", num(self.mean_clip_seconds)),
                ("generator tokens per microbatch (min-max)",
                 f"{self.min_generator_tokens_per_microbatch:,}-"
                 f"{self.max_generator_tokens_per_microbatch:,}"),
                ("generator load spread (max/min)", num(self.generator_tokens_spread)),
            ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def summarize(batches: Sequence[GlobalBatch], rules: TokenRules) -> WorkloadSummary:
    """Statistics of the batches' microbatches under the rules."""
    mbs = [mb for b in batches for mb in b.microbatches]
    images = np.array([mb.num_images for mb in mbs] or [0])
    text = np.array([mb.text_tokens for mb in mbs] or [0])
    lm = np.array([mb.lm_tokens(rules) for mb in mbs] or [0])
    has_images = rules.image_rule is not None
    has_clips = rules.video_rule is not None
    encoder = np.array([mb.encoder_tokens(rules) if has_images else 0 for mb in mbs] or [0])
    generator = np.array([mb.generator_tokens(rules) if has_clips else 0 for mb in mbs]
                         or [0])
    clips = np.array([mb.num_clips for mb in mbs] or [0])
    seconds = sum(mb.clip_seconds for mb in mbs)
    return WorkloadSummary(
        model=rules.model, iterations=len(batches), microbatches=len(mbs),
        samples=sum(len(mb.samples) for mb in mbs), images=int(images.sum()),
        mean_images_per_microbatch=float(images.mean()),
        min_images_per_microbatch=int(images.min()),
        max_images_per_microbatch=int(images.max()),
        text_tokens_per_image=_ratio(text.sum(), images.sum()),
        mean_text_tokens_per_microbatch=float(text.mean()),
        mean_lm_tokens_per_microbatch=float(lm.mean()),
        fill_ratio=float(lm.mean()) / rules.microbatch_tokens,
        min_encoder_tokens_per_microbatch=int(encoder.min()),
        max_encoder_tokens_per_microbatch=int(encoder.max()),
        encoder_tokens_spread=_ratio(encoder.max(), encoder.min()),
        clips=int(clips.sum()), mean_clips_per_microbatch=float(clips.mean()),
        mean_clip_seconds=_ratio(seconds, clips.sum()),
        min_generator_tokens_per_microbatch=int(generator.min()),
        max_generator_tokens_per_microbatch=int(generator.max()),
        generator_tokens_spread=_ratio(generator.max(), generator.min()),
        mean_images_per_iteration=tuple(
            float(np.mean([mb.num_images for mb in b.microbatches] or [0])) for b in batches),
    )
