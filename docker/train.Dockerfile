# The training image: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex) with megatron-core and megatron-anchor.
#
# Build (from the repository root):
#   docker build -f docker/train.Dockerfile -t megatron-anchor-train .
# Run a multi-GPU job on one node:
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data \
#     megatron-anchor-train torchrun --nproc-per-node 8 pretrain_anchor.py ...
# The pairing: megatron-core 0.19 on the NGC PyTorch release its own CI image is built from (Megatron-LM's
# docker/Dockerfile.ci.dev at core_v0.19.0: nvcr.io/nvidia/pytorch:26.06-py3). Older NGC releases carry Transformer
# Engine builds older than the 2.9 that megatron-core 0.16's extras already ask for (25.09 has 2.7); the build refuses
# a Transformer Engine below MIN_TE_VERSION rather than train on a pairing megatron-core was not tested with.
ARG NGC_PYTORCH_TAG=26.06-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}
ARG MEGATRON_CORE_VERSION=0.19.2
ARG MIN_TE_VERSION=2.9

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
    && echo "megatron-core==${MEGATRON_CORE_VERSION}" >> /tmp/image-constraints.txt \
    && pip install --no-cache-dir -c /tmp/image-constraints.txt -e ".[gpu,logging]" \
    && python -c "import megatron.core, megatron_anchor; print('megatron-core', megatron.core.__version__)" \
    && python -c "from megatron_anchor.training.model import require_transformer_engine as r; print('Transformer Engine', r('${MIN_TE_VERSION}'))"

CMD ["python", "pretrain_anchor.py", "--help"]
