"""`pipeweaver data stats`: a prepared dataset's dynamicity, read back through Energon.

Per sample: text tokens (the tokenizer's ids of every text run; no BOS/EOS or image
tokens), images and their sizes. Then the samples are packed, in Energon's order, into
microbatches and global batches by the model's TokenRules (the same packing the
planner sees) and summarised per microbatch in the form of benchmarks/workload_stats.py:
images and encoder tokens per microbatch and the heaviest/lightest load spread.
A sample that alone exceeds the model's microbatch limits is counted in `over_limit`
(by key) and left out of the packing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import load_model
from ..workload import ImageMeta, SampleMeta, TokenRules, WorkloadError, WorkloadSummary
from ..workload import BatchStream, summarize
from .errors import DataError
from .reader import DataSample, EnergonReader, split_names
from .tokenizer import TextTokenizer, load_tokenizer


@dataclass(frozen=True, kw_only=True, slots=True)
class Spread:
    """Mean, min and max of a per-sample (or per-image) quantity."""

    mean: float
    """Average (0 without values)."""
    min: int
    """Smallest (0 without values)."""
    max: int
    """Largest (0 without values)."""

    @classmethod
    def of(cls, values: Sequence[int]) -> Spread:
        """The spread of values."""
        if not values:
            return cls(mean=0.0, min=0, max=0)
        return cls(mean=sum(values) / len(values), min=min(values), max=max(values))

    def format(self, digits: int = 1) -> str:
        """`mean (min-max)`."""
        return f"{self.mean:,.{digits}f} ({self.min:,}-{self.max:,})"


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleStat:
    """What one sample holds, as the packing sees it."""

    key: str
    """Sample key."""
    split: str
    """Its split."""
    text_tokens: int
    """Tokenizer ids over its text runs."""
    image_sizes: tuple[tuple[int, int], ...]
    """(height, width) per image."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetStats:
    """The dynamicity of a prepared dataset under a model's rules."""

    path: str
    """Dataset folder."""
    kind: str
    """captioning, interleaved, or captioning+interleaved (a metadataset of both)."""
    model: str
    """Model whose rules packed the samples."""
    tokenizer: str
    """Tokenizer that counted the text tokens."""
    splits: dict[str, int]
    """Samples per split read."""
    samples: int
    """Samples over the splits read."""
    images: int
    """Images over the splits read."""
    text_tokens_per_sample: Spread
    """Text tokens per sample."""
    images_per_sample: Spread
    """Images per sample."""
    image_height: Spread
    """Image heights in pixels."""
    image_width: Spread
    """Image widths in pixels."""
    encoder_tokens_per_image: Spread
    """Vision-encoder tokens per image under the model's image rule."""
    over_limit: tuple[str, ...]
    """Keys of samples that alone exceed a microbatch limit (not packed)."""
    packed: WorkloadSummary
    """Per-microbatch statistics of the packed global batches."""
    read_seconds: float
    """Time to read and decode the samples through Energon."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        spreads = ("text_tokens_per_sample", "images_per_sample", "image_height",
                   "image_width", "encoder_tokens_per_image")
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "path", "kind", "model", "tokenizer", "splits", "samples", "images")}
        for name in spreads:
            s: Spread = getattr(self, name)
            out[name] = {"mean": s.mean, "min": s.min, "max": s.max}
        out["over_limit"] = list(self.over_limit)
        out["packed"] = self.packed.to_dict()
        out["read_seconds"] = self.read_seconds
        return out

    def format(self) -> str:
        """Markdown in the form of benchmarks/workload_stats.py's report."""
        p = self.packed
        num = (lambda v, d=2: "-" if v is None else f"{v:,.{d}f}")
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        lines = [f"# Dataset statistics: {self.path}", "",
                 f"{self.kind}, {self.samples} samples ({splits}), {self.images} images; "
                 f"text tokens by {self.tokenizer}; packed by {self.model}'s rules; read "
                 f"through Energon in {self.read_seconds:.2f} s.", "",
                 "| per sample | mean (min-max) |", "|---|---|",
                 f"| text tokens | {self.text_tokens_per_sample.format()} |",
                 f"| images | {self.images_per_sample.format(2)} |",
                 f"| image height (px) | {self.image_height.format()} |",
                 f"| image width (px) | {self.image_width.format()} |",
                 f"| encoder tokens / image | {self.encoder_tokens_per_image.format()} |", "",
                 f"## Packed: {p.iterations} global batches, {p.microbatches} microbatches",
                 "", "Load spread is the heaviest over the lightest microbatch by encoder "
                 "tokens, a linear FLOP proxy; '-' where the lightest has none.", "",
                 "| dataset | samples / mb | images / mb: mean (min-max) | text tokens / image "
                 "| LM fill | encoder tokens / mb (min-max) | encoder load max/min |",
                 "|---|---|---|---|---|---|---|",
                 f"| {Path(self.path).name} | {num(p.samples / max(p.microbatches, 1))} "
                 f"| {num(p.mean_images_per_microbatch)} ({p.min_images_per_microbatch}-"
                 f"{p.max_images_per_microbatch}) | {num(p.text_tokens_per_image, 1)} "
                 f"| {p.fill_ratio:.1%} | {p.min_encoder_tokens_per_microbatch:,}-"
                 f"{p.max_encoder_tokens_per_microbatch:,} | {num(p.encoder_tokens_spread)} |"]
        if self.over_limit:
            shown = ", ".join(self.over_limit[:5]) + (", ..." if len(self.over_limit) > 5 else "")
            lines += ["", f"{len(self.over_limit)} samples exceed a microbatch limit of "
                          f"{self.model} and were not packed: {shown}"]
        return "\n".join(lines)


