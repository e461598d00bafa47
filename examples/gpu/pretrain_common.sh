#!/usr/bin/env bash
# Shared launcher for the GPU pretraining recipes (sourced by pretrain_0.6b.sh / pretrain_1b.sh /
# pretrain_2.5b.sh after model_sizes.sh, which sets MODEL_ARGS and the parallel layout).
#
# Single node:  DATA_PATH=... TOKENIZER_MODEL=... bash examples/gpu/pretrain_1b.sh
# Multi-node (run on every node, same MASTER_ADDR; NODE_RANK 0..NNODES-1):
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=29500 DATA_PATH=... bash examples/gpu/pretrain_1b.sh
# Under Slurm, NNODES/NODE_RANK/MASTER_ADDR default from SLURM_NNODES/SLURM_NODEID/the first host.
#
# Environment: DATA_PATH (prefix or "W1 P1 W2 P2"), TOKENIZER_TYPE, TOKENIZER_MODEL, SAVE_DIR,
# GPUS_PER_NODE (default: all visible), POLICY (pretrain | sft-anchored | sft-standard), WANDB_PROJECT,
# VP_LAYERS (layers per virtual pipeline stage when PP > 1), EXIT_SIGNAL (SIGUSR1: the preemption signal the
# scheduler sends), EXTRA_ARGS (appended; later flags win).
# bf16 through Float16Module, every fused kernel (on by default where it exists), the distributed optimizer with
# overlapped gradient reduce and parameter gather; the log shows tokens/s, TFLOP/s per GPU, MFU and peak memory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${DATA_PATH:?set DATA_PATH to the PREFIX_text_document of a preprocessed dataset}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-HuggingFaceTokenizer}"
SAVE_DIR="${SAVE_DIR:-${REPO}/runs/${RUN_NAME}}"
POLICY="${POLICY:-pretrain}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

# Train iterations from the token budget: tokens / (global batch x sequence length).
TRAIN_ITERS=$(( TOKENS / (GLOBAL_BATCH_SIZE * SEQ_LENGTH) ))
WARMUP_ITERS=$(( TRAIN_ITERS / 100 ))

export CUDA_DEVICE_MAX_CONNECTIONS=1   # needed for TP communication overlap with sequence parallel
# Preemption (Slurm: #SBATCH --signal=USR1@300, without B:, signals every process of the step five minutes before the
# end): the workers finish the step, save and exit 0. torchrun >= 2.9 forwards the signals of its
# --signals-to-handle (PET_SIGNALS_TO_HANDLE: an exported TORCHELASTIC_SIGNALS_TO_HANDLE is overwritten by the
# launcher) and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before its SIGKILL; older torchruns die of SIGUSR1
# (the trainer warns at start-up: use EXIT_SIGNAL=SIGTERM with --signal=TERM@300 there). torchrun replaces this shell (exec below), so no
# shell is left to die of the signal and take the job step down mid-save (srun --kill-on-bad-exit).
EXIT_SIGNAL="${EXIT_SIGNAL:-SIGUSR1}"
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,${EXIT_SIGNAL}}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
# Multi-node: megatron-core also makes gloo groups, which pick the interface of the host name; in many containers
# that is the wrong one (or loopback): set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the cluster network's.
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

LAUNCH=(torchrun --nproc-per-node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}")
if [ "${NNODES}" -gt 1 ]; then
  LAUNCH+=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${RUN_NAME}")
else
  LAUNCH+=(--master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}")
fi

LOGGING=(--log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "${SAVE_DIR}/tensorboard")
if [ -n "${WANDB_PROJECT:-}" ]; then
  LOGGING+=(--wandb-project "${WANDB_PROJECT}" --wandb-exp-name "${RUN_NAME}")
fi

# shellcheck disable=SC2206  # DATA_PATH may hold several words (weights and prefixes)
exec "${LAUNCH[@]}" "${REPO}/pretrain_anchor.py" \
  --transformer-impl transformer_engine --bf16 \
  --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}" ${SEQ_PARALLEL:+--sequence-parallel} \
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather ${VP_LAYERS:+--num-layers-per-virtual-pipeline-stage "${VP_LAYERS}"} \
  "${MODEL_ARGS[@]}" --hidden-dropout 0 --attention-dropout 0 \
  --seq-length "${SEQ_LENGTH}" --micro-batch-size "${MICRO_BATCH_SIZE}" --global-batch-size "${GLOBAL_BATCH_SIZE}" \
  --train-iters "${TRAIN_ITERS}" --lr "${LR}" --min-lr "${MIN_LR}" --lr-decay-style cosine \
  --lr-warmup-iters "${WARMUP_ITERS}" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 \
  --clip-grad 1.0 \
  --data-path ${DATA_PATH} --split 998,2,0 --num-workers 2 \
  --tokenizer-type "${TOKENIZER_TYPE}" --tokenizer-model "${TOKENIZER_MODEL}" \
  --loss-mask-policy "${POLICY}" --exit-signal "${EXIT_SIGNAL}" \
  --save "${SAVE_DIR}/checkpoints" --load "${SAVE_DIR}/checkpoints" --save-interval 1000 \
  --ckpt-fully-parallel-save \
  "${LOGGING[@]}" \
  ${EXTRA_ARGS:-}
