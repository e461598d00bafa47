"""An on-disk cache of annotations keyed by model, prompt version and the chunk's content hash.

SQLite (the standard library's, WAL mode) because it is crash-safe, needs no server, and a single file can be
copied between machines. A rerun or a resumed run looks every chunk up here first, so no chunk is paid for
twice. Only successful annotations are stored: failures are retried on the next run.

Writes are buffered and committed in batches (a commit per chunk would cap throughput at disk sync speed); a
kill loses at most the last uncommitted batch, which only costs re-asking the server for those chunks.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from megatron_anchor.annotation.format import Tag

_LOOKUP_BATCH = 500  # SQLite's default limit on bound parameters is 999 (older builds)


def chunk_hash(text: str) -> bytes:
    """The content hash of a chunk (sha256 of its UTF-8 text)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class AnnotationCache:
    """A persistent map ``(model, prompt_id, chunk_hash) -> tags``.

    Not thread-safe: one job (one event loop) owns one instance. Several processes may share a file; SQLite
    serialises their writers.
    """

    def __init__(self, path: Union[str, Path], model: str, prompt: str, flush_every: int = 256):
        self.path = Path(path)
        self.model = model
        self.prompt = prompt
        self.flush_every = flush_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable at checkpoints and crash-safe in WAL mode; FULL would sync on every commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS annotations ("
            " model TEXT NOT NULL, prompt TEXT NOT NULL, chunk BLOB NOT NULL,"
            " tags TEXT NOT NULL, tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,"
            " PRIMARY KEY (model, prompt, chunk)) WITHOUT ROWID"
        )
        self._pending: List[Tuple[str, str, bytes, str, int, float]] = []

    def get_many(self, hashes: Sequence[bytes]) -> Dict[bytes, List[Tag]]:
        """Cached tags for those of ``hashes`` that are present (pending writes included)."""
        found: Dict[bytes, List[Tag]] = {}
        if self._pending:
            self.flush()
        unique = list(dict.fromkeys(hashes))
        for i in range(0, len(unique), _LOOKUP_BATCH):
            part = unique[i : i + _LOOKUP_BATCH]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT chunk, tags FROM annotations WHERE model=? AND prompt=? AND chunk IN ({marks})",
                (self.model, self.prompt, *part),
            )
            for chunk, tags in rows:
                found[chunk] = [tuple(t) for t in json.loads(tags)]  # type: ignore[misc]
        return found

    def get(self, h: bytes) -> Optional[List[Tag]]:
        """Cached tags for one chunk hash, or None."""
        return self.get_many([h]).get(h)

    def put(self, h: bytes, tags: Iterable[Tag], tokens: int = 0) -> None:
        """Store tags for a chunk hash (buffered; see :meth:`flush`)."""
        payload = json.dumps([list(t) for t in tags], ensure_ascii=False)
        self._pending.append((self.model, self.prompt, h, payload, int(tokens), time.time()))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Commit buffered writes."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO annotations VALUES (?,?,?,?,?,?)", rows)

    def __len__(self) -> int:
        self.flush()
        (n,) = self._db.execute(
            "SELECT COUNT(*) FROM annotations WHERE model=? AND prompt=?", (self.model, self.prompt)
        ).fetchone()
        return int(n)

    def close(self) -> None:
        """Flush and close the database."""
        try:
            self.flush()
        finally:
            self._db.close()

    def __enter__(self) -> "AnnotationCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
