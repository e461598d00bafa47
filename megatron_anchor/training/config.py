"""Configuration of a training run: one dataclass per component, defaults in one place.

Field names are Megatron-LM's argument names (``tensor_model_parallel_size`` is ``--tensor-model-parallel-size``)
so a Megatron-LM launch script maps onto them with few changes. Each field's docstring is its ``--help`` text
(see :mod:`megatron_anchor.training.arguments`). Boolean fields default to False and are switched on by their
flag, as in Megatron-LM; defaults that Megatron-LM sets differently are listed in ``docs/trainer.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

LOSS_MASK_POLICIES = ("pretrain", "pretrain-text", "sft-anchored", "sft-standard")
"""Policy names (their role tables: ``megatron_anchor.training.loss.POLICY_ROLES``)."""
SFT_POLICIES = ("sft-anchored", "sft-standard")
REPLAY_POLICIES = ("pretrain", "pretrain-text")


@dataclass
class ModelConfig:
    """Architecture of the GPT model."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Transformer hidden size."""
    ffn_hidden_size: Optional[int] = None
    """MLP hidden size; default 4 * hidden_size (8/3 * hidden_size rounded up to 64 with --swiglu)."""
    num_attention_heads: int = 4
    """Number of attention heads."""
    group_query_attention: bool = False
    """Use grouped-query attention (needs --num-query-groups)."""
    num_query_groups: Optional[int] = None
    """Number of key/value head groups with --group-query-attention."""
    kv_channels: Optional[int] = None
    """Per-head projection size; default hidden_size / num_attention_heads."""
    seq_length: int = 128
    """Sequence length of a training sample (tokens)."""
    max_position_embeddings: Optional[int] = None
    """Maximum positions for learned absolute embeddings; default seq_length."""
    position_embedding_type: str = "learned_absolute"
    """Position embedding: learned_absolute or rope."""
    rotary_base: int = 10000
    """RoPE base period."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates."""
    swiglu: bool = False
    """Use SwiGLU in the MLP (gated linear unit with SiLU)."""
    normalization: str = "LayerNorm"
    """Normalization layer: LayerNorm or RMSNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    untie_embeddings_and_output_weights: bool = False
    """Use a separate output layer instead of the transposed input embedding."""
    disable_bias_linear: bool = False
    """Drop the biases of all linear layers."""
    hidden_dropout: float = 0.1
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this value times the tensor-parallel size."""
    transformer_impl: str = "auto"
    """Layer implementation: local (megatron-core modules), transformer_engine, or auto (Transformer Engine when
    it is installed and a GPU is present, else local)."""


@dataclass
class ParallelConfig:
    """How the model and data are split over processes."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits layers over ranks)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits the layer stack into stages)."""
    sequence_parallel: bool = False
    """Sequence parallelism inside tensor-parallel regions (needs TP > 1 and Transformer Engine)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (needs NCCL: gloo has no reduce-scatter)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient all-reduce with the backward pass."""
    distributed_backend: str = "auto"
    """torch.distributed backend: nccl, gloo, or auto (nccl with CUDA, else gloo)."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""


@dataclass
class TrainingConfig:
    """Optimisation, batch sizes, precision and the loss-mask policy."""

    micro_batch_size: int = 2
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks; default micro_batch_size * DP size."""
    train_iters: int = 100
    """Number of optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: str = "cosine"
    """Learning-rate decay: constant, linear, cosine, inverse-square-root or WSD."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the rate decays; default train_iters."""
    lr_wsd_decay_iters: Optional[int] = None
    """Final decay steps of the WSD schedule; default 10% of the decay steps."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm (0 disables clipping)."""
    seed: int = 1234
    """Random seed (model initialisation, dropout, data order)."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights."""
    loss_mask_policy: str = "pretrain"
    """Which token roles carry loss: pretrain (every real token, annotations included), pretrain-text (every real
    token except annotations), sft-anchored (response and EOD only: prompt and annotation get zero loss),
    sft-standard (response and EOD, for SFT data without annotations). With --replay-data-path it applies to the
    --data-path samples only."""
    replay_loss_mask_policy: str = "pretrain"
    """Policy of the replayed samples (--replay-data-path): pretrain (the pretraining objective, annotations
    included: keeps the annotation format and the response's binding to its annotation through long SFT) or
    pretrain-text (annotations masked, an ablation)."""
    eod_mask_loss: bool = False
    """Also mask the loss where the input token is end-of-document (megatron's own option)."""
    exit_interval: Optional[int] = None
    """Stop once the iteration is a multiple of this, after saving a checkpoint when --save is set."""
    exit_duration_in_mins: Optional[float] = None
    """Stop once this many minutes have passed since start-up, after saving a checkpoint when --save is set
    (keep it below the job's time limit by more than one step and one save)."""
    exit_signal_handler: bool = True
    """On SIGTERM or --exit-signal, finish the current step, save a checkpoint when --save is set and exit 0
    (every rank stops at the same step). Under torchrun, let it forward the signal and wait for the save:
    TORCHELASTIC_SIGNALS_TO_HANDLE and TORCH_ELASTIC_SHUTDOWN_TIMEOUT (docs/trainer.md)."""
    exit_signal: str = "SIGTERM"
    """A second signal handled like SIGTERM, e.g. SIGUSR1 for Slurm's --signal=USR1@120."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop with an error naming the iteration and the rank when a loss or the gradient norm is NaN or Inf
    (nothing is saved from that step)."""
    dry_run: bool = False
    """Check the flags for this world size (WORLD_SIZE), the data files, role channels and tokenizer records, and
    a --load checkpoint's architecture; print the resolved configuration as YAML and exit without training."""
    dry_run_target: str = "here"
    """What --dry-run validates for: here (this machine) or gpu (a machine with CUDA and Transformer Engine, to
    check a GPU recipe from a CPU machine)."""


