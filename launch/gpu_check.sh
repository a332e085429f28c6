#!/usr/bin/env bash
# `make gpu-check`: on a machine with 1+ NVIDIA GPUs, build a venv with a CUDA torch and run
# tests/gpu/gpu_check.py (2 groups, bf16, ZeRO-3 and FSDP2, async exchange, checkpoint + resume;
# with 4+ GPUs also K=2 x T=2 tensor parallelism against T=1;
# one line per check). Stops at once, with one line, on a machine without a GPU.
#
#   GPU_CHECK_VENV=.venv-gpu            where the venv goes (kept between runs)
#   GPU_CHECK_SYSTEM_SITE=1             let the venv see the system's packages (a preinstalled CUDA torch)
#   GPU_CHECK_WHEELS=DIR                install offline from a wheel folder (pip --no-index --find-links)
#   GPU_CHECK_TORCH_INDEX=URL           a PyTorch wheel index for another CUDA build of torch
#   GPU_CHECK_ARGS="--backends zero3"   extra arguments for tests/gpu/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi missing or failing); nothing run" >&2
  exit 2
fi
GPUS=$(nvidia-smi -L | grep -c '^GPU ')
echo "gpu-check: $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"

VENV="${GPU_CHECK_VENV:-.venv-gpu}"
PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv ${GPU_CHECK_SYSTEM_SITE:+--system-site-packages} "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet -c constraints-gpu.txt)
[[ -n "${GPU_CHECK_WHEELS:-}" ]] && PIP+=(--no-index --find-links "$GPU_CHECK_WHEELS")
[[ -n "${GPU_CHECK_TORCH_INDEX:-}" ]] && PIP+=(--extra-index-url "$GPU_CHECK_TORCH_INDEX")
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e '.[test]'
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: torch in $VENV cannot see a CUDA device ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)')); nothing run" >&2
  exit 3
fi
export DS_ACCELERATOR=cuda PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}"
# shellcheck disable=SC2086
exec timeout 720 "$VENV/bin/python" tests/gpu/gpu_check.py --gpus "$GPUS" --out runs/gpu_check ${GPU_CHECK_ARGS:-}
