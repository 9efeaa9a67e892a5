#!/usr/bin/env bash
# One self-contained GPU benchmark: the trainer's step (bf16 autocast on the towers only, as in
# training) on ViT-B-32 for our CLIP and AmorLIP steps (T_online 1 and 8) and open_clip's ClipLoss
# at batch 1024 and 2048, synthetic data: steps/s, peak memory, FLOPs, MFU against the GPU's
# datasheet bf16 peak and the share of a measured bf16 matmul rate. One GPU, no internet, a few
# minutes on an H200 (capped at 9.5 minutes). Needs python with torch, open_clip_torch, jsonschema
# and PyYAML, and this repo (no DeepSpeed, MLflow or data).
#
#   bash benchmarks/gpu.sh                 # writes $OUT/gpu.json when OUT is set, else benchmarks/results/gpu.json
#   bash benchmarks/gpu.sh --tiny          # the same code on CPU in seconds (smoke test)
#   PY=/path/to/python bash benchmarks/gpu.sh --batch-sizes 512 1024
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| open_clip', open_clip.__version__)"
exec timeout 570 "$PY" -m benchmarks.gpu_step "$@"
