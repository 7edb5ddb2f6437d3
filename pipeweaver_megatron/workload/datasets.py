"""The dataset registry and `make_source`: a seedable stream of samples by name or trace."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import images, videos
from .distributions import DatasetTargets, DocumentBlock, split_document
from .dynamic import dynamic_source, dynamic_targets
from .meta import ClipMeta, SampleMeta, WorkloadError
from .rules import TokenRules
from .trace import iter_trace

BLOCK = 1024
"""Documents drawn per vectorised block."""

Draw = Callable[[np.random.Generator, int, TokenRules], DocumentBlock]


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetInfo:
    """One registered workload generator."""

    name: str
    """Registry key."""
    modality: str
    """"image" (needs a vision encoder) or "video" (needs a generator)."""
    citation: str
    """The paper its statistics come from."""
    published: str
    """The published statistics it follows, in one line."""
    targets: Callable[[TokenRules], DatasetTargets]
    """Target means of its raw documents for a model's rules."""
    draw: Draw | None = None
    """Vectorised raw-document sampler (None for "dynamic", which emits samples itself)."""

    def source(self, rules: TokenRules, seed: int) -> Iterator[SampleMeta]:
        """Endless samples fitted to the rules, sample ids from 0."""
        if self.modality == "image":
            rules.require_image_rule(f"dataset {self.name!r}")
        else:
            rules.require_video_rule(f"dataset {self.name!r}")
        if self.draw is None:
            return dynamic_source(rules, seed)
        return _document_source(self.draw, rules, seed)


def _document_source(draw: Draw, rules: TokenRules, seed: int) -> Iterator[SampleMeta]:
    rng = np.random.default_rng(seed)
    image = rules.default_image if rules.image_rule is not None else None
    per_image = rules.image_lm_tokens(image) if image is not None else 0
    sample_id = 0
    while True:
        block = draw(rng, BLOCK, rules)
        for text, count, seconds in zip(block.text_tokens.tolist(), block.num_images.tolist(),
                                        block.clip_seconds.tolist()):
            if seconds > 0:
                yield SampleMeta(sample_id=sample_id, text_tokens=text,
                                 clips=(ClipMeta(seconds=seconds),))
                sample_id += 1
                continue
            for part_text, part_images in split_document(text, count, rules, per_image):
                yield SampleMeta(sample_id=sample_id, text_tokens=part_text,
                                 images=(image,) * part_images if part_images else ())
                sample_id += 1


_PAPER = "PipeWeaver, arXiv 2504.14145"
DATASETS: dict[str, DatasetInfo] = {
    "laion2b": DatasetInfo(
        name="laion2b", modality="image", targets=images.laion2b_targets,
        draw=images.laion2b_draw, citation=f"Schuhmann et al., NeurIPS 2022; {_PAPER}",
        published="1 image per pair; 16.4 text tokens per image"),
    "obelics": DatasetInfo(
        name="obelics", modality="image", targets=images.obelics_targets,
        draw=images.obelics_draw, citation=f"Laurençon et al., NeurIPS 2023; {_PAPER}",
        published="141M docs, 353M images, 115B text tokens (~2.5 images, ~816 text tokens "
                  "per doc); 0.4-3115 text tokens per image"),
    "scienceqa": DatasetInfo(
        name="scienceqa", modality="image", targets=images.scienceqa_targets,
        draw=images.scienceqa_draw, citation="Lu et al., NeurIPS 2022",
        published="21,208 questions, 48.7% with an image; ~100-250 text tokens"),
    "sharegpt4video": DatasetInfo(
        name="sharegpt4video", modality="video", targets=videos.sharegpt4video_targets,
        draw=videos.sharegpt4video_draw, citation="Chen et al., NeurIPS 2024",
        published="40K videos of various lengths; dense captions ~273 words"),
    "internvid": DatasetInfo(
        name="internvid", modality="video", targets=videos.internvid_targets,
        draw=videos.internvid_draw, citation="Wang et al., ICLR 2024",
        published="234M clips, ~760K hours (~11.7 s per clip), 4.1B caption words "
                  "(~17.5 per clip)"),
    "mmtrail2m": DatasetInfo(
        name="mmtrail2m", modality="video", targets=videos.mmtrail2m_targets,
        draw=videos.mmtrail2m_draw, citation="Chi et al., arXiv 2407.20962",
        published="20M+ trailer clips, 2M with multimodal captions; ~94M s cut into ~21M "
                  "clips (~4.5 s)"),
    "dynamic": DatasetInfo(
        name="dynamic", modality="image", targets=dynamic_targets, citation=_PAPER,
        published="images per microbatch rise 0 -> up to 32 (mean peaks at 22) and fall, "
                  "twice over 40 iterations"),
}
"""Workload generators by name."""


def is_trace_path(name_or_path: str | Path) -> bool:
    """A trace file rather than a dataset name: ends in .jsonl, or is an existing file."""
    text = str(name_or_path)
    return text.endswith(".jsonl") or (text.lower() not in DATASETS and Path(text).is_file())


PREPARED_META = ".nv-meta"
"""The folder Energon's prepare writes into a dataset (data/prepare.py's META_DIR)."""


def is_prepared_dataset(path: str | Path) -> bool:
    """A dataset folder prepared for Energon (`pipeweaver data prepare`)."""
    return (Path(path) / PREPARED_META).is_dir()


def make_source(name_or_path: str | Path, rules: TokenRules, seed: int = 0
                ) -> Iterator[SampleMeta]:
    """Samples of a named generator (endless; ids from 0), the samples of a JSONL trace,
    or the train split of a prepared dataset folder (real samples read through Energon,
    text counted by the byte-level tokenizer; ids from 0, in Energon's order).

    A trace is replayed as recorded (its sample ids kept), and ends with the file, as a
    dataset ends with its split.
    """
    if is_prepared_dataset(name_or_path):
        from ..data.loader import prepared_source  # Energon imports torch: only here

        rules.require_image_rule(f"dataset {str(name_or_path)!r}")
        return prepared_source(name_or_path, rules)
    if is_trace_path(name_or_path):
        return iter_trace(name_or_path)
    key = str(name_or_path).lower()
    if key not in DATASETS:
        raise WorkloadError(f"unknown dataset {str(name_or_path)!r}; known: "
                            f"{', '.join(DATASETS)}, a path to a .jsonl trace, or a prepared "
                            "dataset folder")
    return DATASETS[key].source(rules, seed)
