#!/usr/bin/env bash
# GPU recipe: start from a real base model. Qwen3-0.6B-Base (or 1.7B-Base) from a local Hugging Face folder ->
# checkpoint with the annotation delimiters -> annotated mid-training (continued pretraining, loss on every token,
# annotations included, with the same documents replayed without annotations) -> anchored SFT and the
# standard-SFT baseline (examples/gpu/sft_anchored.sh) from the mid-trained checkpoint. Every stage reads the
# architecture from the imported checkpoint's run_config.yaml (MODEL_SIZE=checkpoint): no model flags.
#
#   HF_MODEL=/models/Qwen3-0.6B-Base ANNOTATED_JSONL=annotated.jsonl SFT_JSONL=sft.jsonl \
#     bash examples/gpu/midtrain_qwen3.sh WORKDIR
#
# Token budget: MIDTRAIN_FRACTION (0.1) of a Chinchilla budget of 20 tokens per parameter, the paper's rule
# (0.6B: 12B tokens for pretraining from scratch -> 1.2B here; 1.7B: 34B -> 3.4B). Set TOKENS to override.
# Environment:
#   HF_MODEL (required), PARAMS (parameters, default 0.6e9; 1.7e9 for Qwen3-1.7B-Base)
#   ANNOTATED_JSONL (required): the corpus annotated by tools/annotate.py (the vLLM annotator on a cluster)
#   SFT_JSONL: SFT data for the SFT stage (skipped when unset); CHAT_TEMPLATE (chatml), ANNOTATOR_URLS as there
#   SFT_FROM: the checkpoint both SFT runs start from (default WORKDIR/midtrained; WORKDIR/imported is the
#     no-mid-training ablation)
#   PLAIN_SHARE (0.25): share of the blend that is the same documents without annotations (keeps the base's text
#     ability while the annotations are learned; docs/import.md)
#   NPROC (8), GBS (256), SEQ_LENGTH (4096), LR (3e-5, cosine to LR/10 after 2% warm-up), WORKERS (16),
#   TP, PP, MICRO_BATCH_SIZE (model_sizes.sh's checkpoint defaults)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="$1"
: "${HF_MODEL:?set HF_MODEL to a local Qwen3 Base folder}" "${ANNOTATED_JSONL:?set ANNOTATED_JSONL}"
PARAMS="${PARAMS:-0.6e9}"; MIDTRAIN_FRACTION="${MIDTRAIN_FRACTION:-0.1}"
NPROC="${NPROC:-8}"; GBS="${GBS:-256}"; SEQ_LENGTH="${SEQ_LENGTH:-4096}"; LR="${LR:-3e-5}"
WORKERS="${WORKERS:-16}"; PLAIN_SHARE="${PLAIN_SHARE:-0.25}"
TOKENS="${TOKENS:-$(python -c "print(int(20 * $PARAMS * $MIDTRAIN_FRACTION))")}"
ITERS=$(( TOKENS / (GBS * SEQ_LENGTH) ))
ITERS=$(( ITERS > 10 ? ITERS : 10 ))
WARMUP=$(( ITERS / 50 > 1 ? ITERS / 50 : 1 ))
MODEL_SIZE=checkpoint
source examples/gpu/model_sizes.sh
mkdir -p "$WORK"

echo "== 1. import $HF_MODEL with the annotation delimiters ($TOKENS tokens of mid-training: $ITERS steps)"
[[ -f "$WORK/imported/latest_checkpointed_iteration.txt" ]] || \
  python tools/import_hf.py --input "$HF_MODEL" --output "$WORK/imported" --add-annotation-tokens \
    --seq-length "$SEQ_LENGTH" --overwrite
TOK=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/imported/tokenizer")

echo "== 2. the annotated corpus and the same documents without annotations, with the imported tokenizer"
python tools/preprocess_data.py --input "$ANNOTATED_JSONL" --output-prefix "$WORK/ann" "${TOK[@]}" \
  --append-eod --workers "$WORKERS" --overwrite --no-progress
python tools/preprocess_data.py --input "$ANNOTATED_JSONL" --output-prefix "$WORK/plain" "${TOK[@]}" \
  --append-eod --workers "$WORKERS" --overwrite --no-progress --no-annotations

echo "== 3. annotated mid-training from the import"
# Preemption: a saved checkpoint and status 0 (examples/gpu/preemption.sh); a rerun resumes the mid-training.
# shellcheck source=preemption.sh
source examples/gpu/preemption.sh
START=(--finetune --load "$WORK/imported")
if [[ -f "$WORK/midtrained/latest_checkpointed_iteration.txt" ]]; then START=(--load "$WORK/midtrained"); fi
ANN_SHARE=$(python -c "print(1 - $PLAIN_SHARE)")
run_training "$WORK/midtrained" torchrun --nproc-per-node "$NPROC" pretrain_anchor.py "${MODEL_ARGS[@]}" "${START[@]}" \
  --data-path "$ANN_SHARE" "$WORK/ann_text_document" "$PLAIN_SHARE" "$WORK/plain_text_document" \
  --loss-mask-policy pretrain --seq-length "$SEQ_LENGTH" --transformer-impl transformer_engine --bf16 \
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" ${SEQ_PARALLEL:+--sequence-parallel} \
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GBS" --train-iters "$ITERS" \
  --lr "$LR" --min-lr "$(python -c "print($LR / 10)")" --lr-decay-style cosine --lr-warmup-iters "$WARMUP" \
  --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 --split 99,1,0 \
  --eval-interval 200 --eval-iters 10 --log-interval 10 --exit-signal "$EXIT_SIGNAL" \
  --save "$WORK/midtrained" --save-interval 500 --tensorboard-dir "$WORK/tb_midtrain"

if [[ -n "${SFT_JSONL:-}" ]]; then
  SFT_FROM="${SFT_FROM:-$WORK/midtrained}"
  echo "== 4. anchored SFT and the standard baseline from $SFT_FROM (same architecture record)"
  MODEL_SIZE=checkpoint TOKENIZER_TYPE=HuggingFaceTokenizer TOKENIZER_MODEL="$WORK/imported/tokenizer" \
    REPLAY_DATA="$WORK/ann_text_document" REPLAY_DATA_PLAIN="$WORK/plain_text_document" \
    SEQ_LENGTH="$SEQ_LENGTH" NPROC="$NPROC" bash examples/gpu/sft_anchored.sh "$SFT_FROM" "$SFT_JSONL" "$WORK/sft"
fi
