"""Inference: checkpoints in any TP/PP layout -> one process, a KV-cached decoder, anchored sampling."""

from megatron_anchor.inference.checkpoint import CheckpointError
from megatron_anchor.inference.generator import (
    AnchorGenerator,
    load_any,
    load_from_checkpoint,
    load_from_hf_folder,
)
from megatron_anchor.inference.model import DecoderLM, KVCache, ModelSpec
from megatron_anchor.inference.prompts import Prompt, PromptFileError, read_prompts
from megatron_anchor.inference.sampler import MODES, SamplingParams, generate_batch, generate_ids

__all__ = [
    "AnchorGenerator", "CheckpointError", "DecoderLM", "KVCache", "MODES", "ModelSpec", "Prompt",
    "PromptFileError", "SamplingParams", "generate_batch", "generate_ids", "load_any", "load_from_checkpoint",
    "load_from_hf_folder", "read_prompts",
]
