#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (or any CUDA node): build the extension with CUDA, run the GPU
# tests, then the kernel, layer and preset benchmarks. Everything is written to ${OUT:-gpu_out}/.
#   bash .ci/gpu_check.sh            (from the repository root; about 8 minutes on an H200)
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$out/gpu.txt"
python setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m pytest -q -x tests -m gpu 2>&1 | tee "$out/gpu_tests.txt" | tail -5
python -m pytest -q tests -m "not gpu" 2>&1 | tail -2 | tee "$out/cpu_tests.txt"
python -m nanosar.bench_ops --device=cuda 2>&1 | tee "$out/bench_ops.txt"
python -m nanosar.bench_model --device=cuda 2>&1 | tee "$out/bench_model.txt"
