"""The --pipeweaver flags, composable with any Megatron extra_args_provider.

    from pipeweaver_megatron import add_arguments, chain_args
    pretrain(..., extra_args_provider=chain_args(my_extra_args))

Only argparse here: adding the flags imports neither torch nor megatron.
"""

from __future__ import annotations

import argparse
from typing import Callable

from ..ir.execplan import TRANSPORTS
from ..planner.systems import PIPEWEAVER, RUNNABLE
from ..service.settings import PARTITIONS

FAULTS = ("planner-crash", "planner-hang", "bad-plan", "crash-mid-save")
"""The planner's faults (service/settings.py), and crash-mid-save: in the checkpoint
after that iteration, a rank other than 0 dies once rank 0's file is written."""


def fault_spec(text: str) -> tuple[str, int]:
    """--pipeweaver-inject-fault KIND@ITER."""
    kind, _, iteration = text.partition("@")
    if kind not in FAULTS or not iteration.isdigit():
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FAULTS)} followed by "
                                         f"@ITERATION, got {text!r}")
    return kind, int(iteration)


def budget_ms(text: str) -> float | None:
    """--pipeweaver-search-budget-ms: milliseconds > 0, or auto (None)."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds > 0 or auto, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the PipeWeaver group to a Megatron (or any argparse) parser; returns it."""
    group = parser.add_argument_group("pipeweaver", "dynamic modality-aware pipeline schedules")
    group.add_argument("--pipeweaver", action="store_true",
                       help="run pipeline parallelism through forward_backward_pipeweaver")
    group.add_argument("--pipeweaver-model-config", metavar="NAME_OR_YAML",
                       help="model spec: a name from model_configs/ or a YAML path")
    group.add_argument("--pipeweaver-hardware", help="SEMU hardware profile (default: the spec's)")
    group.add_argument("--pipeweaver-calibration", metavar="FILE",
                       help="SEMU calibration from `pipeweaver profile`")
    group.add_argument("--pipeweaver-search-budget-ms", type=budget_ms, default=None,
                       metavar="MS|auto", help="search time per batch in the planner process; "
                       "auto (default): follows the measured iteration time and the cores "
                       "training leaves idle (service/budget.py)")
    group.add_argument("--pipeweaver-partition", choices=PARTITIONS,
                       default="balanced", help="the chunk cut: each module balanced on its "
                       "own, or searched across modules by SEMU-planned schedules of a "
                       "sample batch (planner/cut_search.py; seconds at start-up)")
    group.add_argument("--pipeweaver-online-calibration", choices=("on", "off"), default="on",
                       help="refit SEMU's runtime terms from every trained iteration's "
                            "measured compute times (semu/online.py)")
    group.add_argument("--pipeweaver-lookahead", type=int, default=2,
                       help="global batches planned ahead of training")
    group.add_argument("--pipeweaver-planner-workers", type=int, default=1,
                       help="planner processes per pipeline group")
    group.add_argument("--pipeweaver-plan-timeout-ms", type=float, default=2000.0,
                       help="longest wait for a plan before the fallback schedule runs")
    group.add_argument("--pipeweaver-fallback", choices=RUNNABLE[:2], default=RUNNABLE[0],
                       help="schedule of an iteration whose plan is late or invalid")
    group.add_argument("--pipeweaver-schedule", choices=RUNNABLE, default=PIPEWEAVER,
                       help="pipeweaver, or a Megatron order through the same runtime")
    group.add_argument("--pipeweaver-transport", choices=("auto",) + TRANSPORTS,
                       default="auto", help="P2P transport: auto is nccl-order on NCCL (a "
                       "communicator per channel, one tag, no batching) and tags on gloo; "
                       "nccl-order on gloo runs NCCL's matching rules on the CPU")
    group.add_argument("--pipeweaver-record-plans", metavar="DIR",
                       help="write every plan served (to replay it later)")
    group.add_argument("--pipeweaver-replay-plans", metavar="DIR",
                       help="train on the plans recorded in DIR, no planner running (the "
                            "same data order and flags as the recording run)")
    group.add_argument("--pipeweaver-trace-dir", metavar="DIR",
                       help="write predicted timelines (Perfetto JSON) here")
    group.add_argument("--pipeweaver-log", metavar="FILE.jsonl",
                       help="per-iteration JSON lines (loss, times, plan latency, fallback)")
    group.add_argument("--pipeweaver-skip-bad-samples", type=int, default=0, metavar="N",
                       help="with --data-path: skip at most N bad samples (an image that does "
                            "not decode, a sample over a microbatch limit), each logged")
    group.add_argument("--pipeweaver-inject-fault", type=fault_spec, action="append", default=[],
                       metavar="KIND@ITER", help=f"tests only: {', '.join(FAULTS)} at an iteration")
    return parser


def chain_args(other: Callable[[argparse.ArgumentParser], argparse.ArgumentParser] | None = None
               ) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """An extra_args_provider adding the --pipeweaver flags after `other`'s. Under
    --pipeweaver the parser also sets Megatron's --num-virtual-stages-per-pipeline-rank
    from the run's layout right after parsing (virtual_stages.wrap_parser)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        from .virtual_stages import wrap_parser  # the planner side: no torch

        if other is not None:
            parser = other(parser) or parser
        parser = add_arguments(parser)
        if "--dataloader-save" not in parser._option_string_actions:
            parser.add_argument("--dataloader-save", metavar="DIR",
                                help="where the Energon loader state of --data-path is saved "
                                     "with every checkpoint and restored on --load (Megatron's "
                                     "examples/multimodal flag; default: --save)")
        return wrap_parser(parser)

    return provider
