#!/usr/bin/env bash
# ~1B parameters (22 x 2048, GQA 16/8, SwiGLU 5632), 20B tokens, seq 4096, 1M tokens per step
# (global batch 256) -> 19,073 steps. Data parallel; TP=1 fits an 80 GB GPU at micro-batch 4.
set -euo pipefail
RUN_NAME="${RUN_NAME:-anchor-1b}"
NUM_LAYERS=22 HIDDEN=2048 FFN=5632 HEADS=16 KV_GROUPS=8
SEQ_LENGTH=4096 MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}" GLOBAL_BATCH_SIZE=256
TOKENS=20000000000 LR=3e-4 MIN_LR=3e-5
TP="${TP:-1}" PP="${PP:-1}" SEQ_PARALLEL=""
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
