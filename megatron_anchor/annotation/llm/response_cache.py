"""An on-disk cache of annotations keyed by model, prompt version and the chunk's content hash.

SQLite (the standard library's, WAL mode) because it is crash-safe, needs no server, and a single file can be
copied between machines. A rerun or a resumed run looks every chunk up here first, so no chunk is paid for
twice. Only successful annotations are stored: failures are retried on the next run.

Writes are buffered and committed in batches (a commit per chunk would cap throughput at disk sync speed); a
kill loses at most the last uncommitted batch, which only costs re-asking the server for those chunks.

Several processes (the shards of a sharded or Ray run) may share one file. SQLite's busy timeout covers most
contention, but a few paths report "database is locked" at once instead of waiting (two connections creating the
file and switching it to WAL together, a read snapshot that went stale before a write); every database step
therefore retries on a lock error with backoff until ``timeout`` seconds have passed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

from megatron_anchor.annotation.format import Tag

_LOOKUP_BATCH = 500  # SQLite's default limit on bound parameters is 999 (older builds)

T = TypeVar("T")


def _is_lock_error(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def chunk_hash(text: str) -> bytes:
    """The content hash of a chunk (sha256 of its UTF-8 text)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class AnnotationCache:
    """A persistent map ``(model, prompt_id, chunk_hash) -> tags``.

    Not thread-safe: one job (one event loop) owns one instance. Several processes may share a file; SQLite
    serialises their writers. ``timeout``: how long a step may wait for another process's lock before it fails
    (``busy_timeout`` of it in SQLite's busy handler at a time, the rest in retries).
    """

    def __init__(self, path: Union[str, Path], model: str, prompt: str, flush_every: int = 256,
                 timeout: float = 300.0, busy_timeout: float = 5.0):
        self.path = Path(path)
        self.model = model
        self.prompt = prompt
        self.flush_every = flush_every
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite's own busy handler waits up to busy_timeout per step; _locked_retry carries on up to timeout.
        self._db = sqlite3.connect(str(self.path), timeout=min(busy_timeout, timeout), isolation_level=None)
        self._pending: List[Tuple[str, str, bytes, str, int, float]] = []
        try:
            self._locked_retry(self._init_schema)
        except BaseException:
            self._db.close()
            raise

    def _init_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable at checkpoints and crash-safe in WAL mode; FULL would sync on every commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS annotations ("
            " model TEXT NOT NULL, prompt TEXT NOT NULL, chunk BLOB NOT NULL,"
            " tags TEXT NOT NULL, tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,"
            " PRIMARY KEY (model, prompt, chunk)) WITHOUT ROWID"
        )

    def _locked_retry(self, step: Callable[[], T]) -> T:
        """Run one database step, retrying with jittered backoff while another process holds the lock."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return step()
            except sqlite3.OperationalError as e:
                if not _is_lock_error(e):
                    raise
                if self._db.in_transaction:
                    self._db.rollback()
                if time.monotonic() + delay > deadline:
                    raise sqlite3.OperationalError(
                        f"{self.path}: {e} for {self.timeout:.0f} s; another process holds the annotation "
                        "cache (a hung job, or a file system without working locks such as some network "
                        "mounts: give each job its own --cache there)"
                    ) from e
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    def get_many(self, hashes: Sequence[bytes]) -> Dict[bytes, List[Tag]]:
        """Cached tags for those of ``hashes`` that are present (pending writes included)."""
        found: Dict[bytes, List[Tag]] = {}
        if self._pending:
            self.flush()
        unique = list(dict.fromkeys(hashes))
        for i in range(0, len(unique), _LOOKUP_BATCH):
            part = unique[i : i + _LOOKUP_BATCH]
            marks = ",".join("?" * len(part))
            query = f"SELECT chunk, tags FROM annotations WHERE model=? AND prompt=? AND chunk IN ({marks})"
            params = (self.model, self.prompt, *part)
            rows = self._locked_retry(lambda: self._db.execute(query, params).fetchall())
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
        rows = self._pending
        self._locked_retry(lambda: self._write(rows))
        self._pending = []

    def _write(self, rows: List[Tuple[str, str, bytes, str, int, float]]) -> None:
        # IMMEDIATE takes the write lock up front (waiting in the busy handler), so the transaction never has to
        # upgrade a read snapshot that another writer made stale.
        with self._db:  # one transaction, committed on success and rolled back on error
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO annotations VALUES (?,?,?,?,?,?)", rows)

    def __len__(self) -> int:
        self.flush()
        (n,) = self._locked_retry(lambda: self._db.execute(
            "SELECT COUNT(*) FROM annotations WHERE model=? AND prompt=?", (self.model, self.prompt)
        ).fetchone())
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
