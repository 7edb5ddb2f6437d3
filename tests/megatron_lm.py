"""Megatron-LM's sources at core_v0.16.1 for the tests that run its scripts.

MEGATRON_LM_DIR names a checkout of the user's own; otherwise build/megatron-lm, which
`make megatron-lm` (a prerequisite of `make test`) unpacks from
../shared/third_party/megatron-lm-core_v0.16.1.git.tar.gz, and which source() unpacks
itself when pytest runs without make. No Megatron-LM test skips: a missing checkout
fails with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "55ac7082517c3878ae653c07c09c534b8aed49f6"  # Megatron-LM core_v0.16.1
TARBALL = ROOT.parent / "shared" / "third_party" / "megatron-lm-core_v0.16.1.git.tar.gz"
BUILD = ROOT / "build" / "megatron-lm"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def run(*cmd, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def source() -> Path:
    """A Megatron-LM checkout holding core_v0.16.1 (fails the test when there is none)."""
    given = os.environ.get("MEGATRON_LM_DIR")
    if given:
        return Path(given)
    if not (BUILD / ".ready").exists():
        if not TARBALL.exists():
            pytest.fail(f"no Megatron-LM sources: set MEGATRON_LM_DIR to a checkout at "
                        f"core_v0.16.1 or provide {TARBALL}")
        BUILD.mkdir(parents=True, exist_ok=True)
        for cmd in (("tar", "-xzf", TARBALL, "-C", BUILD),
                    ("git", "-C", BUILD, "checkout", "-q", "-f", "core_v0.16.1")):
            done = run(*cmd)
            assert done.returncode == 0, done.stderr
        (BUILD / ".ready").touch()
    return BUILD


def fresh_checkout(dest: Path) -> Path:
    """A fresh working tree of Megatron-LM at core_v0.16.1 in dest (shares the source's
    objects), so a test can patch it without touching the source."""
    src = source()
    done = run("git", "clone", "-q", "--shared", "--no-checkout", src, dest)
    assert done.returncode == 0, f"cannot clone {src}: {done.stderr.strip()}"
    done = run("git", "-C", dest, "-c", "advice.detachedHead=false", "checkout", "-q", COMMIT)
    assert done.returncode == 0, f"{src} lacks core_v0.16.1 ({COMMIT}): {done.stderr.strip()}"
    return dest


def script_env(**extra: str) -> dict[str, str]:
    """The environment a Megatron-LM script runs in under the tests (warnings quiet)."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
"""Megatron's log line of one training iteration: (iteration, lm loss)."""
VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")
"""Megatron's validation line during training: (iteration, lm loss)."""


def logged(pattern: re.Pattern, log: str) -> dict[int, float]:
    """{iteration: value} of every line of `log` that `pattern` matches."""
    return {int(i): float(v) for i, v in pattern.findall(log)}


def patched_script(folder: Path, script: str) -> Path:
    """`script` (pretrain_vlm.py, pretrain_gpt.py) of a fresh Megatron-LM checkout at
    core_v0.16.1 in folder, with patches/ applied."""
    checkout = fresh_checkout(folder / "Megatron-LM")
    done = run("bash", ROOT / "scripts" / "apply_patches.sh", checkout)
    assert done.returncode == 0, done.stderr
    return checkout / script


def standin(script: Path, flags: list, procs: int, port: int, timeout: int = 600,
            cwd: Path | None = None) -> str:
    """Run a Megatron-LM script on `procs` processes through the CPU stand-in (python -m
    pipeweaver_megatron.cpu_standin); its output, after checking that it succeeded."""
    done = run(TORCHRUN, "--nproc-per-node", procs, "--master-port", port, "-m",
               "pipeweaver_megatron.cpu_standin", script, *flags, cwd=cwd or script.parent,
               env=script_env(), timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout + done.stderr
