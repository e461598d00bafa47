"""Structured outputs: the JSON schema of an answer, sent so that the server can only write a parseable one.

vLLM (and other OpenAI-compatible servers) accept ``response_format: {"type": "json_schema", ...}`` on chat
completions and enforce it with grammar-guided decoding (xgrammar or guidance in vLLM, also on CPU). The schema
here fixes the shape of the answer: for a document window, one property per chunk number, all required; for each
chunk an object whose properties are the tag schema's keys, strings of bounded length. The tolerant parser stays
for servers that do not support it (``--structured-output off``, or ``auto`` once a server refused the field).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from megatron_anchor.annotation.llm.tagschema import TagSchema

STRUCTURED_MODES = ("auto", "on", "off")
"""``on``: every request carries the schema; ``off``: never (the tolerant parser reads free text); ``auto``: carry
it, and stop for the rest of the run when a server rejects the field (HTTP 400 naming it)."""

DEFAULT_STRUCTURED = "auto"


def chunk_schema(schema: TagSchema) -> Dict[str, Any]:
    """JSON schema of one chunk's tags: an object of the schema's keys, string values, at least one key.

    ``keep_unknown`` schemas still get a closed object: a structured answer cannot invent keys, which is the point.
    """
    props = {k.name: {"type": "string", "minLength": 1, "maxLength": schema.max_value_chars} for k in schema.keys}
    # The first key is required so that an answer can never be an empty object (a chunk with no tags).
    return {"type": "object", "properties": props, "required": [schema.keys[0].name], "additionalProperties": False}


def document_schema(schema: TagSchema, n_chunks: int) -> Dict[str, Any]:
    """JSON schema of a document window's answer: properties "1".."n", each a :func:`chunk_schema` object."""
    one = chunk_schema(schema)
    names = [str(i) for i in range(1, n_chunks + 1)]
    return {"type": "object", "properties": {n: one for n in names}, "required": names, "additionalProperties": False}


def response_format(answer_schema: Dict[str, Any], name: str = "tags") -> Dict[str, Any]:
    """The OpenAI ``response_format`` field that asks the server to follow ``answer_schema``."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": answer_schema, "strict": True}}


def rejected_structured_output(status: int, message: str) -> bool:
    """Whether an error answer says the server does not accept ``response_format`` (so ``auto`` turns it off)."""
    if status not in (400, 404, 422, 501):
        return False
    m = message.lower()
    return any(word in m for word in ("response_format", "json_schema", "structured", "guided", "grammar"))


def structured_field(mode: str, answer_schema: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The request fields for ``mode`` (None when the request goes without a schema)."""
    if mode == "off":
        return None
    return {"response_format": response_format(answer_schema)}
