# The training image: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex) with megatron-core and megatron-anchor.
#
# Build (from the repository root):
#   docker build -f docker/train.Dockerfile -t megatron-anchor-train .
# Run a multi-GPU job on one node:
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data \
#     megatron-anchor-train torchrun --nproc-per-node 8 pretrain_anchor.py ...
ARG NGC_PYTORCH_TAG=25.09-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}

LABEL org.opencontainers.image.title="megatron-anchor training" \
      org.opencontainers.image.description="Annotation-anchored pretraining and fine-tuning on megatron-core" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline

WORKDIR /opt/megatron-anchor
COPY . .

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Install exactly as the README does for GPU images: the image's own torch and Transformer Engine are pinned
# through a constraints file (the same mechanism as constraints-cpu.txt on CPU machines), so pip never swaps
# them for registry builds; megatron-core comes from PyPI (0.17-0.19 on the image's Python 3.12).
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine)==' > /tmp/image-constraints.txt \
    && pip install --no-cache-dir -c /tmp/image-constraints.txt -e ".[gpu,logging]" \
    && python -c "import megatron.core, megatron_anchor; print('megatron-core', megatron.core.__version__)"

CMD ["python", "pretrain_anchor.py", "--help"]
