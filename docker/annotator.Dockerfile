# The annotator server: vLLM's official OpenAI-compatible image serving the paper's annotator model.
#
# Build (from the repository root):
#   docker build -f docker/annotator.Dockerfile -t megatron-anchor-annotator .
# Run one replica on all GPUs of a node (weights are cached in the mounted volume between runs):
#   docker run --gpus all --ipc=host -p 8000:8000 -v "$HOME/.cache/huggingface:/root/.cache/huggingface" \
#     -e TENSOR_PARALLEL_SIZE=2 megatron-anchor-annotator
# Check it:  python tools/annotator_server.py --check http://NODE:8000
# Extra vLLM flags go after the image name, e.g. `... megatron-anchor-annotator --enable-expert-parallel`.
ARG VLLM_IMAGE_TAG=v0.11.0
FROM vllm/vllm-openai:${VLLM_IMAGE_TAG}

LABEL org.opencontainers.image.title="megatron-anchor annotator" \
      org.opencontainers.image.description="vLLM OpenAI-compatible server for annotation-anchored training" \
      org.opencontainers.image.licenses="Apache-2.0"

# Defaults for one replica; override any with -e. The served name is part of the client's cache key, so it
# names the model, not the role.
ENV ANNOTATOR_MODEL=Qwen/Qwen3-30B-A3B-Instruct-2507 \
    ANNOTATOR_SERVED_NAME=Qwen3-30B-A3B-Instruct-2507 \
    TENSOR_PARALLEL_SIZE=1 \
    MAX_MODEL_LEN=8192 \
    GPU_MEMORY_UTILIZATION=0.90 \
    MAX_NUM_SEQS=256 \
    PORT=8000 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# Only the launcher and the standard-library modules it imports (tests/annotation/test_annotator_tools.py runs it
# from exactly these files): it builds the vLLM command, waits for readiness and forwards SIGTERM from
# `docker stop` to the whole server process group.
COPY megatron_anchor/__init__.py megatron_anchor/apikey.py megatron_anchor/bounds.py megatron_anchor/cache_dir.py \
     /opt/megatron-anchor/megatron_anchor/
COPY megatron_anchor/annotation/__init__.py megatron_anchor/annotation/server.py \
     /opt/megatron-anchor/megatron_anchor/annotation/
COPY megatron_anchor/cli/__init__.py megatron_anchor/cli/annotator_server.py /opt/megatron-anchor/megatron_anchor/cli/
ENV PYTHONPATH=/opt/megatron-anchor

EXPOSE 8000

# Loading a 30B mixture of experts and capturing CUDA graphs takes minutes: a long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
  CMD ["/bin/sh", "-c", "python3 -m megatron_anchor.cli.annotator_server --check http://127.0.0.1:${PORT}"]

ENTRYPOINT ["/bin/sh", "-c", "exec python3 -m megatron_anchor.cli.annotator_server --backend gpu --host 0.0.0.0 --port \"$PORT\" --model \"$ANNOTATOR_MODEL\" --served-model-name \"$ANNOTATOR_SERVED_NAME\" --tensor-parallel-size \"$TENSOR_PARALLEL_SIZE\" --max-model-len \"$MAX_MODEL_LEN\" --gpu-memory-utilization \"$GPU_MEMORY_UTILIZATION\" --max-num-seqs \"$MAX_NUM_SEQS\" -- \"$@\"", "annotator"]
CMD []
