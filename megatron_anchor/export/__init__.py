"""Export a megatron-anchor checkpoint as a Hugging Face Llama-style folder."""

from megatron_anchor.export.hf_llama import ExportError, export_checkpoint, llama_config, save_folder
from megatron_anchor.export.tokenizer import TokenizerExportError, sentencepiece_to_tokenizers

__all__ = ["ExportError", "TokenizerExportError", "export_checkpoint", "llama_config", "save_folder",
           "sentencepiece_to_tokenizers"]
