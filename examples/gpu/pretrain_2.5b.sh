#!/usr/bin/env bash
# ~2.5B parameters, 50B tokens, seq 4096, 2M tokens per step (global batch 512) -> 23,841 steps.
# The architecture and parallel layout are examples/gpu/model_sizes.sh's 2.5b.
set -euo pipefail
RUN_NAME="${RUN_NAME:-anchor-2.5b}"
MODEL_SIZE=2.5b
source "$(dirname "${BASH_SOURCE[0]}")/model_sizes.sh"
SEQ_LENGTH=4096 GLOBAL_BATCH_SIZE=512
TOKENS=50000000000 LR=2e-4 MIN_LR=2e-5
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
