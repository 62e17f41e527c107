#!/usr/bin/env bash
# The CUDA numbers of README.md (section Performance): the official CIFAR-10 DDPM++ (56M parameters) at the
# official per-GPU batch of 64, every fast path side by side. Eager variants first, then torch.compile in a
# second run (its compilation takes minutes; "default" is repeated there as its baseline).
#   bash benchmarks/cuda.sh [OUTDIR]
set -u
out=${1:-bench-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
common=(--config=cifar10-ddpmpp --batch=64 --fid-batch=64 --rounds=3)
timeout "${EAGER_TIMEOUT:-240}" $py benchmarks/benchmark.py "${common[@]}" \
    --variants=reference,default,default+tf32,default+bf16,default+fp16 --out="$out/eager.json" 2>&1 | tee "$out/eager.log"
timeout "${COMPILE_TIMEOUT:-300}" $py benchmarks/benchmark.py "${common[@]}" \
    --variants=default,default+bf16+compile --out="$out/compile.json" 2>&1 | tee "$out/compile.log"
