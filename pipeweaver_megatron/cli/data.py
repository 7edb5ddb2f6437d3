"""`pipeweaver data prepare | stats | demo`: real multimodal datasets for Energon."""

from __future__ import annotations

import argparse
import json
import time
import warnings


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare_dataset

    start = time.perf_counter()
    result = prepare_dataset(args.src, args.out, kind=args.kind, shard_size=args.shard_size,
                             splits=args.split, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    splits = ", ".join(f"{s.name} {s.samples} samples in {len(s.shards)} shards"
                       for s in result.splits)
    print(f"{result.kind.value}: {result.samples} samples in {result.shards} shards of "
          f"{result.shard_size} ({splits}) prepared for Energon in {result.path} "
          f"({time.perf_counter() - start:.2f} s)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..data.stats import dataset_stats

    with warnings.catch_warnings():  # megatron-core's and Energon's import-time notes
        warnings.simplefilter("ignore", UserWarning)
        stats = dataset_stats(args.path, model=args.model, tokenizer=args.tokenizer,
                              split=args.split)
    print(json.dumps(stats.to_dict(), indent=2) if args.json else stats.format())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data.demo import build_demo

    start = time.perf_counter()
    data = build_demo(args.out, model=args.model, seed=args.seed, captioning=args.captioning,
                      interleaved=args.interleaved)
    for prepared in (data.captioning, data.interleaved):
        splits = ", ".join(f"{s.name} {s.samples}" for s in prepared.splits)
        print(f"{prepared.kind.value}: {prepared.samples} samples ({splits}) in {prepared.path}")
    print(f"tokenizer: {data.tokenizer} (--tokenizer-type HuggingFaceTokenizer "
          f"--tokenizer-model {data.tokenizer})")
    print(f"made in {time.perf_counter() - start:.1f} s")
    return 0


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="real multimodal datasets (Energon)").add_subparsers(
        dest="action", required=True)
    prep = data.add_parser("prepare", help="a folder of images + samples.jsonl -> an Energon "
                                           "dataset (WebDataset shards, split.yaml)")
    prep.add_argument("src", metavar="SRC", help="folder with samples.jsonl and the images")
    prep.add_argument("--out", required=True, metavar="DIR", help="new dataset folder")
    prep.add_argument("--kind", default="captioning", choices=("captioning", "interleaved"))
    prep.add_argument("--shard-size", type=int, help="samples per shard (default: up to 100, "
                      "small enough that every split gets a whole shard)")
    prep.add_argument("--split", default="train=0.98,val=0.02", metavar="NAME=RATIO,...",
                      help="split ratios; Energon assigns whole shards to splits")
    prep.add_argument("--seed", type=int, default=42, help="Energon's shard shuffle before "
                      "the split")
    prep.add_argument("--json", action="store_true")
    prep.set_defaults(func=cmd_prepare)

    stats = data.add_parser("stats", help="a prepared dataset's dynamicity, read through "
                                          "Energon and packed by a model's rules")
    stats.add_argument("path", metavar="DIR", help="prepared dataset folder")
    stats.add_argument("--model", default="tiny-vlm", help="model name or YAML path")
    stats.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (tokenizer.json); "
                       "default: the byte-level tokenizer")
    stats.add_argument("--split", help="one split (default: all)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    demo = data.add_parser("demo", help="make a small real dataset from scikit-image's "
                                        "photographs and pydoc's text, plus a BPE tokenizer")
    demo.add_argument("--out", required=True, metavar="DIR")
    demo.add_argument("--model", default="tiny-vlm", help="whose microbatch limits every "
                      "sample must fit")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--captioning", type=int, default=240, help="captioning samples")
    demo.add_argument("--interleaved", type=int, default=160, help="interleaved documents")
    demo.set_defaults(func=cmd_demo)
