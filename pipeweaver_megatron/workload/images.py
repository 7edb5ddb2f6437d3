"""Image-text dataset generators: LAION-2B, OBELICS, ScienceQA.

Each generator draws raw documents whose means follow the published statistics named in
its docstring; `datasets.make_source` turns them into samples at the model's default
image size and splits a document that does not fit one microbatch (as a real data
pipeline would). Distribution shapes (log-normal sigmas, geometric image counts) are
assumptions; only the means are published figures.
"""

from __future__ import annotations

import numpy as np

from .distributions import ClippedLogNormal, DatasetTargets, DocumentBlock
from .rules import TokenRules

# --- LAION-2B ----------------------------------------------------------------------------

LAION_TEXT = ClippedLogNormal(mean=16.4, sigma=0.5, low=1, high=256)
"""Alt-text caption tokens of one LAION-2B pair."""


def laion2b_targets(rules: TokenRules) -> DatasetTargets:
    """One image and ~16.4 caption tokens per sample."""
    return DatasetTargets(mean_text_tokens=LAION_TEXT.mean, mean_images=1.0)


def laion2b_draw(rng: np.random.Generator, n: int, rules: TokenRules) -> DocumentBlock:
    """LAION-2B: image / alt-text pairs, one image and a short caption each.

    Sources: Schuhmann et al., "LAION-5B: An open large-scale dataset for training next
    generation image-text models", NeurIPS 2022 Datasets and Benchmarks (LAION-2B-en is
    its ~2.3B English pairs); the PipeWeaver paper (arXiv 2504.14145, section 2) reports
    16.4 text tokens per image on average. Followed here: exactly one image per sample,
    caption tokens log-normal with mean 16.4 (sigma 0.5 assumed), clipped to [1, 256].
    """
    text = np.rint(LAION_TEXT.sample(rng, n)).astype(np.int64)
    return DocumentBlock(text_tokens=text, num_images=np.ones(n, dtype=np.int64),
                         clip_seconds=np.zeros(n))


# --- OBELICS -----------------------------------------------------------------------------

OBELICS_DOCUMENTS = 141e6
"""Documents in OBELICS (Laurençon et al. 2023)."""
OBELICS_IMAGES = 353e6
"""Images in OBELICS."""
OBELICS_TEXT_TOKENS = 115e9
"""Text tokens in OBELICS."""
OBELICS_TEXT_PER_IMAGE = ClippedLogNormal(
    mean=OBELICS_TEXT_TOKENS / OBELICS_IMAGES, sigma=1.3, low=0.4, high=3115.0)
"""Text tokens per image of one document (range 0.4 to 3115 per the PipeWeaver paper)."""


def obelics_targets(rules: TokenRules) -> DatasetTargets:
    """~2.5 images and ~816 text tokens per document."""
    images = OBELICS_IMAGES / OBELICS_DOCUMENTS
    return DatasetTargets(mean_text_tokens=OBELICS_TEXT_PER_IMAGE.mean * images,
                          mean_images=images)


def obelics_draw(rng: np.random.Generator, n: int, rules: TokenRules) -> DocumentBlock:
    """OBELICS: interleaved image-text web documents.

    Sources: Laurençon et al., "OBELICS: An Open Web-Scale Filtered Dataset of Interleaved
    Image-Text Documents", NeurIPS 2023 Datasets and Benchmarks: 141M documents, 353M
    images, 115B text tokens, i.e. approximately 2.5 images and 816 text tokens per
    document (about 326 text tokens per image). The PipeWeaver paper (arXiv 2504.14145)
    reports text tokens per image ranging from 0.4 to 3115. Followed here: images per
    document geometric on {1, 2, ...} with mean 353/141; text tokens per image of the
    document log-normal (sigma 1.3 assumed) clipped to [0.4, 3115] with mean 115B/353M;
    text = that ratio times the image count, rounded within the range.
    """
    images = rng.geometric(OBELICS_DOCUMENTS / OBELICS_IMAGES, size=n).astype(np.int64)
    ratio = OBELICS_TEXT_PER_IMAGE.sample(rng, n)
    low, high = OBELICS_TEXT_PER_IMAGE.low, OBELICS_TEXT_PER_IMAGE.high
    text = np.clip(np.rint(ratio * images), np.ceil(low * images), np.floor(high * images))
    return DocumentBlock(text_tokens=np.maximum(1, text).astype(np.int64), num_images=images,
                         clip_seconds=np.zeros(n))


# --- ScienceQA ---------------------------------------------------------------------------

SCIENCEQA_QUESTIONS = 21208
"""Questions in ScienceQA (Lu et al. 2022)."""
SCIENCEQA_WITH_IMAGE = 10332
"""Questions with an image context (~48.7%)."""
SCIENCEQA_TEXT = ClippedLogNormal(mean=175.0, sigma=0.45, low=16, high=1024)
"""Question + choices + lecture + solution tokens (approximately; 100-250 typical)."""


def scienceqa_targets(rules: TokenRules) -> DatasetTargets:
    """~0.487 images and ~175 text tokens per question."""
    return DatasetTargets(mean_text_tokens=SCIENCEQA_TEXT.mean,
                          mean_images=SCIENCEQA_WITH_IMAGE / SCIENCEQA_QUESTIONS)


def scienceqa_draw(rng: np.random.Generator, n: int, rules: TokenRules) -> DocumentBlock:
    """ScienceQA: multiple-choice science questions, about half with an image context.

    Source: Lu et al., "Learn to Explain: Multimodal Reasoning via Thought Chains for
    Science Question Answering", NeurIPS 2022: 21,208 questions, 10,332 (48.7%) with an
    image context. Text per sample (question, choices, lecture and solution) is on the
    order of 100-250 tokens; we take approximately 175 tokens on average (log-normal,
    sigma 0.45 assumed, clipped to [16, 1024]) -- an approximation, not a published mean.
    """
    images = (rng.random(n) < SCIENCEQA_WITH_IMAGE / SCIENCEQA_QUESTIONS).astype(np.int64)
    text = np.rint(SCIENCEQA_TEXT.sample(rng, n)).astype(np.int64)
    return DocumentBlock(text_tokens=text, num_images=images, clip_seconds=np.zeros(n))
