#!/usr/bin/env bash
# Wheels for benchmarks/gpu_acceptance.sh on a GPU machine without a package index (CPython 3.12, manylinux
# x86-64): run this where pip reaches an index; it fills .whl/ (git-ignored), which travels with the checkout and
# which the acceptance run installs from (only what that machine lacks, into a separate folder: its torch is kept).
#
#   bash benchmarks/gpu_wheelhouse.sh [--have FILE] [--dest DIR] [--python-version 3.12]
#
# It downloads setup.py's runtime requirements (megatron-core pinned to the release tested on Python 3.12) and what
# they need in turn, never torch, triton, the nvidia-* CUDA libraries or Transformer Engine. --have FILE (the
# target's `python3 -m pip list --format=freeze`, or one name per line) leaves out what the target already has:
# for an image with torch, numpy, aiohttp, sentencepiece, tokenizers, pyyaml, psutil and tqdm that is 3 wheels
# (megatron-core, msgspec, orjson; 2.6 MiB); without --have, the whole closure (about 33 MiB).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m megatron_anchor.wheelhouse download --max-mib 48 "$@"
