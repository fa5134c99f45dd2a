#!/usr/bin/env bash
# The whole bench on one CUDA GPU, offline, in one command (<= 8 minutes on an H200).
# Installs nothing: it expects the environment carried with the tree (e.g. `.venv`).
#   bash benchmarks/gpu.sh [N_PROMPTS]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("device:", torch.cuda.get_device_name(0))
PY
# bf16 weights, each model on its own CUDA stream (TransformersBackend does both on cuda)
timeout 470 dreamr bench -n "${1:-50}" --device cuda --tag cuda --out benchmarks/results
