#!/usr/bin/env bash
# Sets up a virtual environment in .venv with gill_pipeline installed (editable) and everything it needs.
#   bash scripts/setup.sh          # library + training extras
#   bash scripts/setup.sh --test   # ... plus the test extras (pytest, faiss-cpu, ...)
# Torch: a CPU build (torch==2.13.0) is installed when no torch is importable; install your own CUDA build first
# (`.venv/bin/pip install torch`) to use a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="train,faiss"
if [[ "${1:-}" == "--test" ]]; then
  extras="test,train,faiss"
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "gill_pipeline is set up in .venv ($(.venv/bin/python -c 'import torch, diffusers, transformers; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")'))"
