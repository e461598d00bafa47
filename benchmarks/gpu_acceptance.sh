#!/usr/bin/env bash
# One-shot GPU acceptance on one H100/H200: install what is missing into this machine's Python, run the
# gpu-marked tests, train the 1B recipe's architecture (bf16, Transformer Engine, distributed optimizer, packed
# SFT batches) for a fixed number of steps, compare the trainer's loop with the stock megatron-core loop, and
# write tokens/s, TFLOP/s, MFU, peak memory and the loop ratio to a JSON file. About 6-8 minutes on a machine that
# has torch with CUDA and Transformer Engine (NGC PyTorch images); budget 9.
#
#   bash benchmarks/gpu_acceptance.sh [OUT.json]          (default: gpu_acceptance.json in the repository)
#   bash benchmarks/gpu_acceptance.sh --smoke [OUT.json]  (CPU: the same phases on a tiny model, no installs)
#
# Environment: PYTHON (python3), WHEELHOUSE (a folder of wheels for a machine without network: pip installs from
# it, e.g. filled elsewhere with `pip download -d wheels megatron-core pyyaml ...`), TE_INSTALL_TIMEOUT (300 s:
# Transformer Engine's PyTorch extension is a source build on PyPI; without it the run uses the local layers and
# says so in the report), STEPS (30), MICRO_BATCH_SIZE (the 1b recipe's, 4), SEQ_LENGTH (4096).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT="${1:-$REPO/gpu_acceptance.json}"
T0=$(date +%s)
log() { echo "[gpu_acceptance $(( $(date +%s) - T0 ))s] $*"; }

if [ "$SMOKE" = 1 ]; then
  log "smoke run on CPU (no installs, no tests)"
  exec "$PY" benchmarks/gpu_acceptance.py --smoke --out "$OUT"
fi

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  echo "gpu_acceptance: this Python's torch sees no CUDA GPU (install a CUDA build of torch, or use an NGC PyTorch image)" >&2
  exit 2
}

PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
if [ -n "${WHEELHOUSE:-}" ]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi
# Keep the machine's torch (and Transformer Engine, when present): pip must never swap in another build.
CONSTRAINTS="$(mktemp)"
"$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformer[-_]engine[-_a-z0-9]*|triton)==' > "$CONSTRAINTS" || true
log "installing the project and its Python dependencies (torch kept: $(grep -i '^torch==' "$CONSTRAINTS" || echo none))"
"${PIP[@]}" -c "$CONSTRAINTS" "megatron-core>=0.16.1,<0.20" numpy packaging psutil pyyaml orjson msgspec sentencepiece \
  tokenizers tqdm aiohttp pytest pytest-timeout
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps -e .

if ! "$PY" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
  log "Transformer Engine missing: trying pip (source build of its PyTorch extension, at most ${TE_INSTALL_TIMEOUT:-300} s)"
  timeout "${TE_INSTALL_TIMEOUT:-300}" "${PIP[@]}" --no-build-isolation "transformer_engine[pytorch]" \
    || log "Transformer Engine could not be installed here: the gpu tests that need it will fail and the run uses the local layers"
fi

MODEL_SIZE=1b
# shellcheck source=../examples/gpu/model_sizes.sh
source examples/gpu/model_sizes.sh
log "phases: gpu tests, ${STEPS:-30} steps of the 1b architecture, loop benchmark"
status=0
"$PY" benchmarks/gpu_acceptance.py --out "$OUT" --model-args "${MODEL_ARGS[*]}" \
  --steps "${STEPS:-30}" --micro-batch-size "$MICRO_BATCH_SIZE" --seq-length "${SEQ_LENGTH:-4096}" || status=$?
log "done (report: $OUT)"
exit $status
