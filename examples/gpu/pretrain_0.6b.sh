#!/usr/bin/env bash
# ~0.6B parameters, 12B tokens (the paper's Chinchilla budget), seq 4096, 1M tokens per step
# (global batch 256) -> 11,444 steps.
# The architecture and parallel layout are examples/gpu/model_sizes.sh's 0.6b.
set -euo pipefail
RUN_NAME="${RUN_NAME:-anchor-0.6b}"
MODEL_SIZE=0.6b
source "$(dirname "${BASH_SOURCE[0]}")/model_sizes.sh"
SEQ_LENGTH=4096 GLOBAL_BATCH_SIZE=256
TOKENS=12000000000 LR=3e-4 MIN_LR=3e-5
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
