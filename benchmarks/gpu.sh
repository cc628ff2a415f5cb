#!/usr/bin/env bash
# The GPU checks, in one script for the first time a GPU is at hand (about 8 minutes on an H100 / H200):
# CUDA tests, the MoE layer's phases eager and compiled, a kernel profile, gcvimoe_tiny vs its dense twin, and the
# fused Triton expert path against the default one (it becomes a default only if it wins by 5 % end to end).
# Each step has its own time limit and writes its own section of benchmarks/RESULTS.md; a failed step is reported
# and the next one still runs. Run from the repository root:  bash benchmarks/gpu.sh [PYTHON]
set -u
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
[ -x "$py" ] || py=python3
status=0
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "gpu.sh: $name"
    timeout "$limit" "$@" || { echo "gpu.sh: $name failed or ran out of time (exit $?)"; status=1; }
}
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: no CUDA device")' || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step 80 "CUDA tests (sync-free steps, bf16 grouped GEMMs, CPU equality)" "$py" -m pytest -q tests/test_cuda.py
step 90 "MoE layer, eager, forward / backward apart" "$py" benchmarks/gpu_layer.py --rounds 10
step 110 "MoE layer, compiled" "$py" benchmarks/gpu_layer.py --compile --rounds 10 --tokens 262144 --top-k 1
step 50 "MoE layer vs Mlp, eager, with the top kernels of one train step" \
    "$py" benchmarks/moe_layer.py --device cuda --token-scale 32 --cases k1-e8 --rounds 10 --show-ops
step 30 "MoE layer, the fused Triton path pinned, eager" \
    "$py" benchmarks/gpu_layer.py --path triton --rounds 10 --tokens 262144 --hidden 768 --top-k 1
step 170 "gcvimoe_tiny vs its dense twin, eager and compiled, with the Triton path's A/B" \
    "$py" benchmarks/model.py --device cuda --batch 128 --expert-path triton
exit $status
