#!/usr/bin/env bash
# A second Python environment with another megatron-core release, to run the tests against it.
#
# Usage: tools/setup_megatron_core_env.sh [--print-env] [--force]
#
# GPU images (NGC PyTorch, Python 3.12) install megatron-core 0.17-0.19, while Python 3.11 machines get 0.16.1;
# the role channel and the trainer lean on megatron-core internals that moved between the two, so the dataset,
# trainer and generation tests run against both (tests/project/test_megatron_core_versions.py). This makes, once,
#   $CACHE/megatron-core-$MCORE_VERSION-py$PYVER/   a virtual environment with the CPU torch and that release
# where CACHE is $MEGATRON_ANCHOR_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/megatron-anchor. The project itself is
# not installed there: the tests put the checkout on PYTHONPATH.
#
# Every release from 0.17 declares Requires-Python >= 3.12, but its cp311 wheel works on 3.11: it is installed with
# --ignore-requires-python --no-deps, with the runtime needs it has beyond torch (numpy, packaging, psutil, and
# triton, which 0.19 imports through its pipeline schedules; triton needs no GPU to import).
# The last line printed is machine-readable: MCORE_PYTHON=/path/to/venv/bin/python
set -euo pipefail

MCORE_VERSION="${MCORE_VERSION:-0.19.2}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRITON_VERSION="${TRITON_VERSION:-3.9.0}"
PYTHON="${PYTHON:-python3}"
PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
CACHE="${MEGATRON_ANCHOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-anchor}"
VENV="$CACHE/megatron-core-$MCORE_VERSION-py$PYVER"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

force=0
for arg in "$@"; do
  case "$arg" in
    --print-env)
      if [[ -f "$VENV/.complete" ]]; then echo "MCORE_PYTHON=$VENV/bin/python"; exit 0; fi
      echo "setup_megatron_core_env: not installed at $VENV (run tools/setup_megatron_core_env.sh)" >&2
      exit 1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "setup_megatron_core_env: unknown argument $arg" >&2; exit 2 ;;
  esac
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.setup-mcore.lock"   # two test sessions may install at once
if command -v flock >/dev/null; then flock 9; fi
if [[ $force == 1 ]]; then rm -rf "$VENV"; fi

# What the tests import beyond megatron-core (setup.py's install_requires without megatron-core, plus pytest).
DEPS=("torch==$TORCH_VERSION" numpy packaging psutil "triton==$TRITON_VERSION" sentencepiece tokenizers orjson msgspec
      pyyaml tqdm aiohttp pytest pytest-timeout)
STAMP="${DEPS[*]} megatron-core==$MCORE_VERSION"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [[ ! -f "$VENV/.complete" ]]; then
  echo "setup_megatron_core_env: installing megatron-core $MCORE_VERSION into $VENV (torch CPU, triton; a few minutes)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "${pip[@]}" -c "$REPO/constraints-cpu.txt" "${DEPS[@]}"
  "${pip[@]}" --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION"
  "$VENV/bin/python" -c "import megatron.core, sys; sys.exit(megatron.core.__version__ != '$MCORE_VERSION')"
  echo "$STAMP" > "$VENV/.complete"
elif [[ "$(cat "$VENV/.complete")" != "$STAMP" ]]; then  # built with an older package list: add what is new
  echo "setup_megatron_core_env: updating the packages of $VENV" >&2
  "${pip[@]}" -c "$REPO/constraints-cpu.txt" "${DEPS[@]}"
  echo "$STAMP" > "$VENV/.complete"
fi
echo "MCORE_PYTHON=$VENV/bin/python"
