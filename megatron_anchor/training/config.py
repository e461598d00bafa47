"""Configuration of a training run: one dataclass per component, defaults in one place.

Field names are Megatron-LM's argument names (``tensor_model_parallel_size`` is ``--tensor-model-parallel-size``)
so a Megatron-LM launch script maps onto them with few changes. Each field's docstring is its ``--help`` text
(see :mod:`megatron_anchor.training.arguments`) and each numeric field's range is declared with it
(:func:`~megatron_anchor.bounds.bounded`: checked on flags and YAML alike, shown by ``--help``). Boolean fields
default to False and are switched on by their flag, as in Megatron-LM; defaults that Megatron-LM sets differently
are listed in ``docs/trainer.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_anchor.bounds import bounded

LOSS_MASK_POLICIES = ("pretrain", "pretrain-text", "sft-anchored", "sft-standard")
"""Policy names (their role tables: ``megatron_anchor.training.loss.POLICY_ROLES``)."""
SFT_POLICIES = ("sft-anchored", "sft-standard")
REPLAY_POLICIES = ("pretrain", "pretrain-text")


@dataclass
class ModelConfig:
    """Architecture of the GPT model."""

    num_layers: int = bounded(2, ge=1)
    """Number of transformer layers."""
    hidden_size: int = bounded(64, ge=1)
    """Transformer hidden size."""
    ffn_hidden_size: Optional[int] = bounded(None, ge=1)
    """MLP hidden size; default 4 * hidden_size (8/3 * hidden_size rounded up to 64 with --swiglu)."""
    num_attention_heads: int = bounded(4, ge=1)
    """Number of attention heads."""
    group_query_attention: bool = False
    """Use grouped-query attention (needs --num-query-groups)."""
    num_query_groups: Optional[int] = bounded(None, ge=1)
    """Number of key/value head groups with --group-query-attention."""
    kv_channels: Optional[int] = bounded(None, ge=1)
    """Per-head projection size; default hidden_size / num_attention_heads."""
    seq_length: int = bounded(128, ge=1)
    """Sequence length of a training sample (tokens)."""
    max_position_embeddings: Optional[int] = bounded(None, ge=1)
    """Maximum positions for learned absolute embeddings; default seq_length."""
    position_embedding_type: str = "learned_absolute"
    """Position embedding: learned_absolute or rope."""
    rotary_base: int = bounded(10000, gt=0)
    """RoPE base period."""
    rotary_percent: float = bounded(1.0, gt=0, le=1)
    """Fraction of each head's dimensions that RoPE rotates."""
    use_rope_scaling: bool = False
    """Scale RoPE's low frequencies as Llama 3.1 does (megatron-core's rule: low-frequency factor 1,
    high-frequency factor 4, original context 8192; --rope-scaling-factor sets the factor)."""
    rope_scaling_factor: float = bounded(8.0, gt=0)
    """The factor of --use-rope-scaling (Llama 3.1: 8, Llama 3.2: 32)."""
    swiglu: bool = False
    """Use SwiGLU in the MLP (gated linear unit with SiLU)."""
    normalization: str = "LayerNorm"
    """Normalization layer: LayerNorm or RMSNorm."""
    norm_epsilon: float = bounded(1e-5, gt=0)
    """Epsilon of the normalization layers."""
    untie_embeddings_and_output_weights: bool = False
    """Use a separate output layer instead of the transposed input embedding."""
    disable_bias_linear: bool = False
    """Drop the biases of all linear layers."""
    add_qkv_bias: bool = False
    """Keep biases on the query, key and value projections even with --disable-bias-linear (Qwen2)."""
    qk_layernorm: bool = False
    """Normalise each head's queries and keys (with --normalization) before RoPE (Qwen3)."""
    padded_vocab_size: Optional[int] = bounded(None, ge=1)
    """Rows of the embedding and output layer, the same under every TP size (tools/import_hf.py sets the
    imported model's rows, so one checkpoint loads under any TP that divides them); default: the vocabulary
    padded to a multiple of --make-vocab-size-divisible-by x TP, Megatron-LM's rule."""
    hidden_dropout: float = bounded(0.1, ge=0, lt=1)
    """Dropout after attention and MLP."""
    attention_dropout: float = bounded(0.1, ge=0, lt=1)
    """Dropout on attention probabilities."""
    init_method_std: float = bounded(0.02, ge=0)
    """Standard deviation of the normal weight initialisation."""
    make_vocab_size_divisible_by: int = bounded(128, ge=1)
    """Pad the vocabulary to a multiple of this value times the tensor-parallel size."""
    transformer_impl: str = "auto"
    """Layer implementation: local (megatron-core modules), transformer_engine, or auto (Transformer Engine when
    it is installed and a GPU is present, else local)."""


