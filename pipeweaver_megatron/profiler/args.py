"""The `pipeweaver profile` arguments, importable without torch (the CLI starts fast;
torch is imported only when the command runs)."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The profile options."""
    parser.add_argument("--device", required=True, metavar="{cpu,cuda}",
                        help="torch device to measure (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="calibration JSON to write")
    parser.add_argument("--hardware", metavar="NAME",
                        help="hardware profile the factors are relative to (default: cpu on "
                             "the host, the GPU's profile or H100 on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced set of cases (under 30 s on 2 cores)")


class ProfileError(ValueError):
    """A user error of `pipeweaver profile` (bad device, bad output path, ...)."""


def _run(args: argparse.Namespace) -> None:
    from .cli import run

    try:
        run(args)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `profile` on the `pipeweaver` command's subparsers."""
    parser = subparsers.add_parser("profile", help="measure this machine, fit SEMU's factors",
                                   description="Measure GEMM, attention, elementwise, "
                                   "collective and real megatron-core layers on this machine "
                                   "and write SEMU's calibration file.")
    add_arguments(parser)
    parser.set_defaults(func=_run)
    return parser
