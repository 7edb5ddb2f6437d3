"""SEMU grounding: measured forward/backward of real megatron-core layers vs SEMU.

Times one transformer layer of tiny-vlm's ViT (1..16 images of 64 patches, each image
its own attention sequence) and LM (64..2048 tokens of packed samples, causal, RoPE) on
this machine, also at 2x and 4x the hidden size, and writes the medians to JSON. When
pipeweaver_megatron.semu.CostModel is importable it prices the same layer (one middle
layer, no embedding or head) with a calibration file (or a quick profile run now) and
writes a markdown table of the errors headed by the command.

    python benchmarks/semu_grounding.py [--calibration FILE] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")  # megatron-core's import-time notes about apex and TE

import torch  # noqa: E402

from pipeweaver_megatron.config import ModelSpec, get_hardware, load_model  # noqa: E402
from pipeweaver_megatron.models import init_single_process, teardown  # noqa: E402
from pipeweaver_megatron.profiler.layers import resized_model, time_layer, warm_up  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
VIT_IMAGES = (1, 2, 4, 8, 16)
LM_SAMPLES = ((64,), (128,), (96, 160), (128, 384), (256, 256, 512), (512, 512, 1024))


@dataclass(frozen=True, slots=True)
class Case:
    """One layer at one shape."""

    module: str
    scale: int
    """Hidden and FFN sizes times this."""
    lengths: tuple[int, ...]
    """Per image encoder tokens (ViT) or per sample tokens (LM)."""

    @property
    def name(self) -> str:
        return f"{self.module} x{self.scale} {len(self.lengths)} seq / {sum(self.lengths)} tok"


@dataclass(slots=True)
class Result:
    """Measured (and, when SEMU is there, predicted) times of one case."""

    case: str
    module: str
    hidden: int
    lengths: list[int]
    forward_s: float
    backward_s: float
    predicted_forward_s: float | None = None
    predicted_backward_s: float | None = None

    def error_pct(self, phase: str) -> float | None:
        predicted = getattr(self, f"predicted_{phase}_s")
        measured = getattr(self, f"{phase}_s")
        return None if predicted is None else 100.0 * (predicted - measured) / measured


def cases(model: ModelSpec, scales: tuple[int, ...]) -> list[Case]:
    """ViT cases (images of the model's encoder tokens) and LM cases, per scale."""
    vit = model.module("vision")
    per_image = vit.image.encoder_tokens(vit.image.image_size, vit.image.image_size)
    out = []
    for scale in scales:
        out += [Case("vision", scale, (per_image,) * n) for n in VIT_IMAGES]
        out += [Case("lm", scale, lengths) for lengths in LM_SAMPLES]
    return out


def load_cost_model():
    """SEMU's CostModel, ModuleShape and Part, or None while SEMU is not there yet."""
    try:
        from pipeweaver_megatron.ir import Part
        from pipeweaver_megatron.semu import CostModel, ModuleShape
    except ImportError as exc:
        print(f"note: SEMU's CostModel is not importable yet ({exc}); measuring only")
        return None
    return CostModel, ModuleShape, Part


def calibration_for(args: argparse.Namespace):
    """The calibration file given, or a quick profile of this machine."""
    from pipeweaver_megatron.semu.calibration import load_calibration
    if args.calibration:
        return load_calibration(args.calibration)
    from pipeweaver_megatron.profiler.cli import profile
    from pipeweaver_megatron.profiler.timing import default_hardware, resolve_device
    dev = resolve_device(torch.cpu.current_device())
    print("no --calibration: running the quick profile")
    return profile(dev, default_hardware(dev), quick=True)


def predict(results: list[Result], model: ModelSpec, args: argparse.Namespace) -> str | None:
    """Fill in SEMU's predictions; return the calibration's description (None: no SEMU)."""
    semu = load_cost_model()
    if semu is None:
        return None
    cost_model, module_shape, part = semu
    calibration = calibration_for(args)
    hardware = get_hardware(calibration.hardware)
    for r in results:
        cm = cost_model(resized_model(model, r.module, r.hidden), hardware, calibration)
        cost = cm.stage_cost((part(r.module, 1, 2),), {r.module: module_shape(tuple(r.lengths))})
        r.predicted_forward_s, r.predicted_backward_s = cost.forward_s, cost.backward_s
    factors = ", ".join(f"{c.value}: a_f={f.a_f:.2f} a_m={f.a_m:.2f} a_n={f.a_n:.2f} "
                        f"overhead={f.overhead_s * 1e6:.1f}us"
                        for c, f in calibration.factors.items())
    source = args.calibration or "a quick `pipeweaver profile` run by this command"
    return f"{source}, relative to the {calibration.hardware} profile: {factors}"


def markdown(results: list[Result], command: str, calibration: str) -> str:
    """The report: per case measured vs predicted, then the mean absolute errors."""
    lines = ["# SEMU grounding: one megatron-core layer, measured vs predicted", "",
             f"Made by `{command}` on {torch.get_num_threads()} CPU threads, "
             f"torch {torch.__version__}, fp32.", "",
             "Measured: median forward and backward of one megatron-core TransformerLayer "
             "(local spec, SDPA core attention on packed sequences; RoPE for the LM) after "
             "two warmups. SEMU: `CostModel.stage_cost` of `Part(module, 1, 2)` (one middle "
             "layer, no embedding or head) with the same sequence lengths.", "",
             f"Calibration: {calibration}", "",
             "| case | module | hidden | sequences | fwd ms | bwd ms | SEMU fwd ms | SEMU bwd ms "
             "| fwd err % | bwd err % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seqs = f"{len(r.lengths)} x {r.lengths[0]}" if len(set(r.lengths)) == 1 else \
            "+".join(map(str, r.lengths))
        lines.append(f"| {r.case} | {r.module} | {r.hidden} | {seqs} | {r.forward_s * 1e3:.2f} "
                     f"| {r.backward_s * 1e3:.2f} | {r.predicted_forward_s * 1e3:.2f} "
                     f"| {r.predicted_backward_s * 1e3:.2f} | {r.error_pct('forward'):+.1f} "
                     f"| {r.error_pct('backward'):+.1f} |")
    lines += ["", "| module | cases | MAE fwd % | MAE bwd % |", "|---|---|---|---|"]
    for module in sorted({r.module for r in results}) + ["all"]:
        rows = [r for r in results if module in ("all", r.module)]
        mae = {p: statistics.mean(abs(r.error_pct(p)) for r in rows) for p in ("forward", "backward")}
        lines.append(f"| {module} | {len(rows)} | {mae['forward']:.1f} | {mae['backward']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", metavar="FILE", help="from `pipeweaver profile`")
    parser.add_argument("--quick", action="store_true", help="scale 1 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS / "semu_grounding_measured.json"))
    parser.add_argument("--report", default=str(RESULTS / "semu_grounding.md"))
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/semu_grounding.py",
                          *(sys.argv[1:] if argv is None else argv)])
    model = load_model("tiny-vlm")
    repeats = 3 if args.quick else args.repeats
    init_single_process(seed=0)
    results = []
    try:
        warm_up(model)
        for case in cases(model, (1,) if args.quick else (1, 2, 4)):
            hidden = model.module(case.module).hidden_size * case.scale
            spec = resized_model(model, case.module, hidden).module(case.module)
            fwd, bwd = time_layer(spec, case.lengths, repeats)
            results.append(Result(case.name, case.module, spec.hidden_size, list(case.lengths),
                                  fwd, bwd))
            print(f"{case.name:<24} fwd {fwd * 1e3:8.2f} ms  bwd {bwd * 1e3:8.2f} ms")
    finally:
        teardown()
    calibration = predict(results, model, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, "threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "calibration": calibration,
                                          "cases": [dataclasses.asdict(r) for r in results]},
                                         indent=2))
    print(f"wrote {args.out}")
    if calibration is not None:
        report = markdown(results, command, calibration)
        Path(args.report).write_text(report)
        print(report)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
