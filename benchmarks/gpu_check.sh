#!/usr/bin/env bash
# The GPU check: the gpu test tier and the performance figures the README quotes, in one
# command of at most ~8 minutes on one H100 / H200-class GPU.
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA device
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU at tiny sizes
#
# Every step's log and JSON figures go to $OUT (or ./gpu_check_out), then summary.md and
# summary.json. A step that fails or runs past its bound is marked so and the next one
# runs; the exit status is 1 if any step failed. It installs nothing: it runs with
# $PYTHON (default: the project's .venv, else python3), so on a machine without the
# project's environment put the packages on PYTHONPATH first (docs/gpu.md says how).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK="$(mktemp -d -t mmcl-gpu-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
STEPS=()

step() { # step NAME BOUND_S COMMAND...: run one step with a time bound, record its status
  local name="$1" bound="$2"
  shift 2
  local t0=$SECONDS rc
  echo "== $name (bound ${bound}s): $*"
  timeout --kill-after=20 "$bound" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  local status=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timed out after ${bound}s"; elif [[ $rc -ne 0 ]]; then status="failed (exit $rc)"; fi
  echo "   -> $status in $((SECONDS - t0))s"
  STEPS+=("$name|$status|$((SECONDS - t0))")
}

if [[ $DRY -eq 1 ]]; then
  DEV=cpu AMP=bf16
  CLIP_MODEL=mmcl-tiny-clip
  TIER_ENV=(MMCL_GPU_TIER_DEVICE=cpu "MMCL_GPU_TIER_METHODS=${MMCL_GPU_TIER_METHODS:-finetune,gen_adapter,cma}")
  STEP_ARGS=(--steps 2 --warmup 1 --repeats 1)
  DAGR=(--batch 8 "${STEP_ARGS[@]}") DGG=(--batch 8 "${STEP_ARGS[@]}")
  BLIP2=tiny-blip2 LLAVA=tiny-llava GEN=(--batch 4 --steps 2 --tasks 2)
  LOADER=(--workers 0 1 --per-class 4 --photo 250x188 --batch 32 --batches 2 --repeats 1)
  TIER_BOUND=900
else
  DEV=cuda AMP=bf16
  CLIP_MODEL=ViT-B-16
  TIER_ENV=()
  STEP_ARGS=()
  DAGR=(--batch 128 --classes 100) DGG=(--batch 64)
  BLIP2=blip2-opt-2.7b LLAVA=llava-1.5-7b GEN=(--batch 16 --steps 10 --tasks 2)
  LOADER=(--workers 6 --per-class 16 --batch 128 --batches 8 --repeats 3)
  TIER_BOUND=240
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible: run with --dry-run for the CPU steps')" || exit 2
fi
"$PYTHON" - <<'EOF' >"$OUT/environment.txt" 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for pkg in ("ray", "optuna", "open_clip", "transformers", "peft", "pydantic"):
    try:
        m = __import__(pkg)
        print(pkg, getattr(m, "__version__", "?"))
    except ImportError as e:
        print(pkg, "MISSING:", e)
EOF
cat "$OUT/environment.txt"

step gpu_tier "$TIER_BOUND" env "${TIER_ENV[@]}" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -p no:randomly \
  -p no:cacheprovider --junitxml="$OUT/gpu_tier.xml"
step dagr_step 150 "$PYTHON" benchmarks/dagr_step.py --model "$CLIP_MODEL" --amp "$AMP" --device "$DEV" "${DAGR[@]}" \
  --json "$OUT/dagr_step.json"
step dgg_overhead 120 "$PYTHON" benchmarks/dgg_overhead.py --model "$CLIP_MODEL" --amp "$AMP" --device "$DEV" "${DGG[@]}" \
  --json "$OUT/dgg_overhead.json"
"$PYTHON" benchmarks/vlm_shapes.py "$BLIP2" "$WORK/blip2" >/dev/null
"$PYTHON" benchmarks/vlm_shapes.py "$LLAVA" "$WORK/llava" >/dev/null
step eca_blip2 180 "$PYTHON" benchmarks/gen_step.py --path "$WORK/blip2" --random-weights --methods gen_adapter eca \
  --device "$DEV" --amp "$AMP" "${GEN[@]}" --json "$OUT/eca_blip2.json"
step dgg_llava 180 "$PYTHON" benchmarks/gen_step.py --kind llava --path "$WORK/llava" --random-weights --methods gen_dgg \
  --device "$DEV" --amp "$AMP" "${GEN[@]}" --json "$OUT/dgg_llava.json"
DEMAND=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['samples_per_s']['dagr'])" "$OUT/dagr_step.json" 2>/dev/null || true)
step mtil_loader 150 "$PYTHON" benchmarks/mtil_loader.py --device "$DEV" "${LOADER[@]}" ${DEMAND:+--demand "$DEMAND"} \
  --json "$OUT/mtil_loader.json"

printf '%s\n' "${STEPS[@]}" >"$OUT/steps.txt"
"$PYTHON" benchmarks/gpu_check_summary.py "$OUT" $([[ $DRY -eq 1 ]] && echo --dry-run)
! grep -qv '|ok|' "$OUT/steps.txt"
