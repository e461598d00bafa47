"""Split documents into chunks at blank lines, exactly.

A separator is a newline followed by one or more blank lines (lines holding only spaces/tabs). Each chunk keeps
the separator that followed it, so ``"".join(text + sep for text, sep in split_chunks(doc)) == doc`` for every
string. Blank lines at the very start of a document stay in the first chunk's text (there is no chunk before
them to own them); blank lines at the end become the last chunk's separator.
"""

from __future__ import annotations

import re
from typing import List, Tuple

_SEPARATOR = re.compile(r"\r?\n(?:[ \t\f\v]*\r?\n)+")


def split_chunks(text: str) -> List[Tuple[str, str]]:
    """Return ``[(chunk_text, separator_after_it), ...]``; an empty document gives ``[]``."""
    chunks: List[Tuple[str, str]] = []
    start = 0
    for m in _SEPARATOR.finditer(text):
        if m.start() == start:
            # Only possible at the document start: leading blank lines stay with the first chunk.
            continue
        chunks.append((text[start : m.start()], m.group()))
        start = m.end()
    if start < len(text):
        chunks.append((text[start:], ""))
    return chunks
