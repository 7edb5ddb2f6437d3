"""The "dynamic" workload of the PipeWeaver paper's robustness experiment.

PipeWeaver (arXiv 2504.14145, evaluation "dynamic workload"): over 40 iterations the
image count per microbatch rises from 0 to up to 32, the average peaking at 22, then
falls, twice. Here iteration i targets a mean of peak * sin(pi * (i mod 20) / 20) images
per microbatch (0 at iterations 0, 20, 40, ...; the peak at 10, 30, ...), and the pattern
keeps cycling past 40. Each microbatch's count is Binomial(cap, target / cap), so it stays
in [0, cap] with the target as its mean. cap = min(32, the model's image limit, the
images that fit the token budget) and peak = 22/32 * cap, so a tiny model with an
8-image limit peaks at 5.5.

Each microbatch is one sample that exactly fills the LM-token budget (its images plus
text for the rest, at least one text token), so next-fit packing puts every sample in its
own microbatch and global batch b holds exactly the samples drawn for iteration b.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .distributions import DatasetTargets
from .meta import SampleMeta
from .rules import TokenRules

DYNAMIC_PERIOD = 20
"""Iterations of one rise and fall."""
DYNAMIC_ITERATIONS = 40
"""Iterations of the paper's experiment (two periods)."""
PAPER_MAX_IMAGES = 32
"""Most images per microbatch in the paper's dynamic workload."""
PAPER_PEAK_MEAN = 22.0
"""Peak of the per-iteration average images per microbatch in the paper."""


def dynamic_image_cap(rules: TokenRules) -> int:
    """Most images per microbatch: 32, or less where the model's limits are tighter."""
    per_image = rules.image_lm_tokens(rules.default_image)
    return max(0, min(PAPER_MAX_IMAGES, rules.max_images_per_microbatch,
                      (rules.microbatch_tokens - 1) // per_image))


def dynamic_peak(rules: TokenRules) -> float:
    """Peak average images per microbatch: 22/32 of the cap (22 for the paper's models)."""
    return PAPER_PEAK_MEAN / PAPER_MAX_IMAGES * dynamic_image_cap(rules)


def dynamic_target(iteration: int, rules: TokenRules) -> float:
    """Target mean images per microbatch at an iteration."""
    phase = (iteration % DYNAMIC_PERIOD) / DYNAMIC_PERIOD
    return dynamic_peak(rules) * math.sin(math.pi * phase)


def dynamic_targets(rules: TokenRules) -> DatasetTargets:
    """Means per sample (= per microbatch) over one period."""
    images = float(np.mean([dynamic_target(i, rules) for i in range(DYNAMIC_PERIOD)]))
    per_image = rules.image_lm_tokens(rules.default_image)
    return DatasetTargets(mean_text_tokens=rules.microbatch_tokens - images * per_image,
                          mean_images=images)


def dynamic_source(rules: TokenRules, seed: int) -> Iterator[SampleMeta]:
    """Endless samples, `rules.num_microbatches` per iteration, one per microbatch."""
    image = rules.default_image
    per_image = rules.image_lm_tokens(image)
    cap = dynamic_image_cap(rules)
    rng = np.random.default_rng(seed)
    sample_id = 0
    iteration = 0
    while True:
        p = dynamic_target(iteration, rules) / cap if cap else 0.0
        for k in rng.binomial(cap, min(1.0, p), size=rules.num_microbatches).tolist():
            yield SampleMeta(sample_id=sample_id,
                             text_tokens=rules.microbatch_tokens - k * per_image,
                             images=(image,) * k)
            sample_id += 1
        iteration += 1
