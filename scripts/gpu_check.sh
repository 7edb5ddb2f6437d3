#!/usr/bin/env bash
# The prepared GPU check (issue 15 item 8): at most 10 minutes on one CUDA GPU.
# One PASS / FAIL / SKIP line per check; exits non-zero on any FAIL. Run from the
# project root with the project's environment (PY, default .venv/bin/python):
#     bash scripts/gpu_check.sh
# Never run on CI (no GPU). Writes docs/results/calibration_<gpu>.json.
set -u
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL gpu: torch sees no CUDA device"; exit 1
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
failed=0
for check in te bf16-ddp events memory; do
  timeout 240 "$PY" scripts/gpu_check.py "$check" || failed=1
done
out="docs/results/calibration_${GPU}.json"
log=$(mktemp)
if timeout 240 "$PY" -m pipeweaver_megatron.cli.main profile --device cuda --out "$out" \
    > "$log" 2>&1; then
  echo "PASS profile: $out"
else
  echo "FAIL profile: $(tail -1 "$log")"; failed=1
fi
rm -f "$log"
exit $failed
