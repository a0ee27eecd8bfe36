#!/usr/bin/env bash
# Train with the legacy launcher, python -m torch.distributed.launch --use_env ... train.py --distributed,
# on every local GPU (or 2 CPU processes with gloo). Settings as in train_torchrun.sh; flags go to train.py:
#   bash train_ddp.sh --epochs 20
#   NPROC_PER_NODE=4 MASTER_PORT=29600 bash train_ddp.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAUNCH_MODULE=torch.distributed.launch LAUNCH_FLAGS=--use_env exec bash "$HERE/train_torchrun.sh" "$@"
