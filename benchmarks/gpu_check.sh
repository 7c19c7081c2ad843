#!/usr/bin/env bash
# The GPU check (issue 19): at most 8 minutes on one GPU, no downloads. Run from the repository root on a machine
# with a CUDA torch and the project installed (pip install -c constraints.txt -e ".[dev]" where torch is CUDA):
#   bash benchmarks/gpu_check.sh
# 1. ViT-B and Swin-B PGD-7 training steps in bf16: images/s and the share of the GPU's bf16 peak by FLOP count
#    (benchmarks/gpu_step.py);
# 2. the CIFAR-10 LoRA preset's 4-trial sweep on synthetic CIFAR files at cut epochs, two trials sharing the GPU
#    at 0.5 each, with its final evaluation on the GPU (benchmarks/gpu_sweep.py).
# Prints numbers only; each part has its own time limit so one stuck part cannot eat the other's.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
timeout 180 python benchmarks/gpu_step.py --batch 64 --steps 10 || { echo "gpu_step: exit $?"; status=1; }
timeout 270 python benchmarks/gpu_sweep.py --out "${TMPDIR:-/tmp}/gpu_sweep" || { echo "gpu_sweep: exit $?"; status=1; }
exit $status
