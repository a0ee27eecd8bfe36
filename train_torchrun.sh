#!/usr/bin/env bash
# Train with torchrun on every local GPU, or on 2 CPU processes with gloo when there is no GPU.
# Every setting is an environment variable with a default; extra flags go straight to train.py:
#   bash train_torchrun.sh --epochs 20 --lr 0.005
#   NPROC_PER_NODE=4 bash train_torchrun.sh --config configs/ddp_segmentation.toml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash train_torchrun.sh      # then NODE_RANK=1 on the other node
#   MAX_RESTARTS=3 bash train_torchrun.sh --recovery_interval 200        # survive worker failures
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"  # images with only python3
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$GPUS" -gt 0 ]; then DEFAULT_NPROC="$GPUS"; else DEFAULT_NPROC=2; fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$DEFAULT_NPROC}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
# torchrun sets OMP_NUM_THREADS=1 per process with a warning; keep a user's own choice, else share the cores.
CORES="$(nproc 2>/dev/null || echo 2)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}"

# Fault tolerance: --resume auto continues from recovery.pth/last.pth in the run's folder, and the run stamp is fixed
# here once, so the default folder keeps its name when torchrun restarts the workers (MAX_RESTARTS > 0).
export AILAB_RUN_STAMP="${AILAB_RUN_STAMP:-$(date +%Y%m%d-%H%M%S)}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

# train_ddp.sh reuses this script with the legacy launcher.
LAUNCH_MODULE="${LAUNCH_MODULE:-torch.distributed.run}"
LAUNCH_FLAGS="${LAUNCH_FLAGS:-}"

echo "$LAUNCH_MODULE: $NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
if [ "$LAUNCH_MODULE" = "torch.distributed.run" ]; then LAUNCH_FLAGS="--max-restarts=$MAX_RESTARTS $LAUNCH_FLAGS"; fi
exec "$PYTHON" -m "$LAUNCH_MODULE" $LAUNCH_FLAGS \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    "$HERE/train.py" --distributed --resume auto "$@"
