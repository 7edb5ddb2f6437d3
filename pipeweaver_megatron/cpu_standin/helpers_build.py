"""Building Megatron's dataset index helpers for the interpreter that runs them.

megatron/training/initialize.py calls megatron.core.datasets.utils.compile_helpers(), which
runs ``make -C megatron/core/datasets``. That Makefile asks ``python3-config`` for the
extension suffix and ``python3 -m pybind11`` for the include flags: whichever Python 3 is
first on PATH, not the one running Megatron. Where those differ (here /usr/bin/python3-config
is 3.12 while the venv runs 3.11) the module is built as helpers_cpp.cpython-312-*.so, which
the running interpreter never imports, and the first dataset fails. :func:`compile_helpers`
runs the same make with the suffix and the include flags of ``sys.executable`` given on the
command line (command-line variables override the Makefile's own), so a fresh checkout
builds a module the running interpreter loads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig

logger = logging.getLogger(__name__)


def make_command(directory: str) -> list[str]:
    """The make invocation that builds helpers_cpp for the running interpreter."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    includes = [sysconfig.get_paths()["include"]]
    try:
        import pybind11

        includes.append(pybind11.get_include())
    except ImportError:  # make then reports the missing pybind11 header itself
        pass
    cppflags = " ".join(f"-I{path}" for path in includes)
    return ["make", "-C", directory, f"LIBEXT={suffix}", f"CPPFLAGS={cppflags}"]


def compile_helpers() -> None:
    """Stand-in for megatron.core.datasets.utils.compile_helpers (same contract: build on
    one process; exit with status 1 when the build fails)."""
    import megatron.core.datasets.utils as utils

    directory = os.path.abspath(os.path.dirname(utils.__file__))
    if subprocess.run(make_command(directory)).returncode != 0:
        logger.error("Failed to compile the C++ dataset helper functions")
        sys.exit(1)
