"""Hugging Face model folders in: Llama-family weights -> a megatron-anchor checkpoint (``tools/import_hf.py``)."""

from megatron_anchor.hf_import.families import FAMILIES, ImportRefused, model_fields
from megatron_anchor.hf_import.importer import import_hf

__all__ = ["FAMILIES", "ImportRefused", "import_hf", "model_fields"]
