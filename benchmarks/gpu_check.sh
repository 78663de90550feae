#!/usr/bin/env bash
# The GPU checks in one prepared run, offline: the training-step benchmark, the FID extractor at 10k images and the
# CUDA-only tests; details under $OUT, one short table printed last.
#
#   benchmarks/gpu_check.sh [BUNDLE_DIR]            on a GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu [BUNDLE_DIR]      the same steps, tiny, on the CPU (checks this script)
#   benchmarks/gpu_check.sh --dry-run [BUNDLE_DIR]  print the commands, run nothing
#
# BUNDLE_DIR (or $IMMISCIBLE_GPU_BUNDLE; default .gpu-bundle) is the folder ../shared/tools/gpu-bundle builds: the
# FID Inception weights as fp16 (FID about +0.04 from fp32 weights) and Fashion-MNIST; its unpack.py is run here when
# inception-fp16.pt is not there yet. Nothing is downloaded. $OUT defaults to ./gpu-check-out; $PYTHON to python3.
# Files: train_step.txt/.json, fid.txt, pytest-cuda.txt, deps.txt, summary.txt. A failing step does not stop the
# others; the exit status is that of the first failing step (0 when all pass).
set -u
mode=gpu
case "${1:-}" in
  --cpu | --dry-run) mode=${1#--}; shift ;;
  -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
esac
BUNDLE=${1:-${IMMISCIBLE_GPU_BUNDLE:-.gpu-bundle}}
OUT=${OUT:-./gpu-check-out}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"
first_failure=0

step() {  # NAME COMMAND...: run it into $OUT/NAME.txt (shown as it runs), one summary row
  local name=$1 rc=0 start
  shift
  if [ "$mode" = dry-run ]; then
    echo "+ $*"
    printf '%-12s %-6s %6s\n' "$name" "dry" "-" >>"$OUT/summary.txt"
    return 0
  fi
  echo "== $name: $*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  printf '%-12s %-6s %5ss\n' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" "$(( $(date +%s) - start ))" \
    >>"$OUT/summary.txt"
  if [ "$rc" != 0 ] && [ "$first_failure" = 0 ]; then first_failure=$rc; fi
  return 0
}

# 0. what this machine has: versions and the packages the project imports
step deps "$PY" -c "
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
missing = [m for m in ('pydantic', 'typer', 'rich', 'scipy', 'yaml', 'torchdiffeq', 'PIL', 'matplotlib')
           if importlib.util.find_spec(m) is None]
print('missing:', ', '.join(missing) or 'none')
raise SystemExit(1 if missing else 0)"

# 1. the FID weights from the bundle (offline)
weights="$BUNDLE/inception-fp16.pt"
if [ "$mode" != dry-run ] && [ ! -f "$weights" ] && [ -f "$BUNDLE/unpack.py" ]; then
  step unpack "$PY" "$BUNDLE/unpack.py"
fi
fid_weights=()
if [ -f "$weights" ] || [ "$mode" = dry-run ]; then fid_weights=(--weights "$weights"); fi

# 2. the training step: ours (each assigner, eager and compiled) beside a peer-style eager fp32 step
if [ "$mode" = cpu ]; then
  step train_step "$PY" benchmarks/train_step.py --device cpu --tiny --json "$OUT/train_step.json"
else
  step train_step "$PY" benchmarks/train_step.py --device cuda --json "$OUT/train_step.json"
fi

# 3. a 10k-image FID point, part by part (benchmarks/fid.py; each option passed only where fid.py has it)
fid_help=$("$PY" benchmarks/fid.py --help 2>/dev/null || true)
has() { case "$fid_help" in *"$1"*) return 0 ;; *) return 1 ;; esac; }
fid_args=(--mode legacy_tensorflow)
if [ "$mode" = cpu ]; then
  fid_args+=(--images 8 --batch-size 8)
  if has --stub-inception; then
    fid_args+=(--stub-inception --frechet-dim 64 --steps 2 --set model.channels=8 --set "model.channel_mult=[1, 2]"
               --set model.num_res_blocks=1 --set "model.attn_resolutions=[8]" --set model.head_channels=8)
  else
    fid_args+=("${fid_weights[@]}")
  fi
else
  fid_args+=(--images 10000 --batch-size 1000 "${fid_weights[@]}")
  if has --preset; then fid_args+=(--preset cifar10-vanilla-fm --steps 50); fi
  if has --precision; then fid_args+=(--precision bf16); fi
  if has --inception-precision; then fid_args+=(--inception-precision fp16); fi
  if has --noise; then fid_args+=(--noise counter); fi
  if has "--device"; then fid_args+=(--device cuda); elif has --no-cpu; then fid_args+=(--no-cpu); fi
fi
step fid "$PY" benchmarks/fid.py "${fid_args[@]}"

# 4. the CUDA-only tests (on the CPU they skip; only the speed-path files are collected there)
if [ "$mode" = cpu ]; then
  step pytest_cuda "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_speed_path.py tests/test_checkpoint_devices.py
else
  step pytest_cuda "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
fi

# the table
{
  echo
  echo "gpu_check ($mode), $(date -u +%FT%TZ); details in $OUT"
  printf '%-12s %-6s %6s\n' step status time
  cat "$OUT/summary.txt"
  if [ -f "$OUT/train_step.json" ]; then
    "$PY" -c "
import json, sys
data = json.load(open(sys.argv[1]))
print(f\"train step on {data['device']}, batch {data['batch']}:\")
for row in data['rows']:
    print(f\"  {row['config']:<20} {row['img_per_s']:9.1f} img/s  {row['ratio']:5.2f}x peer  {row['peak_mib']:8.0f} MiB\")
" "$OUT/train_step.json"
  fi
  if [ -f "$OUT/fid.txt" ]; then grep -E "images/s|total" "$OUT/fid.txt" | tail -n 6 | sed 's/^/  fid: /'; fi
  if [ -f "$OUT/pytest_cuda.txt" ]; then tail -n 1 "$OUT/pytest_cuda.txt" | sed 's/^/  pytest -m cuda: /'; fi
} | tee "$OUT/table.txt"
exit "$first_failure"
