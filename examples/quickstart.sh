#!/usr/bin/env bash
# The whole pipeline on one CPU machine, no server, no GPU, a few minutes:
#   synthetic corpus -> embedded annotator -> tokenizer -> tokens + role channel -> tiny GPT pretraining (TP=2).
#
# Usage: bash examples/quickstart.sh [WORKDIR]        (default WORKDIR: runs/quickstart)
# Environment: DOCS (corpus size, default 2000), ITERS (training iterations, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/quickstart}"
DOCS="${DOCS:-2000}"
ITERS="${ITERS:-60}"
mkdir -p "$WORK"

echo "== 1. corpus: $DOCS raw documents"
python tools/make_synthetic_corpus.py --output "$WORK/raw.jsonl" --documents "$DOCS"

echo "== 2. annotate every chunk (embedded annotator; --annotator vllm --url ... for an LLM)"
python tools/annotate.py --input "$WORK/raw.jsonl" --output "$WORK/annotated.jsonl" --overwrite --no-progress

echo "== 3. tokenizer with the annotation delimiters as special tokens"
python tools/train_tokenizer.py --input "$WORK/raw.jsonl" --output-prefix "$WORK/tokenizer" --vocab-size 2000

echo "== 4. tokens + role channel (and the plain baseline without annotations)"
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/anchored" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model" \
  --append-eod --workers 2 --overwrite --no-progress
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/plain" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model" \
  --append-eod --workers 2 --overwrite --no-progress --no-annotations
python tools/inspect_dataset.py --input "$WORK/anchored_text_document" --document 0 --max-runs 12 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model"

echo "== 5. pretrain a tiny GPT on the anchored data: torchrun, 2 processes, tensor parallel 2"
torchrun --nproc-per-node 2 --master-port "${MASTER_PORT:-29517}" pretrain_anchor.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 \
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 \
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.01 --clip-grad 1.0 \
  --data-path "$WORK/anchored_text_document" --split 98,2,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model" \
  --loss-mask-policy pretrain --log-interval 10 --eval-interval 30 --eval-iters 2 \
  --save "$WORK/checkpoints" --save-interval "$ITERS"

echo "== done: data and checkpoint under $WORK"
