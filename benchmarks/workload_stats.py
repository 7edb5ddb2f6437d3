"""Sampled workload statistics next to the published figures they follow.

For the model's kind (a VLM: LAION-2B, OBELICS, ScienceQA and the dynamic pattern; a
text-to-video model: ShareGPT4Video, InternVid, MMTrail-2M) it draws raw documents and
compares their means with each generator's declared targets, then packs global batches
and reports per-microbatch statistics. Writes a markdown report headed by the command.

    python benchmarks/workload_stats.py --model VLM-S --iterations 20 --seed 0
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeweaver_megatron.config import load_model  # noqa: E402
from pipeweaver_megatron.workload import (DATASETS, TokenRules, dynamic_target,  # noqa: E402
                                          sample_workload, summarize)

RAW_DOCUMENTS = 20000


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def datasets_for(rules: TokenRules) -> list[str]:
    """Generators the model can take."""
    kind = "image" if rules.image_rule is not None else "video"
    return [name for name, info in DATASETS.items() if info.modality == kind]


def raw_table(names: list[str], rules: TokenRules, seed: int) -> list[str]:
    rows = ["| dataset | published (source) | text tokens / doc: target | sampled "
            "| images / doc: target | sampled | s / clip: target | sampled |",
            "|---|---|---|---|---|---|---|---|"]
    for name in names:
        info = DATASETS[name]
        targets = info.targets(rules)
        if info.draw is None:
            rows.append(f"| {name} | {info.published} ({info.citation}) | "
                        f"{fmt(targets.mean_text_tokens, 1)} | (per iteration, below) | "
                        f"{fmt(targets.mean_images)} | (below) | - | - |")
            continue
        block = info.draw(np.random.default_rng(seed), RAW_DOCUMENTS, rules)
        clips = block.clip_seconds[block.clip_seconds > 0]
        rows.append(
            f"| {name} | {info.published} ({info.citation}) "
            f"| {fmt(targets.mean_text_tokens, 1)} | {fmt(block.text_tokens.mean(), 1)} "
            f"| {fmt(targets.mean_images)} | {fmt(block.num_images.mean())} "
            f"| {fmt(targets.mean_clip_seconds) if targets.mean_clips else '-'} "
            f"| {fmt(clips.mean()) if len(clips) else '-'} |")
    return rows


def packed_table(names: list[str], model, rules: TokenRules, iterations: int,
                 seed: int) -> tuple[list[str], dict[str, tuple[float, ...]]]:
    rows = ["| dataset | samples / mb | images / mb: mean (min-max) | text tokens / image "
            "| LM fill | encoder load max/min | clips / mb | s / clip "
            "| generator load max/min | seconds to sample |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    per_iteration: dict[str, tuple[float, ...]] = {}
    for name in names:
        start = time.perf_counter()
        batches = sample_workload(model, name, iterations, seed)
        elapsed = time.perf_counter() - start
        s = summarize(batches, rules)
        per_iteration[name] = s.mean_images_per_iteration
        rows.append(
            f"| {name} | {fmt(s.samples / max(s.microbatches, 1))} "
            f"| {fmt(s.mean_images_per_microbatch)} ({s.min_images_per_microbatch}-"
            f"{s.max_images_per_microbatch}) | {fmt(s.text_tokens_per_image, 1)} "
            f"| {s.fill_ratio:.1%} | {fmt(s.encoder_tokens_spread)} "
            f"| {fmt(s.mean_clips_per_microbatch)} | {fmt(s.mean_clip_seconds)} "
            f"| {fmt(s.generator_tokens_spread)} | {elapsed:.2f} |")
    return rows, per_iteration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="VLM-S", help="model name or YAML path")
    parser.add_argument("--iterations", type=int, default=20, help="global batches per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/workload_stats.md", help="markdown file")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    rules = TokenRules.from_model(model)
    names = datasets_for(rules)
    command = shlex.join(["python", "benchmarks/workload_stats.py", "--model", args.model,
                          "--iterations", str(args.iterations), "--seed", str(args.seed),
                          "--out", args.out])
    lines = [f"# Workload statistics: {model.name}", "", f"Produced by: `{command}`", "",
             f"Model: {model.description or model.name}; budget {rules.microbatch_tokens} "
             f"LM tokens and {rules.max_images_per_microbatch} images per microbatch, "
             f"{rules.num_microbatches} microbatches per iteration.", "",
             f"## Raw documents ({RAW_DOCUMENTS:,} per dataset) against the declared targets",
             "", "Targets are published means; clip lengths and prompts are cut to the "
             "model's limits first (the targets account for that).", ""]
    lines += raw_table(names, rules, args.seed)
    packed, per_iteration = packed_table(names, model, rules, args.iterations, args.seed)
    lines += ["", f"## Packed: {args.iterations} global batches per dataset", "",
              "Load spread is the heaviest over the lightest microbatch by encoder (or "
              "generator) tokens, a linear FLOP proxy; '-' where the lightest has none.", ""]
    lines += packed
    if "dynamic" in per_iteration:
        means = per_iteration["dynamic"]
        lines += ["", "## Dynamic pattern: mean images per microbatch by iteration", "",
                  "| iteration | " + " | ".join(str(i) for i in range(len(means))) + " |",
                  "|---|" + "---|" * len(means),
                  "| target | " + " | ".join(fmt(dynamic_target(i, rules), 1)
                                           for i in range(len(means))) + " |",
                  "| sampled | " + " | ".join(fmt(m, 1) for m in means) + " |"]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
