#!/usr/bin/env bash
# One-shot GPU acceptance on one H100/H200, at most 9 minutes including installs: install what this Python lacks
# (from a wheelhouse; the machine's torch is kept), probe the environment, run the gpu-marked tests, train the 1B
# recipe's architecture (bf16, distributed optimizer with overlapped reduce and gather, packed SFT batches) and
# compare the trainer's loop with megatron-core's stock loop. Writes one JSON report and each phase's log to DIR.
#
#   bash benchmarks/gpu_acceptance.sh [--out DIR]           (DIR default: $OUT when set, else runs/gpu_acceptance)
#   bash benchmarks/gpu_acceptance.sh --smoke [--out DIR]   (CPU: the same phases on a tiny model, no GPU tests)
#
# Without a package index, first run `bash benchmarks/gpu_wheelhouse.sh` on a machine that has one: it fills .whl/
# (git-ignored), which this script installs from. Environment: PYTHON (python3), WHEELHOUSE (a wheel folder other
# than .whl/), BUDGET_S (525: the whole run), STEPS (30), TE_INSTALL=1 (also try Transformer Engine from the
# package index: a source build that needs nvcc, cuDNN headers, pybind11 and ninja, and minutes; without it the run
# uses megatron-core's local layers and says so in the report). Any other flag goes to benchmarks/gpu_acceptance.py.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# The architecture comes from the recipes' one table, so this run measures the model they train.
MODEL_SIZE=1b
# shellcheck source=../examples/gpu/model_sizes.sh
source examples/gpu/model_sizes.sh
exec "$PY" benchmarks/gpu_acceptance.py --model-args "${MODEL_ARGS[*]}" --micro-batch-size "$MICRO_BATCH_SIZE" \
  --steps "${STEPS:-30}" "$@"