@dataclass
class DataConfig:
    """Datasets and tokenizer."""

    data_path: List[str] = field(default_factory=list)
    """Dataset prefixes with optional blend weights: 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2'. The role channel
    PREFIX_roles.{bin,idx} must sit beside each."""
    replay_data_path: List[str] = field(default_factory=list)
    """Pretraining data replayed in a fine-tuning run, in --data-path's form ('PREFIX' or 'W1 PREFIX1 ...'). Its
    samples are scored under --replay-loss-mask-policy, the --data-path samples under --loss-mask-policy; the
    log shows the loss of each ('sft loss', 'replay loss')."""
    replay_share: float = 0.0
    """Share of the training and validation samples drawn from --replay-data-path (0 <= share < 1); the
    --data-path entries share the rest in proportion to their weights."""
    split: str = "969,30,1"
    """Train/validation/test split of each dataset, as weights."""
    tokenizer_type: Optional[str] = None
    """A tokenizer type the data tools accept (SentencePieceTokenizer, GPTSentencePieceTokenizer,
    Llama2Tokenizer, HuggingFaceTokenizer), or NullTokenizer for mock and pre-tokenized data."""
    tokenizer_model: Optional[str] = None
    """Tokenizer model file (SentencePiece .model or a HuggingFace tokenizer)."""
    eod_token: Optional[str] = None
    """End-of-document token text, as given to the data tools' --eod-token (default: the tokenizer's own). The
    tokenizer record beside each dataset must agree."""
    vocab_size: Optional[int] = None
    """Vocabulary size for NullTokenizer / --mock-data (the tokenizer knows it otherwise)."""
    mock_data: bool = False
    """Train on megatron's synthetic mock dataset (no files, no roles; for smoke tests)."""
    no_role_channel: bool = False
    """Read plain GPTDataset samples without the role channel (a stock Megatron baseline; only the pretrain
    policy is allowed)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    data_cache_path: Optional[str] = None
    """Where megatron caches dataset index files; default beside the data."""
    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token (what learned absolute position embeddings read;
    RoPE restarts per document by itself on the Transformer Engine path, and this flag is refused where it would
    do nothing)."""
    reset_attention_mask: bool = False
    """Keep attention inside each document or packed SFT sample: boundaries after every end-of-document token
    go to the attention kernel (Transformer Engine: THD variable-length attention; local layers: a block-causal
    mask). Needed for packed SFT data."""


@dataclass
class CheckpointConfig:
    """Saving and loading (megatron-core dist_checkpointing)."""

    save: Optional[str] = None
    """Directory to save checkpoints in."""
    load: Optional[str] = None
    """Directory to load a checkpoint from (its latest iteration)."""
    save_interval: Optional[int] = None
    """Save every this many steps (and at the end when --save is set)."""
    finetune: bool = False
    """Load model weights only: fresh optimizer, schedule, RNG and data position, iteration 0."""
    no_load_optim: bool = False
    """Do not load optimizer state (or the LR schedule)."""
    no_load_rng: bool = False
    """Do not load RNG state."""
    ckpt_fully_parallel_save: bool = False
    """Spread checkpoint writes over data-parallel ranks."""


@dataclass
class LoggingConfig:
    """Console, validation, TensorBoard and wandb."""

    log_interval: int = 10
    """Print a log line every this many steps."""
    eval_interval: Optional[int] = None
    """Evaluate on the validation set every this many steps (and at the end); default: only at the end."""
    eval_iters: int = 10
    """Validation batches per evaluation (0 disables validation)."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard events here."""
    wandb_project: Optional[str] = None
    """Log to this wandb project (WANDB_MODE=offline works without network)."""
    wandb_exp_name: Optional[str] = None
    """wandb run name."""
    wandb_save_dir: Optional[str] = None
    """Directory for wandb's local files; default <save>/wandb or ./wandb."""
    log_role_losses: bool = True
    """Log the loss on annotation tokens and on text tokens separately (pretrain policy)."""


@dataclass
class AnchorConfig:
    """Everything a run needs; each component reads only its own part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = ("model", "parallel", "training", "data", "checkpoint", "logging")

ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "position_embedding_type", "rotary_base", "rotary_percent", "swiglu",
    "normalization", "norm_epsilon", "untie_embeddings_and_output_weights", "disable_bias_linear",
    "make_vocab_size_divisible_by",
)
"""``ModelConfig`` fields that give saved weights their meaning: a run that loads a checkpoint (``--load``,
``--finetune``) must have the same values, or it would load without error and compute something else (another
norm epsilon or RoPE base) or fail deep inside megatron. ``max_position_embeddings`` counts too with learned
absolute positions. Sequence length, dropout and the parallel layout may differ."""
