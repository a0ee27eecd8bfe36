#!/usr/bin/env bash
# One-shot check of the GPU paths that CPU machines cannot test: a few training steps in fp32, AMP bfloat16,
# AMP float16 (GradScaler), channels-last and torch.compile, torchrun + NCCL (1 process; 2 when 2+ GPUs are
# visible), the NCCL CPU-tensor rule, test.py, infer.py, both exports, and the training loop's per-step cost
# against a bare loop (benchmarks/step_overhead.py). Prints a PASS/FAIL/SKIP table with
# seconds, images/s and peak GPU memory; exit code 0 only if no row failed.
#
#   bash tools/gpu_check.sh                              # from the repo root, on a CUDA machine (no network needed)
#   MODEL="--layers 18" STEPS=10 bash tools/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh         # the same rows on the CPU (GPU-only rows SKIP): tests the script
#
# Settings (environment variables, defaults in brackets):
#   PYTHON           interpreter with the suite's requirements [.venv/bin/python if present, else python or python3]
#   OUT              results folder: gpu_check.md, <row>.log, runs/<row>/ [/tmp/ailab-gpu-check]
#   STEPS            --limit_batches (training and validation batches) per training row [20]
#   COMPILE_STEPS    --limit_batches of the --compile row [10]
#   BATCHSIZE        --batchsize per process [16]
#   CROP             --crop_size [128]
#   WORKERS          --workers for train.py, test.py and infer.py [4 on GPU, 0 on CPU]
#   MODEL            model flags for train.py [--model_type deeplabv3p --layers 50]
#   TRAIN_FLAGS      more train.py flags, e.g. "--dataset_path data/VOC2012" [none: the built-in data,
#                    generated locally on first use under AILAB_DATA or ~/.cache/ailab]
#   CLS_FLAGS        train.py flags of the classification row instead of TRAIN_FLAGS [none: the built-in digits,
#                    which need scikit-learn (requirements-dev.txt)]
#   INFER_IMAGES     images for the infer.py row [16]
#   ROW_TIMEOUT      seconds one row may take before it is killed (with its child processes) [150]
#   COMPILE_TIMEOUT  the same for the --compile row [300]
#   BUDGET           seconds for all rows together; a row gets at most what is left, and rows that would start
#                    with under 10 s left are SKIPped [540]
#   ROWS             comma-separated row names to run (the others SKIP) [all]
#   GPU_CHECK_DEVICE cpu: run on the CPU with gloo (GPU-only rows SKIP) [unset: a CUDA GPU is required, exit 2]
#   GPU_CHECK_CPU_COMPILE=1  also run the --compile row in CPU mode (slow: inductor builds C++) [unset]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
    else PYTHON="$(command -v python || command -v python3 || echo python)"; fi
fi
export PYTHON
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
