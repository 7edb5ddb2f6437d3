"""SEMU's cost model against published figures (no calibration: the default factors).

1. PipeWeaver (arXiv 2504.14145, section 2): on H800, with 8 images + 8192 text tokens
   per microbatch, a ViT-5B layer costs 6.75 ms and a 32B-LM layer 10.5 ms (forward +
   backward). The paper does not state the TP size; VLM-M uses TP8, shown with TP4 too.
2. PipeWeaver Table 1: an LM 7B alone on 8 GPUs (TP2, PP4) reaches MFU 0.400 (H800).
   The batch size is not published; shown for 32 and 64 microbatches of 8192 tokens.
3. Megatron-LM (Narayanan et al., SC'21, Table 1): GPT-3 175B, TP8 x PP16 x DP12 on
   1536 A100s, batch 1536 of 2048 tokens, 153 TFLOP/s per GPU = 49% of peak, counted
   with activation recomputation (hardware FLOPs = 4/3 of model FLOPs).

Usage: python benchmarks/semu_published.py [--out docs/results/semu_published.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from pipeweaver_megatron.config import config_dir, get_hardware, load_model
from pipeweaver_megatron.ir import Part
from pipeweaver_megatron.schedules import build_baseline
from pipeweaver_megatron.semu import CostModel, ModuleShape, simulate

LLAMA2_7B = {"kind": "language_model", "num_layers": 32, "hidden_size": 4096,
             "ffn_hidden_size": 11008, "num_attention_heads": 32, "gated_mlp": True,
             "vocab_size": 32000}
"""Llama 2 7B (Touvron et al. 2023), standing in for the paper's 'LM 7B'."""


def layer_times() -> list[str]:
    rows = []
    model = load_model("vlm-m")
    for tp in (8, 4):
        costs = CostModel(model, get_hardware("H800"), tp=tp)
        vit = costs.stage_cost((Part("vision", 1, 2),), {"vision": ModuleShape((676,) * 8)})
        lm = costs.stage_cost((Part("lm", 1, 2),), {"lm": ModuleShape((8192,))})
        for label, cost, paper in (("ViT-5B layer, 8 images", vit, 6.75),
                                   ("LM-32B layer, 8192 tokens", lm, 10.5)):
            ours = (cost.forward_s + cost.backward_s) * 1e3
            rows.append(f"| {label}, TP{tp}, H800 | {paper} ms | {ours:.2f} ms | "
                        f"{(ours - paper) / paper:+.0%} |")
    return rows


def lm_only_mfu(tmp: Path, name: str, lm: dict, hw: str, tp: int, pp: int, dp: int,
                seq: int, microbatches: int, recompute: bool, baseline: str) -> float:
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "hardware": hw, "modules": [{"name": "lm", **lm}], "topology": [],
        "parallel": {"tp": tp, "pp": pp, "dp": dp, "microbatch_tokens": seq,
                     "global_batch_size": microbatches * dp, "sequence_parallel": True}}))
    model = load_model(str(spec))
    table = build_baseline(model, baseline)
    shapes = {"lm": [[ModuleShape((seq,))] for _ in range(microbatches)]}
    stages = range(table.layout.num_stages) if recompute else ()
    result = simulate(CostModel(model, get_hardware(hw)), table, shapes, recompute=stages,
                      detail=False)
    return result.mfu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results/semu_published.md")
    args = parser.parse_args(argv)
    lines = ["# SEMU against published figures", "",
             "Produced by: `python benchmarks/semu_published.py` (default efficiency factors, "
             "no calibration; every figure below is simulated).", "",
             "| case | published | SEMU | error |", "|---|---|---|---|"]
    lines += layer_times()
    gpt = yaml.safe_load((config_dir() / "components" / "gpt-175b.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for m in (32, 64):
            mfu = lm_only_mfu(Path(tmp), f"lm7b-{m}", LLAMA2_7B, "H800", 2, 4, 1, 8192, m,
                              False, "megatron-1f1b")
            lines.append(f"| LM 7B alone, TP2 PP4, {m} microbatches, H800: MFU | 0.400 | "
                         f"{mfu:.3f} | {(mfu - 0.4) / 0.4:+.0%} |")
        mfu = lm_only_mfu(Path(tmp), "gpt175b", gpt, "A100", 8, 16, 12, 2048, 128, True,
                          "megatron-1f1b")
        hfu = mfu * 4 / 3
        lines.append(f"| GPT-3 175B, TP8 PP16 DP12, A100, recompute: hardware FLOPs / peak | "
                     f"0.49 | {hfu:.3f} | {(hfu - 0.49) / 0.49:+.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
