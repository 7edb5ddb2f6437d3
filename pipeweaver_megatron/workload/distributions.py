"""Building blocks of the dataset generators: clipped log-normals, targets, document fitting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .meta import WorkloadError
from .rules import TokenRules


def _phi(x: float) -> float:
    """Standard normal CDF, with the infinities."""
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _log(x: float) -> float:
    return -math.inf if x <= 0 else (math.inf if x == math.inf else math.log(x))


def clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[min(max(X, low), high)] for X = exp(N(mu, sigma**2)), in closed form."""
    a = (_log(low) - mu) / sigma
    b = (_log(high) - mu) / sigma
    inner = math.exp(mu + sigma**2 / 2) * (_phi(b - sigma) - _phi(a - sigma))
    upper = 0.0 if high == math.inf else high * (1.0 - _phi(b))
    return low * _phi(a) + inner + upper


@dataclass(frozen=True, kw_only=True, slots=True)
class ClippedLogNormal:
    """A log-normal clipped to [low, high], parametrised by its mean after clipping.

    Text lengths and clip durations are right-skewed; a log-normal is the usual fit.
    The published figures are means, so the location parameter is solved from the mean.
    """

    mean: float
    """Mean of the clipped distribution (the published figure)."""
    sigma: float
    """Shape: standard deviation of the underlying normal (an assumption, not published)."""
    low: float = 0.0
    """Values below are raised to this."""
    high: float = math.inf
    """Values above are cut to this."""

    def __post_init__(self) -> None:
        if not self.low < self.mean < self.high or self.sigma <= 0:
            raise ValueError(f"need low < mean < high and sigma > 0: {self}")

    @property
    def mu(self) -> float:
        """Location of the underlying normal, solved by bisection."""
        lo = math.log(self.mean) - 12.0 - self.sigma**2
        hi = math.log(self.mean) + 12.0
        for _ in range(100):
            mid = (lo + hi) / 2
            if clipped_lognormal_mean(mid, self.sigma, self.low, self.high) < self.mean:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def mean_below(self, cap: float) -> float:
        """Mean after also cutting at `cap` (e.g. a model's clip-length or token limit)."""
        return clipped_lognormal_mean(self.mu, self.sigma, self.low, min(cap, self.high))

    def sample(self, rng: np.random.Generator, n: int, cap: float = math.inf) -> np.ndarray:
        """n draws, also cut at `cap`."""
        x = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(x, self.low, min(cap, self.high))


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetTargets:
    """Means a generator's raw documents follow, for one model's rules.

    Raw documents are drawn before a too-large document is split into samples; clip
    lengths and prompts are already cut to the model's limits where that applies.
    """

    mean_text_tokens: float
    """Text tokens per document."""
    mean_images: float = 0.0
    """Images per document."""
    mean_clip_seconds: float = 0.0
    """Seconds per clip (0 for image datasets)."""
    mean_clips: float = 0.0
    """Clips per document."""

    @property
    def text_tokens_per_image(self) -> float | None:
        """Text tokens per image (None without images)."""
        return self.mean_text_tokens / self.mean_images if self.mean_images else None


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentBlock:
    """A block of raw documents drawn at once (vectorised)."""

    text_tokens: np.ndarray
    """Text tokens of each document (int64)."""
    num_images: np.ndarray
    """Images of each document (int64)."""
    clip_seconds: np.ndarray
    """Length of each document's single clip in seconds; 0 where it has no clip."""

    def __len__(self) -> int:
        return len(self.text_tokens)


def split_document(text_tokens: int, num_images: int, rules: TokenRules,
                   image_lm_tokens: int) -> list[tuple[int, int]]:
    """Split a document into the fewest even parts (text, images) that each fit the limits.

    Text and images are spread evenly over the parts, as cutting an interleaved document
    at its image boundaries would. Totals are kept: nothing is dropped.
    """
    budget, cap = rules.microbatch_tokens, rules.max_images_per_microbatch
    if text_tokens + num_images * image_lm_tokens <= budget and num_images <= cap:
        return [(text_tokens, num_images)]
    if num_images and image_lm_tokens > budget:
        raise WorkloadError(f"one image takes {image_lm_tokens} LM tokens, more than the "
                            f"microbatch budget of {budget} of model {rules.model}")
    total = text_tokens + num_images * image_lm_tokens
    parts = max(1, -(-total // budget), -(-num_images // cap))
    while parts <= text_tokens + num_images:
        split = [(text_tokens * (j + 1) // parts - text_tokens * j // parts,
                  num_images * (j + 1) // parts - num_images * j // parts) for j in range(parts)]
        if all(t + k * image_lm_tokens <= budget and k <= cap for t, k in split):
            return [(t, k) for t, k in split if t or k]
        parts += 1
    raise WorkloadError(f"a document of {text_tokens} text tokens and {num_images} images "
                        f"cannot be split to fit model {rules.model}'s microbatch budget")
