"""Megatron-LM's pretrain_vlm.py with and without --pipeweaver, side by side on this CPU.

Both runs go through the CPU stand-in from one checkpoint of the reference (dropout off,
--finetune), on the same mock data: the reference is Megatron's own LLaVA at PP 1 in one
process, PipeWeaver the same command plus --pipeweaver at PP 2 on 2 processes (the
wrapper picks V). Prints every iteration's lm loss of both and Megatron's own "elapsed
time per iteration" (the first iteration left out of the mean), and writes
docs/results/megatron_dropin.{md,json}. Not a timed test: a 2-core VM moves these times
a lot, and PP 2 on 2 cores shares them with the planner process.

With --data-path DIR --tokenizer-model DIR (`make data` makes build/data/interleaved and
build/data/tokenizer) every run reads that Energon dataset instead of the mock data
(megatron/vlm_data.py), all three the same samples, and the report is
megatron_dropin_data.{md,json}.

Usage: python benchmarks/megatron_dropin.py [--iterations N] [--out DIR]
           [--data-path DIR --tokenizer-model DIR [--seq-length N]]
Megatron-LM's sources: MEGATRON_LM_DIR, else build/megatron-lm (make megatron-lm).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeweaver_megatron.megatron.examples import TINY_LLAVA, tiny_llava_on

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "55ac7082517c3878ae653c07c09c534b8aed49f6"
TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN = ["--eval-interval", "1000", "--eval-iters", "0"]
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): "
                  r"([0-9.]+).*?lm loss: ([0-9.E+-]+)")


def sh(*cmd, cwd=None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=1800)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, cmd[:6]))} ...: exit {done.returncode}\n"
                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def script(work: Path) -> Path:
    source = Path(os.environ.get("MEGATRON_LM_DIR") or ROOT / "build" / "megatron-lm")
    if not (source / ".git").exists() and not (source / "HEAD").exists():
        sys.exit(f"no Megatron-LM checkout at {source}: run `make megatron-lm` or set "
                 "MEGATRON_LM_DIR")
    checkout = work / "Megatron-LM"
    sh("git", "clone", "-q", "--shared", "--no-checkout", source, checkout)
    sh("git", "-C", checkout, "-c", "advice.detachedHead=false", "checkout", "-q", COMMIT)
    sh("bash", ROOT / "scripts" / "apply_patches.sh", checkout)
    return checkout / "pretrain_vlm.py"


def megatron(vlm: Path, flags: list[str], procs: int, port: int) -> dict[int, tuple[float, float]]:
    log = sh(TORCHRUN, "--nproc-per-node", procs, "--master-port", port, "-m",
             "pipeweaver_megatron.cpu_standin", vlm, *flags, cwd=vlm.parent)
    return {int(i): (float(ms), float(loss)) for i, ms, loss in LINE.findall(log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--data-path", type=Path, help="a prepared Energon dataset")
    parser.add_argument("--tokenizer-model", type=Path, help="its BPE folder")
    parser.add_argument("--seq-length", type=int, default=192)
    args = parser.parse_args(argv)
    if bool(args.data_path) != bool(args.tokenizer_model):
        parser.error("--data-path and --tokenizer-model go together")
    LLAVA = [*(tiny_llava_on(args.data_path.resolve(), args.tokenizer_model.resolve(),
                             args.seq_length) if args.data_path else TINY_LLAVA), *RUN]
    data = (f"the Energon dataset {args.data_path} (its BPE, --seq-length {args.seq_length})"
            if args.data_path else "the mock data")
    name = "megatron_dropin_data" if args.data_path else "megatron_dropin"
    with tempfile.TemporaryDirectory(prefix="dropin-") as tmp:
        work = Path(tmp)
        vlm = script(work)
        start = work / "start"
        megatron(vlm, [*LLAVA, "--pipeline-model-parallel-size", "1", "--train-iters", "1",
                       "--lr", "0", "--min-lr", "0", "--save", start, "--save-interval", "1"],
                 1, 29901)
        common = [*LLAVA, "--load", start, "--finetune", "--train-iters", str(args.iterations)]
        theirs = megatron(vlm, [*common, "--pipeline-model-parallel-size", "1"], 1, 29902)
        ours = megatron(vlm, [*common, "--pipeline-model-parallel-size", "2", "--pipeweaver",
                              "--pipeweaver-hardware", "cpu"], 2, 29903)
        # Megatron's own PP 2 (1F1B) for the times: it cannot load the PP-1 checkpoint,
        # so it starts from its own initialisation and its losses are not compared.
        static = megatron(vlm, [*LLAVA, "--train-iters", str(args.iterations),
                                "--pipeline-model-parallel-size", "2"], 2, 29904)
    rows = [(i, theirs[i][1], ours[i][1], theirs[i][0], ours[i][0]) for i in sorted(theirs)
            if i in ours]
    worst = max(abs(o - t) / abs(t) for _, t, o, _, _ in rows)
    mean_t = statistics.mean(r[3] for r in rows[1:])
    mean_o = statistics.mean(r[4] for r in rows[1:])
    mean_s = statistics.mean(static[i][0] for i in sorted(static)[1:])
    lines = ["# Megatron-LM pretrain_vlm.py: --pipeweaver (PP 2) beside Megatron (PP 1), CPU",
             "", f"`python benchmarks/megatron_dropin.py {' '.join(argv or sys.argv[1:])}`; "
             "tiny LLaVA (ViT 2 x 64, LM 4 x 64, 32 px tiles), 4 microbatches per iteration, "
             f"on {data}, one starting checkpoint, dropout off, through the CPU stand-in.", "",
             "| iteration | Megatron PP 1 lm loss | --pipeweaver PP 2 lm loss | Megatron ms | "
             "--pipeweaver ms |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {t:.6E} | {o:.6E} | {tm:.1f} | {om:.1f} |" for i, t, o, tm, om in rows]
    lines += ["", f"Largest relative loss difference: {worst:.2e}. Mean iteration time "
              f"(iterations 2..): Megatron PP 1 on 1 process {mean_t:.1f} ms, --pipeweaver "
              f"PP 2 on 2 processes {mean_o:.1f} ms (2 cores shared with the planner), Megatron's "
              f"own PP 2 (1F1B, its own initialisation) on 2 processes {mean_s:.1f} ms. On "
              "2 cores a model this small gains nothing from pipelining; the times show the "
              "cost of the CPU path, not PipeWeaver's speedup (benchmarks/real_cpu.py)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(
        {"rows": rows, "max_rel_loss_diff": worst, "mean_ms_megatron_pp1": mean_t,
         "mean_ms_pipeweaver_pp2": mean_o, "mean_ms_megatron_pp2": mean_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
