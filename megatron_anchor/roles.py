"""Per-token role codes: the one owner of the values written into the role channel.

The role channel (``PREFIX_text_document_roles.{bin,idx}``) stores one uint8 per token. The trainer turns
roles into the loss mask; the codes are an on-disk contract, so never renumber them.
"""

from enum import IntEnum

import numpy as np

ROLE_DTYPE = np.uint8


class Role(IntEnum):
    """What a token is. Values are the uint8 codes stored on disk."""

    PAD = 0
    """Padding; never written by the tools, used when a sample is padded."""
    TEXT = 1
    """Document content (pretraining chunk text and the separators between chunks)."""
    ANNOTATION_KEY = 2
    """Annotation delimiters, tag keys and the key/value and tag separators."""
    ANNOTATION_VALUE = 3
    """Tag values."""
    PROMPT = 4
    """SFT prompt (and chat-template scaffolding around it)."""
    RESPONSE = 5
    """SFT target response."""
    EOD = 6
    """End-of-document token."""


KNOWN_ROLE_CODES = frozenset(int(r) for r in Role)
ANNOTATION_ROLES = (Role.ANNOTATION_KEY, Role.ANNOTATION_VALUE)


def role_name(code: int) -> str:
    """Human-readable name of a role code, or ``UNKNOWN(<code>)``."""
    try:
        return Role(int(code)).name
    except ValueError:
        return f"UNKNOWN({int(code)})"
