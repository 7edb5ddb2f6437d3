"""DESIGN.md's layering: the planning side imports neither torch nor megatron, and no
code names a device."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pipeweaver_megatron

PACKAGE = Path(pipeweaver_megatron.__file__).parent
PLANNING = ["config", "workload", "ir", "schedules", "semu", "planner", "service", "cli.main", "accelerators",
            "profiler.args"]


def test_planning_side_imports_neither_torch_nor_megatron():
    modules = ", ".join(f"pipeweaver_megatron.{m}" for m in PLANNING)
    code = (f"import sys, {modules}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_device_is_named():
    pattern = re.compile(r"""torch\.device\(\s*["'](?!meta)|\.cuda\(|\.cpu\(|["']cuda:\d|"""
                         r"""device\s*=\s*["'](cuda|cpu)|\.to\(\s*["'](cuda|cpu)""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() == "config/hardware.py":
            continue  # hardware profile names (the "cpu" profile), not torch devices
        if path.relative_to(PACKAGE).parts[0] == "cpu_standin":
            continue  # the stand-in for the GPU maps cuda devices to the host by name
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_accelerator_detection_does_not_import_them():
    code = ("import sys\nfrom pipeweaver_megatron.accelerators import detect\n"
            "found = detect()\nassert isinstance(found.transformer_engine, bool)\n"
            "assert 'transformer_engine' not in sys.modules and 'apex' not in sys.modules\n"
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_runtime_reads_the_ir_not_the_planner():
    """runtime/ executes ir's ExecutionPlan and IterationPlan (DESIGN.md: it reads ir only,
    never the planner); verify.py alone, a tool that builds the plans it checks, may."""
    import ast

    offenders = []
    for path in sorted((PACKAGE / "runtime").glob("*.py")):
        if path.name == "verify.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                top = node.module.split(".")[0]
                if top in ("planner", "semu", "service", "schedules"):
                    offenders.append(f"runtime/{path.name}:{node.lineno}: from ..{node.module}")
    assert not offenders, "\n".join(offenders)
