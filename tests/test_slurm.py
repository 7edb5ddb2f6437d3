"""scripts/slurm/ on a real single-node Slurm cluster on localhost.

Installs slurm-wlm and munge when missing (skipped, with the reason, only when they cannot
be installed), starts private daemons (tests/slurm_cluster.py), runs tiny_vlm_cpu.sbatch
and checks that its log has a finite loss for every iteration, then runs each paper
setup's sbatch file with `echo` as the Python to check the command it launches. About
30 s after the install.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest

from pipeweaver_megatron.config import load_model
from slurm_cluster import LocalCluster, ensure_packages

ROOT = Path(__file__).resolve().parents[1]
ITERS = 3
LINE = re.compile(r"^iteration\s+(\d+)/(\d+) \| loss (\S+)", re.M)
SETUPS = ["VLM-S", "VLM-M", "VLM-L", "T2V-S", "T2V-L"]


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_packages()
    if reason:
        warnings.warn(f"test_slurm skipped: {reason}")  # shown in the summary even with -q
        pytest.skip(reason)
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster: LocalCluster, script: Path, out: Path, args: list[str], options=(),
           **env: str) -> str:
    """sbatch from the repo root, logs under out; variables this shell may hold are cleared."""
    env = {"PYTHON": sys.executable, "PIPEWEAVER_LOG_DIR": str(out), "PIPEWEAVER_DIR": "",
           "MEGATRON_DIR": "", "MASTER_ADDR": "", "MASTER_PORT": "", **env}
    export = ",".join(f"{k}={v}" for k, v in env.items())
    return cluster.slurm("sbatch", "--parsable", f"--output={out}/%x-%j.log", *options,
                         f"--export=ALL,{export}", str(script), *args, cwd=ROOT)


def finish(cluster: LocalCluster, job: str, log: Path, timeout: float) -> str:
    """Wait for the job; its log, once it has COMPLETED."""
    state = cluster.wait_job(job, timeout)
    text = log.read_text(errors="replace") if log.exists() else f"({log} missing)"
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-4000:]}\n{cluster.logs()}"
    return text


def test_tiny_vlm_cpu_job(cluster):
    out = cluster.dir / "tiny"
    out.mkdir()
    job = submit(cluster, ROOT / "scripts/slurm/tiny_vlm_cpu.sbatch", out,
                 ["--train-iters", str(ITERS)])
    text = finish(cluster, job, out / f"tiny-vlm-cpu-{job}.log", timeout=600)

    losses = {int(k): float(loss) for k, n, loss in LINE.findall(text) if int(n) == ITERS}
    assert sorted(losses) == list(range(1, ITERS + 1)), text[-4000:]
    assert all(math.isfinite(v) for v in losses.values()), losses
    jsonl = (out / f"tiny-vlm-cpu-{job}.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in jsonl]
    assert [r["iteration"] + 1 for r in records] == sorted(losses)
    assert [round(r["loss"], 4) for r in records] == [losses[k] for k in sorted(losses)]


def test_paper_setup_scripts(cluster):
    """Each setup's file asks for its spec's nodes (8 GPUs each) and launches the right entry
    point with its TP and PP: run on one task with `echo` as the Python, which prints them."""
    out = cluster.dir / "setups"
    out.mkdir()
    jobs = {}
    for name in SETUPS:
        script = ROOT / "scripts/slurm" / f"{name.lower().replace('-', '_')}.sbatch"
        p = load_model(name).parallel
        assert f"--nodes={p.tp * p.pp * p.dp // 8}\n" in script.read_text(), script
        megatron = "/opt/megatron-lm" if name in ("VLM-M", "T2V-S") else ""
        job = submit(cluster, script, out, ["--train-iters", "7"],
                     ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--oversubscribe"],
                     PYTHON="/bin/echo", MEGATRON_DIR=megatron)
        entry = f"{ROOT}/scripts/pretrain_lmm.py"
        if megatron:
            entry = f"{megatron}/pretrain_{'vlm' if name.startswith('VLM') else 'gpt'}.py"
        jobs[job] = (name, entry, p)
    for job, (name, entry, p) in jobs.items():
        text = finish(cluster, job, out / f"{name.lower()}-{job}.log", timeout=120)
        assert (f"{entry} --pipeweaver --pipeweaver-model-config {name} --pipeweaver-log "
                f"{out}/{name.lower()}-{job}.jsonl --tensor-model-parallel-size {p.tp} "
                f"--pipeline-model-parallel-size {p.pp} --train-iters 7") in text, text
