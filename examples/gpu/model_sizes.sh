#!/usr/bin/env bash
# One architecture per model size, sourced by every GPU recipe (pretraining and SFT), so a fine-tuning run can
# never drift from the model it loads. Set MODEL_SIZE (0.6b | 1b | 2.5b) before sourcing; this sets MODEL_ARGS
# (the trainer's architecture flags) and the size's parallel layout defaults (TP, PP, SEQ_PARALLEL,
# MICRO_BATCH_SIZE), each overridable from the environment.
#
#   0.6b  24 x 1536, GQA 12/4,  SwiGLU 4096   one 8-GPU node: pure data parallel
#   1b    22 x 2048, GQA 16/8,  SwiGLU 5632   TP=1 fits an 80 GB GPU at micro-batch 4
#   2.5b  36 x 2560, GQA 20/4,  SwiGLU 6912   TP=2 with sequence parallel inside a node
#   checkpoint  no flags: the architecture of the checkpoint the run loads (its run_config.yaml; an imported
#               model, examples/gpu/midtrain_qwen3.sh)
case "${MODEL_SIZE:?set MODEL_SIZE to 0.6b, 1b, 2.5b or checkpoint}" in
  0.6b) NUM_LAYERS=24 HIDDEN=1536 FFN=4096 HEADS=12 KV_GROUPS=4
        TP="${TP:-1}" SEQ_PARALLEL="${SEQ_PARALLEL:-}" MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}" ;;
  1b)   NUM_LAYERS=22 HIDDEN=2048 FFN=5632 HEADS=16 KV_GROUPS=8
        TP="${TP:-1}" SEQ_PARALLEL="${SEQ_PARALLEL:-}" MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}" ;;
  2.5b) NUM_LAYERS=36 HIDDEN=2560 FFN=6912 HEADS=20 KV_GROUPS=4
        TP="${TP:-2}" SEQ_PARALLEL="${SEQ_PARALLEL-1}" MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-2}" ;;
  checkpoint) TP="${TP:-1}" SEQ_PARALLEL="${SEQ_PARALLEL:-}" MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}" ;;
  *) echo "unknown MODEL_SIZE ${MODEL_SIZE} (sizes: 0.6b, 1b, 2.5b, checkpoint)" >&2; exit 2 ;;
esac
PP="${PP:-1}"
export NUM_LAYERS HIDDEN FFN HEADS KV_GROUPS
# shellcheck disable=SC2034  # used by the recipes that source this file
if [[ "${MODEL_SIZE}" == checkpoint ]]; then
  MODEL_ARGS=()
else
MODEL_ARGS=(
  --num-layers "${NUM_LAYERS}" --hidden-size "${HIDDEN}" --ffn-hidden-size "${FFN}"
  --num-attention-heads "${HEADS}" --group-query-attention --num-query-groups "${KV_GROUPS}"
  --position-embedding-type rope --rotary-base 1000000 --swiglu --normalization RMSNorm --norm-epsilon 1e-6
  --disable-bias-linear --untie-embeddings-and-output-weights --init-method-std 0.02
)
fi
