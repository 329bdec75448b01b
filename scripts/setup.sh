#!/usr/bin/env bash
# Sets up a virtual environment in .venv with gill_pipeline installed (editable) and everything it needs.
#   bash scripts/setup.sh              # library + training extras
#   bash scripts/setup.sh --open-clip  # ... plus open_clip_torch (open_clip vision encoders)
#   bash scripts/setup.sh --test       # ... plus open_clip, gradio (demo) and the test extras (pytest, selenium, ...):
#                                      # what CI runs
# Torch: a CPU build (torch==2.13.0) is installed when no torch is importable; install your own CUDA build first
# (`.venv/bin/pip install torch`) to use a GPU.
# open_clip needs torchvision, and a torchvision only imports beside the exact torch it was built for, which for the
# CPU torch above is not to be had: --open-clip and --test install the matched pair below (torch from PyPI, a CUDA
# build that also runs on CPU, several GB) when torchvision does not import, replacing the torch already in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_TORCH="torch==2.13.0"
TORCH_WITH_VISION=("torch==2.14.1" "torchvision==0.29.1")

extras="train,faiss"
case "${1:-}" in
  "") ;;
  --open-clip) extras="train,faiss,open_clip" ;;
  --test) extras="test,train,faiss,open_clip,demo" ;;
  *) echo "usage: bash scripts/setup.sh [--open-clip | --test], got '$1'" >&2; exit 2 ;;
esac

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
# A recent pip: older ones do not normalise `open_clip` to the `open-clip` name setuptools gives the extra.
.venv/bin/python -m pip install -q --upgrade pip
if [[ "$extras" == *open_clip* ]]; then
  if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "${TORCH_WITH_VISION[@]}"
  fi
elif ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "$DEFAULT_TORCH"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [[ "$extras" == *open_clip* ]]; then
  # Fails the setup, not the first test, when torch and torchvision do not match.
  .venv/bin/python -c "import open_clip" || { echo "open_clip does not import in .venv (see above)" >&2; exit 1; }
fi
echo "gill_pipeline is set up in .venv ($(.venv/bin/python -c 'import torch, diffusers, transformers; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")'))"
