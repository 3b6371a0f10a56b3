#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (or any CUDA node): build the extension with CUDA, run the GPU
# tests, the kernel / layer / preset / training benchmarks, a short GPU training and evaluation on the
# synthetic suite, a dry run of the ablation's GPU variant, and last torch.compile vs eager of the large
# preset and its dense twin (capped at 7 minutes: the forward table comes first). Everything is written to ${OUT:-gpu_out}/.
#   bash .ci/gpu_check.sh            (from the repository root; about 10-15 minutes on an H200)
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$out/gpu.txt"
python setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m pytest -q -x tests -m gpu 2>&1 | tee "$out/gpu_tests.txt" | tail -5
python bench.py ops --device=cuda 2>&1 | tee "$out/bench_ops.txt"
python bench.py model --device=cuda 2>&1 | tee "$out/bench_model.txt"
{
  python prepare.py synthetic --out data/synth --train-tiles 128 --test-tiles 32 --workers 8
  torchrun --standalone --nproc_per_node=1 train.py config/synth_tiny.py --max_iters=100 --device=cuda
  python eval.py --suite synthetic --ckpt out/synth_tiny/ckpt.pt
} 2>&1 | tee "$out/train_eval.txt" | tail -20
# the routing ablation's GPU variant, every stage for 2 steps on micro data (full run: README, ~1 hour)
python -m nanosar.ablation --variant gpu --dry-run --device cuda --out "$out/ablation_dry_run" 2>&1 \
  | tail -30 > "$out/ablation_dry_run.txt"
timeout 420 python bench.py compile --device=cuda --dtype=bfloat16 --presets large --size 512 2>&1 \
  | tee "$out/bench_compile.txt"