@dataclass
class ParallelConfig:
    """How the model and data are split over processes."""

    tensor_model_parallel_size: int = bounded(1, ge=1)
    """Tensor-parallel size (splits layers over ranks)."""
    pipeline_model_parallel_size: int = bounded(1, ge=1)
    """Pipeline-parallel size (splits the layer stack into stages)."""
    sequence_parallel: bool = False
    """Sequence parallelism inside tensor-parallel regions (needs TP > 1 and Transformer Engine)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state and fp32 main weights over data-parallel ranks (megatron-core's distributed
    optimizer: gradients reduce-scattered, parameters all-gathered; NCCL, or gloo where this torch's gloo has
    reduce-scatter, which is checked at start-up)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient all-reduce with the backward pass."""
    distributed_backend: str = "auto"
    """torch.distributed backend: nccl, gloo, or auto (nccl with CUDA, else gloo)."""
    distributed_timeout_minutes: int = bounded(10, ge=1)
    """Timeout of collective operations."""
    context_parallel_size: int = bounded(1, ge=1)
    """Context-parallel size: each sequence is split over this many ranks, which exchange keys and values in a
    ring (Transformer Engine only; with --reset-attention-mask every document is padded to a multiple of
    2 x this size and split per document)."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = bounded(None, ge=1)
    """Layers per virtual pipeline stage: each pipeline rank holds num_layers / (PP x this) model chunks and
    megatron-core's interleaved schedule runs them (smaller pipeline bubble; needs PP >= 2)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs
    --use-distributed-optimizer and --overlap-grad-reduce)."""
    accumulate_allreduce_grads_in_fp32: bool = False
    """Accumulate and all-reduce gradients in fp32 (always on with --bf16, as in Megatron-LM)."""


@dataclass
class TrainingConfig:
    """Optimisation, batch sizes, precision and the loss-mask policy."""

    micro_batch_size: int = bounded(2, ge=1)
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: Optional[int] = bounded(None, ge=1)
    """Samples per optimizer step over all data-parallel ranks; default micro_batch_size * DP size."""
    train_iters: int = bounded(100, ge=1)
    """Number of optimizer steps."""
    lr: float = bounded(1e-3, ge=0)
    """Peak learning rate."""
    min_lr: float = bounded(0.0, ge=0)
    """Learning rate at the end of the decay."""
    lr_decay_style: str = "cosine"
    """Learning-rate decay: constant, linear, cosine, inverse-square-root or WSD."""
    lr_warmup_iters: int = bounded(0, ge=0)
    """Linear warm-up steps."""
    lr_decay_iters: Optional[int] = bounded(None, ge=1)
    """Steps over which the rate decays; default train_iters."""
    lr_wsd_decay_iters: Optional[int] = bounded(None, ge=0)
    """Final decay steps of the WSD schedule; default 10% of the decay steps."""
    weight_decay: float = bounded(0.01, ge=0)
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    """Adam beta1."""
    adam_beta2: float = bounded(0.999, ge=0, lt=1)
    """Adam beta2."""
    adam_eps: float = bounded(1e-8, gt=0)
    """Adam epsilon."""
    clip_grad: float = bounded(1.0, ge=0)
    """Clip gradients to this global L2 norm (0 disables clipping)."""
    seed: int = bounded(1234, ge=0, le=2**31 - 1)
    """Random seed (model initialisation, dropout, data order)."""
    bf16: bool = False
    """Train in bfloat16: megatron-core's Float16Module holds bf16 weights, the optimizer fp32 main weights,
    gradients are reduced in fp32. Runs on GPUs and on CPUs (fastest where the CPU has bf16 instructions, e.g.
    AMX or AVX512-BF16)."""
    fp16: bool = False
    """Train in float16 with fp32 main weights and loss scaling (dynamic unless --loss-scale); GPU or CPU."""
    loss_scale: Optional[float] = bounded(None, gt=0)
    """Static loss scale for --fp16 (a power of 2 is best); default: dynamic loss scaling."""
    initial_loss_scale: float = bounded(4294967296.0, gt=0)
    """Initial dynamic loss scale for --fp16 (2^32)."""
    min_loss_scale: float = bounded(1.0, gt=0)
    """Smallest dynamic loss scale for --fp16."""
    loss_scale_window: int = bounded(1000, ge=1)
    """Steps without overflow after which the dynamic loss scale doubles."""
    hysteresis: int = bounded(2, ge=1)
    """Overflowing steps tolerated before the dynamic loss scale halves."""
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
    exit_interval: Optional[int] = bounded(None, ge=1)
    """Stop once the iteration is a multiple of this, after saving a checkpoint when --save is set."""
    exit_duration_in_mins: Optional[float] = bounded(None, gt=0)
    """Stop once this many minutes have passed since start-up, after saving a checkpoint when --save is set
    (keep it below the job's time limit by more than one step and one save)."""
    exit_signal_handler: bool = True
    """On SIGTERM or --exit-signal, finish the current step, save a checkpoint when --save is set and exit 0
    (every rank stops at the same step). Under torchrun, let it forward the signal and wait for the save:
    torchrun's --signals-to-handle (PET_SIGNALS_TO_HANDLE) and TORCH_ELASTIC_SHUTDOWN_TIMEOUT (docs/trainer.md)."""
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


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
"""Submodules ``--recompute-granularity selective`` can recompute in this dense GPT (megatron-core's names)."""


@dataclass
class PerformanceConfig:
    """Memory and speed: activation recomputation, fused kernels, FP8. None of these changes the model."""

    recompute_granularity: Optional[str] = None
    """Activation recomputation: full (whole layers, per --recompute-method) or selective (the submodules in
    --recompute-modules, by default core attention); default none."""
    recompute_method: Optional[str] = None
    """With full recomputation: uniform (recompute every layer, checkpointing groups of --recompute-num-layers)
    or block (recompute the first --recompute-num-layers layers of each pipeline stage)."""
    recompute_num_layers: Optional[int] = bounded(None, ge=1)
    """With full recomputation: layers per recomputed group (uniform) or recomputed layers per stage (block)."""
    recompute_modules: Optional[List[str]] = None
    """With selective recomputation: which submodules to recompute (core_attn, mlp, layernorm); default
    core_attn."""
    bias_activation_fusion: bool = True
    """Fuse the bias add and the activation (GeLU, SwiGLU) where the kernel is available (CUDA)."""
    bias_dropout_fusion: bool = True
    """Fuse bias, dropout and the residual add where the kernel is available (CUDA)."""
    masked_softmax_fusion: bool = True
    """Fuse scaling, masking and softmax in attention where the kernel is available (local layers need
    megatron's fused softmax extension; Transformer Engine fuses attention itself)."""
    rope_fusion: bool = True
    """Use Transformer Engine's fused RoPE kernel where available (with --position-embedding-type rope)."""
    cross_entropy_loss_fusion: bool = True
    """Fuse the vocabulary-parallel cross-entropy where the kernel is available (CUDA)."""
    gradient_accumulation_fusion: bool = True
    """Accumulate weight gradients into the fp32 gradient buffer inside the GEMM where available: needs apex's
    fused_weight_gradient_mlp_cuda extension with either layer implementation (the output layer is always
    megatron-core's ColumnParallelLinear, which refuses the fusion without it), CUDA, and the DDP gradient
    buffer."""
    fp8_format: Optional[str] = None
    """Run the transformer layers' GEMMs in FP8 through Transformer Engine: hybrid (E4M3 forward, E5M2
    backward) or e4m3 (both); needs Transformer Engine, a GPU with FP8 tensor cores and --bf16 or --fp16."""
    fp8_amax_history_len: int = bounded(1024, ge=1)
    """FP8 delayed scaling: length of the amax history window."""
    fp8_amax_compute_algo: str = "max"
    """FP8 delayed scaling: scale from the max of the amax history (max) or its latest entry (most_recent)."""
    fp8_margin: int = bounded(0, ge=0)
    """FP8 delayed scaling: scale margin (powers of 2 of headroom)."""


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
    replay_share: float = bounded(0.0, ge=0, le=1)
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
    vocab_size: Optional[int] = bounded(None, ge=2)
    """Vocabulary size for NullTokenizer / --mock-data (the tokenizer knows it otherwise)."""
    mock_data: bool = False
    """Train on megatron's synthetic mock dataset (no files, no roles; for smoke tests)."""
    no_role_channel: bool = False
    """Read plain GPTDataset samples without the role channel (a stock Megatron baseline; only the pretrain
    policy is allowed)."""
    num_workers: int = bounded(0, ge=0)
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
    save_interval: Optional[int] = bounded(None, ge=1)
    """Save every this many steps (and at the end when --save is set)."""
    finetune: bool = False
    """Load model weights only: fresh optimizer, schedule, RNG and data position, iteration 0."""
    no_load_optim: bool = False
    """Do not load optimizer state (or the LR schedule)."""
    no_load_rng: bool = False
    """Do not load RNG state."""
    ckpt_fully_parallel_save: bool = False
    """Spread checkpoint writes over data-parallel ranks."""
    ckpt_fully_parallel_load: bool = False
    """Read each checkpoint shard on one data-parallel rank and exchange it over the data-parallel group, instead
    of every replica reading the same shards (fewer storage reads at scale)."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """With --use-distributed-optimizer: save its state in megatron-core's fully reshardable form (the run may then
    resume under another TP/PP layout) instead of the default per-bucket form (written in parallel, without
    gathering; a resume keeps the TP/PP/CP layout and the gradient buckets). At every save and load each
    data-parallel rank then holds its TP x PP shard's whole optimizer state in host memory (12 bytes per parameter)
    unless --distrib-optim-fully-reshardable-mem-efficient."""
    distrib_optim_fully_reshardable_mem_efficient: bool = False
    """With --dist-ckpt-optim-fully-reshardable: gather the optimizer state on each data-parallel group's first rank
    only, over gloo (slower saves, a fraction of the host memory)."""


@dataclass
class LoggingConfig:
    """Console, validation, TensorBoard and wandb."""

    log_interval: int = bounded(10, ge=1)
    """Print a log line every this many steps."""
    eval_interval: Optional[int] = bounded(None, ge=1)
    """Evaluate on the validation set every this many steps (and at the end); default: only at the end."""
    eval_iters: int = bounded(10, ge=0)
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
    peak_tflops: Optional[float] = bounded(None, gt=0)
    """Peak TFLOP/s of one device for MFU; default: detected from the GPU's name (dense bf16 peak), none on
    CPU (MFU is then not logged)."""
    profile: bool = False
    """Record a torch.profiler trace of steps --profile-step-start to --profile-step-end on --profile-ranks."""
    profile_step_start: int = bounded(10, ge=1)
    """First profiled iteration (1-based, counting from the run's start iteration)."""
    profile_step_end: int = bounded(12, ge=1)
    """Last profiled iteration."""
    profile_ranks: List[int] = bounded(default_factory=lambda: [0], ge=0)
    """Global ranks that record a trace."""
    profile_dir: Optional[str] = None
    """Where traces go (one Chrome-trace JSON per rank, TensorBoard's profiler plugin reads them); default
    --tensorboard-dir, else <save>/profile, else ./profile."""


@dataclass
class AnchorConfig:
    """Everything a run needs; each component reads only its own part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = ("model", "parallel", "performance", "training", "data", "checkpoint", "logging")

ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "position_embedding_type", "rotary_base", "rotary_percent", "swiglu",
    "normalization", "norm_epsilon", "untie_embeddings_and_output_weights", "disable_bias_linear",
    "make_vocab_size_divisible_by", "use_rope_scaling", "rope_scaling_factor", "add_qkv_bias", "qk_layernorm",
    "padded_vocab_size",
)
"""``ModelConfig`` fields that give saved weights their meaning: a run that loads a checkpoint (``--load``,
``--finetune``) must have the same values, or it would load without error and compute something else (another
norm epsilon or RoPE base) or fail deep inside megatron. ``max_position_embeddings`` counts too with learned
absolute positions. Sequence length, dropout and the parallel layout may differ."""
