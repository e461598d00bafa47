#!/usr/bin/env bash
# Anchored SFT on one CPU machine, no server, no GPU, a few minutes:
#   synthetic corpus -> annotate -> tokenizer -> pretrain a tiny GPT -> SFT data (anchored and standard)
#   -> anchored SFT and the standard-SFT baseline, both fine-tuned from the pretraining checkpoint (torchrun).
#
# Usage: bash examples/sft_tiny_cpu.sh [WORKDIR]        (default WORKDIR: runs/sft_tiny)
# Environment: DOCS (pretraining documents, default 2000), PRE_ITERS (default 60), SFT_ITERS (default 40),
#   SFT_REPLAY (share of replayed pretraining documents in both SFT runs, default 0.3; 0 turns replay off).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/sft_tiny}"
DOCS="${DOCS:-2000}"
PRE_ITERS="${PRE_ITERS:-60}"
SFT_ITERS="${SFT_ITERS:-40}"
SFT_REPLAY="${SFT_REPLAY:-0.3}"
SEQ=128
PORT="${MASTER_PORT:-29521}"
mkdir -p "$WORK"
TOK=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model")
MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length "$SEQ" --micro-batch-size 4
       --global-batch-size 8 --log-interval 10 --eval-iters 2)

echo "== 1. pretraining data: synthetic corpus, embedded annotator, tokenizer, tokens + roles"
python tools/make_synthetic_corpus.py --output "$WORK/raw.jsonl" --documents "$DOCS"
python tools/annotate.py --input "$WORK/raw.jsonl" --output "$WORK/annotated.jsonl" --overwrite --no-progress
python tools/train_tokenizer.py --input "$WORK/raw.jsonl" --output-prefix "$WORK/tokenizer" --vocab-size 2000
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/pretrain" "${TOK[@]}" \
  --append-eod --workers 2 --overwrite --no-progress
# The same documents without annotations: the standard-SFT baseline's replay data.
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/pretrain_plain" "${TOK[@]}" \
  --append-eod --workers 2 --overwrite --no-progress --no-annotations

echo "== 2. pretrain a tiny GPT with annotations (loss on every token)"
torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py "${MODEL[@]}" "${TOK[@]}" \
  --data-path "$WORK/pretrain_text_document" --split 98,2,0 --train-iters "$PRE_ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 5 --loss-mask-policy pretrain \
  --save "$WORK/ck_pretrain" --save-interval "$PRE_ITERS"

echo "== 3. SFT data: {prompt, response} and {messages} samples; anchored and standard from the same input"
python - "$WORK/sft.jsonl" <<'PY'
import json, random, sys
from megatron_anchor.data.synthetic import generate_document
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for i in range(600):
        first = generate_document(rng).split("\n\n")[0]
        if i % 4:
            f.write(json.dumps({"prompt": "Write a short paragraph.", "response": first}) + "\n")
        else:
            second = generate_document(rng).split("\n\n")[0]
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You write short paragraphs."},
                {"role": "user", "content": "Write a short paragraph."},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "Another one."},
                {"role": "assistant", "content": second}]}) + "\n")
PY
python tools/preprocess_sft.py --input "$WORK/sft.jsonl" --output-prefix "$WORK/sft_anchored" "${TOK[@]}" \
  --chat-template plain --seq-length "$SEQ" --overlong drop --pack --overwrite --no-progress
python tools/preprocess_sft.py --input "$WORK/sft.jsonl" --output-prefix "$WORK/sft_standard" "${TOK[@]}" \
  --chat-template plain --seq-length "$SEQ" --overlong drop --pack --overwrite --no-progress --no-annotations
python tools/inspect_dataset.py --input "$WORK/sft_anchored_text_document" --document 0 --max-runs 12 "${TOK[@]}"

# Replay: a share of pretraining documents in each SFT run, scored under the pretraining objective (annotations
# included), keeps responses bound to their sampled annotation through long SFT (docs/sft.md, "Replay").
ANC_REPLAY=() STD_REPLAY=()
if [[ "$SFT_REPLAY" != "0" ]]; then
  ANC_REPLAY=(--replay-data-path "$WORK/pretrain_text_document" --replay-share "$SFT_REPLAY")
  STD_REPLAY=(--replay-data-path "$WORK/pretrain_plain_text_document" --replay-share "$SFT_REPLAY")
fi

echo "== 4. anchored SFT from the pretraining checkpoint (loss on response + EOD only; packed samples masked;"
echo "      replay share $SFT_REPLAY under the pretraining objective)"
SFT=(--split 95,5,0 --train-iters "$SFT_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 2
     --reset-attention-mask --reset-position-ids --finetune --load "$WORK/ck_pretrain")
torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py "${MODEL[@]}" "${TOK[@]}" "${SFT[@]}" \
  --data-path "$WORK/sft_anchored_text_document" --loss-mask-policy sft-anchored --save "$WORK/ck_sft_anchored" \
  "${ANC_REPLAY[@]}"

echo "== 5. the standard-SFT baseline, same checkpoint and settings (the same replay share, unannotated)"
torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py "${MODEL[@]}" "${TOK[@]}" "${SFT[@]}" \
  --data-path "$WORK/sft_standard_text_document" --loss-mask-policy sft-standard --save "$WORK/ck_sft_standard" \
  "${STD_REPLAY[@]}"

echo "== done: data and checkpoints under $WORK"
