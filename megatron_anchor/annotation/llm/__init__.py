"""The LLM annotator: tag schema, versioned prompt, tolerant parser, OpenAI-compatible client and cache.

The annotate job that drives them is :mod:`megatron_anchor.annotation.annotate`; docs/annotator.md explains the
whole stack, from the schema file to scaling out over many vLLM replicas.
"""

from megatron_anchor.annotation.llm.response_cache import AnnotationCache, chunk_hash
from megatron_anchor.annotation.llm.client import Annotation, AnnotatorClient, ClientConfig, Secret, load_api_key
from megatron_anchor.annotation.llm.parser import ParseResult, parse_output
from megatron_anchor.annotation.llm.prompt import PROMPT_VERSION, build_messages, prompt_id
from megatron_anchor.annotation.llm.tagschema import SchemaError, TagKey, TagSchema, load_schema

__all__ = [
    "Annotation", "AnnotationCache", "AnnotatorClient", "ClientConfig", "PROMPT_VERSION", "ParseResult",
    "SchemaError", "Secret", "TagKey", "TagSchema", "build_messages", "chunk_hash", "load_api_key", "load_schema",
    "parse_output", "prompt_id",
]
