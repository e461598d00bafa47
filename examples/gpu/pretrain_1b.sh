#!/usr/bin/env bash
# ~1B parameters, 20B tokens, seq 4096, 1M tokens per step (global batch 256) -> 19,073 steps.
# The architecture and parallel layout are examples/gpu/model_sizes.sh's 1b.
set -euo pipefail
RUN_NAME="${RUN_NAME:-anchor-1b}"
MODEL_SIZE=1b
source "$(dirname "${BASH_SOURCE[0]}")/model_sizes.sh"
SEQ_LENGTH=4096 GLOBAL_BATCH_SIZE=256
TOKENS=20000000000 LR=3e-4 MIN_LR=3e-5
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
