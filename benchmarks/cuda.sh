#!/usr/bin/env bash
# The CUDA checks and numbers of README.md: the CUDA tests (tests/test_cuda.py), then the official CIFAR-10 DDPM++
# (56M parameters) at the official per-GPU batch of 64 with every fast path side by side (section Performance):
# eager variants first, then torch.compile in a second run (its compilation takes minutes; "default" is repeated
# there as its baseline). Every measurement of every variant starts a process of its own, so the eager run alone
# takes several minutes.
#   bash benchmarks/cuda.sh [OUTDIR] [all | a comma-separated list of tests, eager, compile]
set -u
out=${1:-bench-cuda}
what=${2:-all}
for part in ${what//,/ }; do
  case "$part" in
    all|tests|eager|compile) ;;
    *) echo "cuda.sh: part '$part': expected all, tests, eager or compile" >&2; exit 2;;
  esac
done
wants() { case ",$what," in *",$1,"*|*",all,"*) return 0;; *) return 1;; esac; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
common=(--config=cifar10-ddpmpp --batch=64 --fid-batch=64 --rounds=3)
if wants tests; then
  timeout "${TESTS_TIMEOUT:-180}" $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.log"
fi
if wants eager; then
  timeout "${EAGER_TIMEOUT:-480}" $py benchmarks/benchmark.py "${common[@]}" \
      --variants=reference,default,default+tf32,default+bf16,default+fp16 --out="$out/eager.json" 2>&1 | tee "$out/eager.log"
fi
if wants compile; then
  # Training and sampling only: each compiles its own graphs in its own process.
  timeout "${COMPILE_TIMEOUT:-540}" $py benchmarks/benchmark.py "${common[@]}" --measure=train,sample \
      --variants=default,default+compile,default+bf16+compile --out="$out/compile.json" 2>&1 | tee "$out/compile.log"
fi
