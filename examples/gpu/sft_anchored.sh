#!/usr/bin/env bash
# GPU recipe: anchored SFT of a pretrained annotation-anchored model, plus the standard-SFT baseline.
#
#   MODEL_SIZE=1b bash examples/gpu/sft_anchored.sh PRETRAINED_CKPT SFT_JSONL WORKDIR
#
# 1. annotates every SFT response with the LLM annotator (the same client and cache as pretraining annotation;
#    resumable: rerun after a failure) and writes anchored SFT data, whole samples packed into sequences;
# 2. writes the standard-SFT baseline from the same input; 3. fine-tunes from the pretraining checkpoint with
#    --loss-mask-policy sft-anchored (loss on response + EOD only; --reset-attention-mask keeps every packed sample
#    to itself: THD variable-length attention on Transformer Engine) with a share of annotated pretraining
#    documents replayed under the pretraining objective, then the baseline with sft-standard and the same share
#    of the documents without annotations.
# The architecture is examples/gpu/model_sizes.sh's MODEL_SIZE, the one the pretraining recipe of that size
# trained; the trainer refuses a checkpoint whose run_config.yaml says otherwise.
#
# Environment:
#   MODEL_SIZE (1b)  0.6b | 1b | 2.5b, as pretrained
#   ANNOTATOR_URLS  comma-separated vLLM replica URLs (empty: the embedded default annotator)
#   ANNOTATION_CACHE  SQLite cache shared with pretraining annotation (default: WORKDIR/annotations.sqlite)
#   TOKENIZER_TYPE / TOKENIZER_MODEL  the pretraining tokenizer (required)
#   CHAT_TEMPLATE (chatml), SEQ_LENGTH (2048), NPROC (8), GBS (128), ITERS (1000), WORKERS (16),
#   LR (1e-5: keep the total SFT update modest so responses keep following the sampled annotation);
#   TP, PP, MICRO_BATCH_SIZE default to the size's layout
#   Replay (docs/sft.md, "Replay"): REPLAY_SHARE (0.3; 0 turns replay off), REPLAY_DATA (the annotated
#   pretraining dataset prefix, e.g. data/corpus_text_document), REPLAY_DATA_PLAIN (the same documents without
#   annotations, for the baseline: tools/preprocess_data.py ... --no-annotations), REPLAY_POLICY (pretrain)
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT="$1"; SFT_JSONL="$2"; WORK="$3"
: "${TOKENIZER_TYPE:?set TOKENIZER_TYPE}" "${TOKENIZER_MODEL:?set TOKENIZER_MODEL}"
MODEL_SIZE="${MODEL_SIZE:-1b}"
source examples/gpu/model_sizes.sh
CHAT_TEMPLATE="${CHAT_TEMPLATE:-chatml}"; SEQ_LENGTH="${SEQ_LENGTH:-2048}"; WORKERS="${WORKERS:-16}"
NPROC="${NPROC:-8}"; GBS="${GBS:-128}"; ITERS="${ITERS:-1000}"; LR="${LR:-1e-5}"
mkdir -p "$WORK"
TOK=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
REPLAY_SHARE="${REPLAY_SHARE:-0.3}"; REPLAY_POLICY="${REPLAY_POLICY:-pretrain}"
ANC_REPLAY=() STD_REPLAY=()
if [[ "$REPLAY_SHARE" != "0" ]]; then
  : "${REPLAY_DATA:?set REPLAY_DATA (annotated pretraining prefix) and REPLAY_DATA_PLAIN, or REPLAY_SHARE=0}"
  : "${REPLAY_DATA_PLAIN:?set REPLAY_DATA_PLAIN (the pretraining documents preprocessed with --no-annotations)}"
  ANC_REPLAY=(--replay-data-path "$REPLAY_DATA" --replay-share "$REPLAY_SHARE" --replay-loss-mask-policy "$REPLAY_POLICY")
  STD_REPLAY=(--replay-data-path "$REPLAY_DATA_PLAIN" --replay-share "$REPLAY_SHARE")
fi

ANN=(--annotator default)
if [[ -n "${ANNOTATOR_URLS:-}" ]]; then
  ANN=(--annotator vllm --url "$ANNOTATOR_URLS" --concurrency 128
       --annotation-cache "${ANNOTATION_CACHE:-$WORK/annotations.sqlite}")
fi

SFT_DATA=(--chat-template "$CHAT_TEMPLATE" --seq-length "$SEQ_LENGTH" --overlong drop --pack --workers "$WORKERS"
          --no-progress)
python tools/preprocess_sft.py --input "$SFT_JSONL" --output-prefix "$WORK/sft_anchored" "${TOK[@]}" "${ANN[@]}" \
  "${SFT_DATA[@]}"
python tools/preprocess_sft.py --input "$SFT_JSONL" --output-prefix "$WORK/sft_standard" "${TOK[@]}" \
  "${SFT_DATA[@]}" --no-annotations

# Preemption (see pretrain_common.sh): this shell runs two trainings in turn, so it cannot exec torchrun; it ignores
# the exit signal instead (a shell killed by it would take the job step down mid-save), torchrun >= 2.9 forwards it
# (PET_SIGNALS_TO_HANDLE, the environment form of its --signals-to-handle),
# and the workers handle it (their own handler replaces the inherited "ignore").
EXIT_SIGNAL="${EXIT_SIGNAL:-SIGUSR1}"
trap '' "${EXIT_SIGNAL#SIG}"
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,${EXIT_SIGNAL}}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
TRAIN=("${MODEL_ARGS[@]}" --seq-length "$SEQ_LENGTH" --transformer-impl transformer_engine --bf16
       --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
       --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" ${SEQ_PARALLEL:+--sequence-parallel}
       --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GBS" --train-iters "$ITERS"
       --lr "$LR" --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.0 --clip-grad 1.0
       --hidden-dropout 0 --attention-dropout 0 --split 98,2,0 --eval-interval 200 --eval-iters 10
       --reset-attention-mask --finetune --load "$CKPT" --log-interval 10 --exit-signal "$EXIT_SIGNAL")

torchrun --nproc-per-node "$NPROC" pretrain_anchor.py "${TRAIN[@]}" "${TOK[@]}" \
  --data-path "$WORK/sft_anchored_text_document" --loss-mask-policy sft-anchored "${ANC_REPLAY[@]}" \
  --save "$WORK/ck_sft_anchored" --save-interval 500 --tensorboard-dir "$WORK/tb_sft_anchored"

torchrun --nproc-per-node "$NPROC" pretrain_anchor.py "${TRAIN[@]}" "${TOK[@]}" \
  --data-path "$WORK/sft_standard_text_document" --loss-mask-policy sft-standard "${STD_REPLAY[@]}" \
  --save "$WORK/ck_sft_standard" --save-interval 500 --tensorboard-dir "$WORK/tb_sft_standard"
