"""Export a megatron-anchor checkpoint as a Hugging Face folder (Llama or GPT-2 layout, by architecture)."""

from megatron_anchor.export.folder import LAYOUTS, ExportError, choose_layout, export_checkpoint, save_folder
from megatron_anchor.export.tokenizer import TokenizerExportError, sentencepiece_to_tokenizers

__all__ = ["ExportError", "LAYOUTS", "TokenizerExportError", "choose_layout", "export_checkpoint", "save_folder",
           "sentencepiece_to_tokenizers"]
