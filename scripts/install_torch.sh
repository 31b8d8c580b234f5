#!/usr/bin/env bash
# Install PyTorch $TORCH_VERSION into the environment of the python given as $1: the CUDA build where an NVIDIA
# GPU is present, else the CPU build (from the package index if it serves one, else from PyTorch's CPU index).
set -euo pipefail
python="$1"
version="${TORCH_VERSION:-2.13.0}"
if "$python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    exit 0  # already there
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$python" -m pip install -q "torch==$version"
elif ! "$python" -m pip install -q "torch==$version+cpu" 2>/dev/null; then
    "$python" -m pip install -q "torch==$version+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
