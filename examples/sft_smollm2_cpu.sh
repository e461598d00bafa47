#!/usr/bin/env bash
# Anchored SFT of the mid-trained SmolLM2 (after examples/midtrain_smollm2_cpu.sh, same WORKDIR), the standard-SFT
# baseline from the same checkpoint, anchored sampling, and a quickstart-style diversity table from
# tools/evaluate_diversity.py (the project's one evaluation harness).
#
# The SFT data is deliberately narrow, as instruction data is: one request ("Write a passage of Python's
# documentation.") answered with chunks of five documentation topics (assert, for, if, while, try) only. Standard SFT should collapse onto
# them; anchored SFT (loss on the response only, annotations masked, annotated documents replayed) should keep
# the mid-trained model's spread over the documentation.
#
# Usage: bash examples/sft_smollm2_cpu.sh [WORKDIR]      (default WORKDIR: runs/midtrain_smollm2)
# Environment: SFT_ITERS (40), SEQ (256), MBS (2), LR (5e-5), REPLAY (0.3), N (samples per prompt, 8),
#   MAX_NEW (response tokens, 64), PRECISION (--bf16; empty for fp32), SIMILARITY (a fixed cosine threshold for
#   the distinct-class judge; default: calibrated on pairs of passages of one / two documentation topics)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/midtrain_smollm2}"
SFT_ITERS="${SFT_ITERS:-40}"; SEQ="${SEQ:-256}"; MBS="${MBS:-2}"; LR="${LR:-5e-5}"; REPLAY="${REPLAY:-0.3}"
N="${N:-8}"; MAX_NEW="${MAX_NEW:-64}"; PRECISION="${PRECISION---bf16}"
PORT="${MASTER_PORT:-29533}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[[ -f "$WORK/midtrained/latest_checkpointed_iteration.txt" ]] || \
  { echo "no mid-trained checkpoint in $WORK: run examples/midtrain_smollm2_cpu.sh first" >&2; exit 2; }
TOK=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/imported/tokenizer")

echo "== 1. narrow SFT data (five documentation topics), held-out prompts, calibration pairs for the judge"
python - "$WORK" <<'PY'
import json, sys
from megatron_anchor.data.real_text import pydoc_passages, write_pydoc_calibration_pairs
work = sys.argv[1]
with open(f"{work}/sft.jsonl", "w") as f:
    for _, chunk in pydoc_passages({"assert", "for", "if", "while", "try"}):
        f.write(json.dumps({"prompt": "Write a passage of Python's documentation.", "response": chunk}) + "\n")
with open(f"{work}/eval_prompts.jsonl", "w") as f:
    for p in ("Write a passage of Python's documentation.", "Write a short passage of Python's documentation.",
              "Write a paragraph from Python's reference manual.", "Write a passage of documentation."):
        f.write(json.dumps({"prompt": p}) + "\n")
# One distinct class = one documentation topic: pairs of passages of one topic and of two topics.
write_pydoc_calibration_pairs(f"{work}/calibration_pairs.jsonl")
PY
for kind in anchored standard; do
  extra=(); [[ $kind == standard ]] && extra=(--no-annotations)
  python tools/preprocess_sft.py --input "$WORK/sft.jsonl" --output-prefix "$WORK/sft_$kind" "${TOK[@]}" \
    --chat-template chatml --seq-length "$SEQ" --overlong drop --overwrite --no-progress "${extra[@]}"
done

echo "== 2. anchored SFT and the standard baseline from the mid-trained checkpoint (no model flags)"
COMMON=(--finetune --load "$WORK/midtrained" --seq-length "$SEQ" --micro-batch-size "$MBS" --train-iters "$SFT_ITERS"
        --lr "$LR" --min-lr 0 --lr-warmup-iters 4 --lr-decay-style cosine --hidden-dropout 0 --attention-dropout 0
        --split 100,0,0 --log-interval 10 --eval-iters 0 --save-interval "$SFT_ITERS" --replay-share "$REPLAY"
        $PRECISION)
torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py "${COMMON[@]}" \
  --data-path "$WORK/sft_anchored_text_document" --loss-mask-policy sft-anchored \
  --replay-data-path "$WORK/ann_text_document" --save "$WORK/sft_anchored"
torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py "${COMMON[@]}" \
  --data-path "$WORK/sft_standard_text_document" --loss-mask-policy sft-standard \
  --replay-data-path "$WORK/plain_text_document" --save "$WORK/sft_standard"

if [[ ! -f "$WORK/sft_anchored/latest_checkpointed_iteration.txt" ]]; then
  echo "no SFT checkpoints (a --dry-run launch?): nothing to sample or evaluate"; exit 0
fi

echo "== 3. anchored sampling from the anchored model"
python tools/generate.py --load "$WORK/sft_anchored" --prompts "$WORK/eval_prompts.jsonl" --mode anchored --n 2 \
  --max-new-tokens "$MAX_NEW" --chat-template chatml --output "$WORK/anchored_samples.jsonl" --seed 0

echo "== 4. the quickstart's table: mid-trained base, standard SFT, anchored SFT"
# The distinct-class threshold is calibrated on the pairs above (as the quickstart calibrates on its corpus).
JUDGE=(--calibration-pairs "$WORK/calibration_pairs.jsonl")
[[ -n "${SIMILARITY:-}" ]] && JUDGE=(--similarity-threshold "$SIMILARITY")
python tools/evaluate_diversity.py --prompts "$WORK/eval_prompts.jsonl" --chat-template chatml \
  --model base="$WORK/midtrained" --model standard-SFT="$WORK/sft_standard" --model anchored-SFT="$WORK/sft_anchored" \
  --mode base=anchored --mode standard-SFT=plain --mode anchored-SFT=anchored --n "$N" --max-new-tokens "$MAX_NEW" \
  "${JUDGE[@]}" --output-prefix "$WORK/sft_report"
