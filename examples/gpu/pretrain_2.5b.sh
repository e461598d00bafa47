#!/usr/bin/env bash
# ~2.5B parameters (36 x 2560, GQA 20/4, SwiGLU 6912), 50B tokens, seq 4096, 2M tokens per step
# (global batch 512) -> 23,841 steps. TP=2 with sequence parallel inside a node, data parallel across nodes.
set -euo pipefail
RUN_NAME="${RUN_NAME:-anchor-2.5b}"
NUM_LAYERS=36 HIDDEN=2560 FFN=6912 HEADS=20 KV_GROUPS=4
SEQ_LENGTH=4096 MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-2}" GLOBAL_BATCH_SIZE=512
TOKENS=50000000000 LR=2e-4 MIN_LR=2e-5
TP="${TP:-2}" PP="${PP:-1}" SEQ_PARALLEL=1
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