def sample_stat(sample: DataSample, split: str, tokenizer: TextTokenizer) -> SampleStat:
    """Text tokens and image sizes of one decoded sample."""
    return SampleStat(key=sample.key, split=split,
                      text_tokens=sum(len(tokenizer.encode(t)) for t in sample.texts),
                      image_sizes=sample.image_sizes)


def read_stats(path: str | Path, tokenizer: TextTokenizer,
               splits: Iterable[str] | None = None, rank: int = 0,
               world_size: int = 1) -> tuple[list[SampleStat], str]:
    """Per-sample stats of the splits (default: all) for one rank, in Energon's order,
    and the dataset's kind ("captioning", "interleaved", or both joined by "+" for a
    metadataset that blends the two)."""
    stats: list[SampleStat] = []
    kinds: set[str] = set()
    for split in (split_names(path) if splits is None else splits):
        for sample in EnergonReader(path, split=split, rank=rank, world_size=world_size):
            kinds.add(sample.kind.value)
            stats.append(sample_stat(sample, split, tokenizer))
    return stats, "+".join(sorted(kinds))


def sample_metas(stats: Iterable[SampleStat], rules: TokenRules
                 ) -> tuple[list[SampleMeta], tuple[str, ...]]:
    """The planner's view of the samples: SampleMeta in order (sample_id = position among
    the kept samples) for those that fit the rules' microbatch limits, and the keys of
    those that do not. What `BatchStream` packs into global batches."""
    metas: list[SampleMeta] = []
    over: list[str] = []
    for stat in stats:
        meta = SampleMeta(sample_id=len(metas), text_tokens=stat.text_tokens,
                          images=tuple(ImageMeta(height=h, width=w) for h, w in stat.image_sizes))
        try:
            rules.check(meta)
        except WorkloadError:
            over.append(stat.key)
            continue
        metas.append(meta)
    return metas, tuple(over)


def dataset_stats(path: str | Path, *, model: str = "tiny-vlm",
                  tokenizer: str | None = None, split: str | None = None) -> DatasetStats:
    """Read the dataset (a prepared folder or a metadataset YAML; one split, or all)
    through Energon and summarise it under the
    model's rules (`model`: a model_configs name or YAML; `tokenizer`: a tokenizer folder,
    default the byte-level one)."""
    spec = load_model(model)
    rules = TokenRules.from_model(spec)
    if rules.image_rule is None:
        raise DataError("--model", f"{spec.name} has no vision encoder to take the images")
    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    stats, kind = read_stats(path, tok, None if split is None else [split])
    seconds = time.perf_counter() - start
    metas, over = sample_metas(stats, rules)
    batches = list(BatchStream(metas, rules, spec.parallel.num_microbatches))
    sizes = [size for s in stats for size in s.image_sizes]
    per_split: dict[str, int] = {}
    for stat in stats:
        per_split[stat.split] = per_split.get(stat.split, 0) + 1
    return DatasetStats(
        path=str(path), kind=kind, model=spec.name, tokenizer=tok.name, splits=per_split,
        samples=len(stats), images=len(sizes),
        text_tokens_per_sample=Spread.of([s.text_tokens for s in stats]),
        images_per_sample=Spread.of([len(s.image_sizes) for s in stats]),
        image_height=Spread.of([h for h, _ in sizes]),
        image_width=Spread.of([w for _, w in sizes]),
        encoder_tokens_per_image=Spread.of(
            [rules.encoder_tokens(ImageMeta(height=h, width=w)) for h, w in sizes]),
        over_limit=over, packed=summarize(batches, rules), read_seconds=seconds)
