#!/usr/bin/env bash
# ~0.6B parameters (24 x 1536, GQA 12/4, SwiGLU 4096), 12B tokens (the paper's Chinchilla budget), seq 4096,
# 1M tokens per step (global batch 256) -> 11,444 steps. One node of 8 GPUs: pure data parallel.
set -euo pipefail
RUN_NAME="${RUN_NAME:-anchor-0.6b}"
NUM_LAYERS=24 HIDDEN=1536 FFN=4096 HEADS=12 KV_GROUPS=4
SEQ_LENGTH=4096 MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}" GLOBAL_BATCH_SIZE=256
TOKENS=12000000000 LR=3e-4 MIN_LR=3e-5
TP="${TP:-1}" PP="${PP:-1}" SEQ_PARALLEL=""
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
