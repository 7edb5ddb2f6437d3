"""`pipeweaver checkpoint convert`: move a pretrain_lmm checkpoint between Megatron's
stage layout and PipeWeaver's modality chunks (see megatron/convert.py), or write the
Megatron-LM checkpoint of a pretrain_vlm.py --pipeweaver one (megatron/lm_convert.py)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..service.settings import PARTITIONS

KINDS = ("megatron", "megatron-1f1b", "megatron-interleaved", "pipeweaver")
"""megatron/convert.py's KINDS, repeated so the parser imports no torch."""


def cmd_convert(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # megatron-core's import-time notes (no Apex, ...)
        warnings.simplefilter("ignore", UserWarning)
        return _convert(args)


def _convert_lm(args: argparse.Namespace) -> int:
    """A Megatron-LM checkpoint of pretrain_vlm.py (megatron/lm_convert.py)."""
    from ..megatron.lm_convert import convert_to_megatron
    from ..megatron.model_args import FlagError

    if (args.source, args.target) != ("pipeweaver", "megatron"):
        print("pipeweaver: error: a Megatron-LM checkpoint converts --from pipeweaver --to "
              "megatron; the script's own checkpoints need no conversion (a --pipeweaver run "
              "--load-s them at any PP)", file=sys.stderr)
        return 2
    pp = args.pipeline_model_parallel_size or args.pp
    if not pp:
        print("pipeweaver: error: pass --pipeline-model-parallel-size (the PP the script "
              "will load the checkpoint at)", file=sys.stderr)
        return 2
    try:
        result = convert_to_megatron(args.load, args.save, pp)
    except FlagError as exc:
        print(f"pipeweaver: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"iteration": result.iteration, "files": list(result.files),
                          "tensors": result.tensors, "optimizer": result.optimizer}))
    else:
        carried = ("with the optimizer's state" if result.optimizer else
                   "load it with --no-load-optim: no optimizer state moves, the checkpoint "
                   "has the distributed optimizer's or none")
        print(f"iteration {result.iteration}: --pipeweaver checkpoint -> Megatron-LM at PP {pp}, "
              f"{len(result.files)} rank files, {result.tensors} tensors, written to "
              f"{args.save} ({carried})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..megatron.convert import ConvertError, ConvertRequest, convert_checkpoint
    from ..megatron.lm_convert import is_megatron_lm_checkpoint

    if is_megatron_lm_checkpoint(args.load):
        return _convert_lm(args)
    if not args.model or not args.pp:
        print("pipeweaver: error: a pretrain_lmm checkpoint needs --model and --pp",
              file=sys.stderr)
        return 2

    try:
        result = convert_checkpoint(ConvertRequest(
            load=args.load, save=args.save, model=args.model, source=args.source,
            target=args.target, pp=args.pp, tp=args.tp, iteration=args.iteration,
            seed=args.seed, workload=args.workload, hardware=args.hardware,
            calibration=args.calibration, global_batch_size=args.global_batch_size,
            seq_length=args.seq_length, partition=args.partition))
    except ConvertError as exc:
        print(f"pipeweaver: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"iteration": result.iteration, "files": list(result.files),
                          "tensors": result.tensors, "moved": result.moved,
                          "source": result.source.describe().splitlines(),
                          "target": result.target.describe().splitlines()}))
        return 0
    print(f"iteration {result.iteration}: {args.source} ({result.source.num_stages} stages) -> "
          f"{args.target} ({result.target.num_stages} stages), {len(result.files)} rank files, "
          f"{result.tensors} tensors ({result.moved} moved to another pipeline rank), "
          f"written to {args.save}")
    print(result.target.describe())
    return 0


def add_parser(sub) -> None:
    checkpoint = sub.add_parser("checkpoint", help="training checkpoints").add_subparsers(
        dest="action", required=True)
    convert = checkpoint.add_parser(
        "convert", help="move a checkpoint between Megatron's stage layout and PipeWeaver's "
                        "chunks (parameters, Adam state, RNG, iteration)")
    convert.add_argument("--from", dest="source", required=True, choices=KINDS,
                         help="layout of the checkpoint (megatron = megatron-1f1b's)")
    convert.add_argument("--to", dest="target", required=True, choices=KINDS,
                         help="layout of the run that resumes it")
    convert.add_argument("--model", help="the checkpoint's model (pretrain_lmm checkpoints)")
    convert.add_argument("--pp", type=int, help="pipeline ranks of the checkpoint "
                         "(pretrain_lmm checkpoints)")
    convert.add_argument("--pipeline-model-parallel-size", type=int, help="Megatron-LM "
                         "checkpoints: the PP the script without --pipeweaver loads it at")
    convert.add_argument("--tp", type=int, help="tensor-parallel size (default: the checkpoint's)")
    convert.add_argument("--load", required=True, metavar="DIR", help="checkpoint to read")
    convert.add_argument("--save", required=True, metavar="DIR", help="directory to write")
    convert.add_argument("--iteration", type=int, help="default: the one `latest` names")
    resumed = convert.add_argument_group(
        "the resumed run's flags that decide a pipeweaver layout (give the values it will use)")
    resumed.add_argument("--seed", type=int, default=1234, help="default: pretrain_lmm's")
    resumed.add_argument("--workload", help="default: the model's dataset")
    resumed.add_argument("--hardware", help="--pipeweaver-hardware")
    resumed.add_argument("--calibration", metavar="FILE", help="--pipeweaver-calibration")
    resumed.add_argument("--global-batch-size", type=int, help="default: the model's")
    resumed.add_argument("--seq-length", type=int, help="default: the model's microbatch_tokens")
    resumed.add_argument("--partition", choices=PARTITIONS, default="balanced",
                         help="--pipeweaver-partition")
    convert.add_argument("--json", action="store_true")
    convert.set_defaults(func=cmd_convert)
