#!/usr/bin/env bash
# Tiny annotation-anchored pretraining on CPU: 4 processes (TP=2 x PP=2) with gloo; a few minutes on 2 cores.
# Builds a synthetic annotated corpus, a SentencePiece tokenizer and the token + role dataset first.
#
#   bash examples/pretrain_tiny_cpu.sh [WORKDIR]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-${REPO}/runs/tiny_cpu}"
mkdir -p "${WORK}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 4 ranks on few cores: one thread each

if [ ! -f "${WORK}/data_text_document_roles.idx" ]; then
  python - "${WORK}" <<'PY'
import sys
from megatron_anchor.data.synthetic import write_raw_jsonl
work = sys.argv[1]
write_raw_jsonl(f"{work}/corpus.jsonl", 400, seed=7)
PY
  python "${REPO}/tools/train_tokenizer.py" --input "${WORK}/corpus.jsonl" --output-prefix "${WORK}/tok" \
    --vocab-size 512
  # Raw {"text": ...} lines are annotated by the embedded default annotator while preprocessing.
  python "${REPO}/tools/preprocess_data.py" --input "${WORK}/corpus.jsonl" --output-prefix "${WORK}/data" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "${WORK}/tok.model" --append-eod --workers 2
fi

torchrun --standalone --nproc-per-node 4 "${REPO}/pretrain_anchor.py" \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --group-query-attention --num-query-groups 2 \
  --position-embedding-type rope --swiglu --normalization RMSNorm \
  --untie-embeddings-and-output-weights --disable-bias-linear \
  --hidden-dropout 0 --attention-dropout 0 \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 16 \
  --train-iters 100 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
  --weight-decay 0.1 --clip-grad 1.0 \
  --data-path "${WORK}/data_text_document" --split 95,5,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "${WORK}/tok.model" \
  --loss-mask-policy pretrain \
  --save "${WORK}/checkpoints" --load "${WORK}/checkpoints" --save-interval 50 \
  --eval-interval 50 --eval-iters 4 --log-interval 10 \
  --tensorboard-dir "${WORK}/tensorboard" \
  "${@:2}"
