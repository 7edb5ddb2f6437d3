"""Text-to-video dataset generators: ShareGPT4Video, InternVid, MMTrail-2M.

Every sample is one clip and its caption (the prompt the LM encodes for the DiT). Clips
are cut to the model's clip limit (min of max_clip_seconds and
max_seconds_per_microbatch) and prompts to the microbatch token budget, as a text-to-video
data pipeline does; the targets account for both cuts. Captions are published in words;
we convert with approximately 1.3 BPE tokens per English word (an assumption).
"""

from __future__ import annotations

import numpy as np

from .distributions import ClippedLogNormal, DatasetTargets, DocumentBlock
from .rules import TokenRules

TOKENS_PER_WORD = 1.3
"""BPE tokens per English word (approximately, for Llama/Qwen-style tokenizers)."""


def clip_cap(rules: TokenRules) -> float:
    """Longest clip the model takes: its clip limit, and one clip must fit a microbatch."""
    video = rules.require_video_rule("a video dataset")
    return min(video.max_clip_seconds, video.max_seconds_per_microbatch)


def _targets(text: ClippedLogNormal, seconds: ClippedLogNormal,
             rules: TokenRules) -> DatasetTargets:
    return DatasetTargets(mean_text_tokens=text.mean_below(rules.microbatch_tokens),
                          mean_clip_seconds=seconds.mean_below(clip_cap(rules)),
                          mean_clips=1.0)


def _draw(text: ClippedLogNormal, seconds: ClippedLogNormal, rng: np.random.Generator,
          n: int, rules: TokenRules) -> DocumentBlock:
    tokens = np.rint(text.sample(rng, n, cap=rules.microbatch_tokens)).astype(np.int64)
    clip = np.round(seconds.sample(rng, n, cap=clip_cap(rules)), 3)
    return DocumentBlock(text_tokens=tokens, num_images=np.zeros(n, dtype=np.int64),
                         clip_seconds=clip)


# --- ShareGPT4Video ----------------------------------------------------------------------

SHAREGPT4VIDEO_TEXT = ClippedLogNormal(mean=273 * TOKENS_PER_WORD, sigma=0.3, low=64,
                                       high=2048)
"""Dense caption tokens (approximately 273 words)."""
SHAREGPT4VIDEO_SECONDS = ClippedLogNormal(mean=20.0, sigma=0.6, low=2.0)
"""Source video length in seconds before cutting (assumed, see the docstring)."""


def sharegpt4video_targets(rules: TokenRules) -> DatasetTargets:
    """~355 prompt tokens; clips mostly at the model's clip limit."""
    return _targets(SHAREGPT4VIDEO_TEXT, SHAREGPT4VIDEO_SECONDS, rules)


def sharegpt4video_draw(rng: np.random.Generator, n: int, rules: TokenRules) -> DocumentBlock:
    """ShareGPT4Video: 40K videos with dense GPT-4V captions.

    Source: Chen et al., "ShareGPT4Video: Improving Video Understanding and Generation with
    Better Captions", NeurIPS 2024 Datasets and Benchmarks (arXiv 2406.04325): 40K videos
    of various lengths and sources, dense captions of approximately 273 words on average.
    Followed here: caption tokens log-normal with mean 273 * 1.3 (sigma 0.3 assumed).
    The paper gives no single mean duration we rely on; we assume source videos average
    approximately 20 s (log-normal, sigma 0.6) and cut clips to the model's clip limit, so
    on a 16 s limit most clips are long (the MovieGen-style setup of the PipeWeaver paper).
    """
    return _draw(SHAREGPT4VIDEO_TEXT, SHAREGPT4VIDEO_SECONDS, rng, n, rules)


# --- InternVid ---------------------------------------------------------------------------

INTERNVID_CLIPS = 234e6
"""Clips in InternVid (Wang et al. 2024)."""
INTERNVID_HOURS = 760e3
"""Total video hours (approximately)."""
INTERNVID_WORDS = 4.1e9
"""Caption words over all clips."""
INTERNVID_TEXT = ClippedLogNormal(mean=INTERNVID_WORDS / INTERNVID_CLIPS * TOKENS_PER_WORD,
                                  sigma=0.4, low=3, high=256)
"""Caption tokens (approximately 17.5 words)."""
INTERNVID_SECONDS = ClippedLogNormal(mean=INTERNVID_HOURS * 3600 / INTERNVID_CLIPS,
                                     sigma=0.8, low=0.5)
"""Clip length in seconds before cutting (approximately 11.7 s on average)."""


def internvid_targets(rules: TokenRules) -> DatasetTargets:
    """~23 prompt tokens and ~11.7 s clips before the model's clip limit."""
    return _targets(INTERNVID_TEXT, INTERNVID_SECONDS, rules)


def internvid_draw(rng: np.random.Generator, n: int, rules: TokenRules) -> DocumentBlock:
    """InternVid: YouTube clips with generated captions.

    Source: Wang et al., "InternVid: A Large-scale Video-Text Dataset for Multimodal
    Understanding and Generation", ICLR 2024 (arXiv 2307.06942): 7M videos, nearly 760K
    hours, 234M clips, captions totalling 4.1B words -- approximately 11.7 s per clip and
    17.5 words per caption. Followed here: clip length log-normal with mean 760K h / 234M
    (sigma 0.8 assumed; the paper says most clips are under 10 s) cut to the model's clip
    limit; caption tokens log-normal with mean 17.5 * 1.3 (sigma 0.4 assumed).
    """
    return _draw(INTERNVID_TEXT, INTERNVID_SECONDS, rng, n, rules)


# --- MMTrail-2M --------------------------------------------------------------------------

MMTRAIL_SOURCE_SECONDS = 94e6
"""Seconds of collected trailer video (Chi et al. 2024, approximately)."""
MMTRAIL_CLIPS = 21e6
"""Scene-cut clips from them (approximately)."""
MMTRAIL_TEXT = ClippedLogNormal(mean=80.0, sigma=0.4, low=8, high=512)
"""Merged multimodal caption tokens (approximately; a medium-length caption)."""
MMTRAIL_SECONDS = ClippedLogNormal(mean=MMTRAIL_SOURCE_SECONDS / MMTRAIL_CLIPS, sigma=0.6,
                                   low=0.5)
"""Clip length in seconds (approximately 4.5 s on average)."""


def mmtrail2m_targets(rules: TokenRules) -> DatasetTargets:
    """~80 prompt tokens and ~4.5 s clips."""
    return _targets(MMTRAIL_TEXT, MMTRAIL_SECONDS, rules)


def mmtrail2m_draw(rng: np.random.Generator, n: int, rules: TokenRules) -> DocumentBlock:
    """MMTrail-2M: short scene-cut trailer clips with multimodal (visual + music) captions.

    Source: Chi et al., "MMTrail: A Multimodal Trailer Video Dataset with Language and
    Music Descriptions" (arXiv 2407.20962): over 20M trailer clips with visual captions
    and 2M high-quality clips with multimodal captions; approximately 94M seconds of
    trailers cut by scene detection into approximately 21M clips, i.e. short clips of
    approximately 4.5 s on average (our derivation; the 2M subset may differ). Captions
    merge visual and music descriptions; we assume approximately 80 tokens (medium length,
    log-normal, sigma 0.4) -- an assumption, not a published mean.
    """
    return _draw(MMTRAIL_TEXT, MMTRAIL_SECONDS, rng, n, rules)
