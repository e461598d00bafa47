"""The annotator server's API key: one secret shared by the server (``tools/annotator_server.py``, which hands it to
vLLM) and its clients (``tools/annotate.py``, SFT preprocessing), read from a file or ``$ANNOTATOR_API_KEY``.

The key lives in :class:`Secret`, whose ``repr`` and ``str`` hide it; it only ever goes into an ``Authorization``
header or, for vLLM, into the server process's environment (never its command line, which ``ps`` shows to every
user of the machine). Standard library only: the server tool runs under any Python.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

API_KEY_ENV = "ANNOTATOR_API_KEY"
"""Environment variable holding the key when no key file is given (server and clients alike)."""


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """The secret itself (for the request header only)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def load_api_key(key_file: Optional[str] = None, env_var: str = API_KEY_ENV) -> Optional[Secret]:
    """The API key from ``key_file`` (first line) if given, else from ``$env_var``, else None.

    A file is preferred because environment variables leak into child processes and crash reports.
    """
    if key_file:
        try:
            value = Path(key_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read API key file {key_file}: {getattr(e, 'strerror', None) or e}") from None
        if not value or not value[0].strip():
            raise ValueError(f"API key file {key_file} is empty")
        return Secret(value[0].strip())
    value_env = os.environ.get(env_var, "").strip()
    return Secret(value_env) if value_env else None
