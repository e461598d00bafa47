"""The annotate job: raw JSONL in, annotated JSONL out, streaming and resumable.

Files (for ``--output OUT``):

- ``OUT``: annotated documents (:mod:`megatron_anchor.annotation.schema`), in input order;
- ``OUT.failed.jsonl``: documents with at least one chunk that could not be annotated, in the same schema (the
  chunks that failed have no ``tags``) plus ``"annotation_errors": [{"chunk": i, "reason": ..., "detail": ...}]``;
  feeding this file back as ``--input`` retries exactly those chunks. Input lines that are not documents are
  listed there too, with their line number;
- ``OUT.progress.json``: the checkpoint (input lines and bytes consumed, both outputs' sizes, the counters);
- ``OUT.cache.sqlite`` (unless ``--cache`` names another): the annotation cache.

Why nothing is lost or duplicated after a kill: documents are written strictly in input order, and a checkpoint
records, after an fsync, how many input lines are fully reflected in the outputs and how long the outputs were
at that moment. A resumed run truncates the outputs back to the checkpoint and re-reads the input from there.
Whatever was written after the last checkpoint is redone, at no server cost since the cache has it.

Its configuration (:class:`AnnotateConfig`), counters (:class:`Stats`) and summary live in
:mod:`megatron_anchor.annotation.annotate_config`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, TextIO, Tuple

from megatron_anchor import bounds
from megatron_anchor.annotation.annotate_config import AnnotateConfig, AnnotateError, Stats
from megatron_anchor.annotation.llm.response_cache import AnnotationCache, chunk_hash
from megatron_anchor.annotation.llm.client import Annotation, AnnotatorClient, WindowResult
from megatron_anchor.annotation.llm.prompt import plan_windows, prompt_id
from megatron_anchor.annotation.llm.tagschema import TagSchema, load_schema
from megatron_anchor.annotation.local import LocalAnnotator, LocalAnnotatorError, open_local_annotator
from megatron_anchor.annotation.schema import Document, DocumentError, parse_line
from megatron_anchor.outputs import OutputError, check_outputs, write_json
from megatron_anchor.sharding import seek_to_shard, shard_byte_range

PROGRESS_VERSION = 1
_DOC_COUNTS = ("annotated", "cached", "pretagged", "retried", "requests", "extra_requests", "failed", "tokens",
               "malformed", "truncated", "echo_only", "echoed", "echo_reasked", "echo_dropped")
"""Per-document counters summed into :class:`Stats` when the document is written."""
_ERRORS_KEY = "annotation_errors"
_READ_BLOCK = 256  # input lines parsed (and looked up in the cache) together


@dataclass
class _Doc:
    """A document in flight, waiting for its chunks."""

    line: int
    doc: Optional[Document]
    end: int = 0
    """Input byte offset just after this document's line (what a checkpoint records once it is written)."""
    pending: int = 0
    errors: List[Dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    bad_input: Optional[str] = None


def _input_fingerprint(path: Path) -> str:
    """Identifies the input: its name and its first 64 KiB (enough to tell files apart, cheap for huge ones)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return hashlib.sha256(path.name.encode() + b"\0" + head).hexdigest()[:16]


def _fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


class AnnotateJob:
    """One run of the annotate job. ``run()`` returns the final :class:`Stats`."""

    def __init__(self, config: AnnotateConfig, log: Optional[TextIO] = None):
        if config.annotator == "vllm" and (config.client is None or not config.client.urls):
            raise AnnotateError("the vllm annotator needs at least one server URL")
        if not config.input.is_file():
            raise AnnotateError(f"input {config.input} " + ("is a folder, not a file" if config.input.is_dir()
                                                            else "does not exist"))
        bounds.check(config, AnnotateError)
        if not config.shard_index < config.num_shards:
            raise AnnotateError(f"shard index must be in [0, {config.num_shards}); got {config.shard_index}")
        try:
            # A job truncates its outputs before it reads: an output that is the input would be emptied.
            check_outputs([("--output", config.output), ("--output (its failed file)", config.failed_path),
                           ("--output (its progress file)", config.progress_path),
                           ("--cache", config.cache_path or Path(str(config.output) + ".cache.sqlite"))],
                          [("--input", config.input), ("--schema", config.schema_path)])
        except OutputError as e:
            raise AnnotateError(str(e)) from None
        self.cfg = config
        self.log = log if log is not None else sys.stderr  # resolved late so redirection is honoured
        self.local: Optional[LocalAnnotator] = None
        """The embedded or distilled annotator (tags chunks in-process); None for servers."""
        if config.annotator != "vllm":
            try:
                self.local = open_local_annotator(config.annotator, config.schema_path)
            except LocalAnnotatorError as e:
                raise AnnotateError(str(e)) from None
        self.schema: TagSchema = (self.local.schema if self.local is not None and self.local.schema is not None
                                  else load_schema(config.schema_path))
        self.stats = Stats()
        self.client: Optional[AnnotatorClient] = None
        self.cache: Optional[AnnotationCache] = None
        self._docs: Deque[_Doc] = deque()
        self._inflight: Dict[bytes, "asyncio.Future[Annotation]"] = {}
        self._outstanding = 0
        self._changed: Optional[asyncio.Event] = None
        self._bar: Any = None
        self._run_tokens = 0
        self._run_chunks = 0
        self._t0 = time.monotonic()
        self._windows = config.annotator == "vllm" and config.client is not None and \
            config.client.request_mode == "document"
        """Document-level requests (chunks go to the server in windows of their document)."""

    # -- checkpoint ----------------------------------------------------------------------------------------

    def _load_checkpoint(self) -> Optional[Dict[str, Any]]:
        cfg = self.cfg
        if cfg.overwrite:
            for p in (cfg.output, cfg.failed_path, cfg.progress_path):
                p.unlink(missing_ok=True)
            return None
        if cfg.progress_path.exists():
            try:
                state = json.loads(cfg.progress_path.read_text())
                if not isinstance(state, dict) or not all(
                        isinstance(state.get(k), int) for k in ("out_bytes", "failed_bytes", "in_bytes", "lines_done")
                ) or not isinstance(state.get("stats"), dict):
                    raise ValueError("fields missing")
            except (OSError, ValueError) as exc:
                raise AnnotateError(f"{cfg.progress_path}: unreadable checkpoint ({exc}); rerun with --overwrite to "
                                    "start again (the cache keeps what was annotated)") from None
            if state.get("version") != PROGRESS_VERSION:
                raise AnnotateError(f"{cfg.progress_path}: unknown progress version; rerun with --overwrite")
            if state.get("input") != _input_fingerprint(cfg.input):
                raise AnnotateError(
                    f"{cfg.progress_path} belongs to another input than {cfg.input}; "
                    "use another --output or --overwrite"
                )
            for path, key in ((cfg.output, "out_bytes"), (cfg.failed_path, "failed_bytes")):
                size = path.stat().st_size if path.exists() else 0
                if size < state[key]:  # truncating "back" would pad with zeros: the file was changed
                    raise AnnotateError(
                        f"{path} is shorter ({size} bytes) than its checkpoint says ({state[key]}); it was "
                        "modified after the run: use --overwrite"
                    )
            return state
        if cfg.output.exists() and cfg.output.stat().st_size > 0:
            raise AnnotateError(
                f"{cfg.output} exists without a progress file; refusing to overwrite it (use --overwrite)"
            )
        return None

    def _checkpoint(self, out: Any, failed: Any, complete: bool = False) -> None:
        _fsync(out)
        _fsync(failed)
        if self.cache is not None:
            self.cache.flush()
        self.stats.seconds = self._elapsed_before + (time.monotonic() - self._t0)
        state = {
            "version": PROGRESS_VERSION,
            "input": _input_fingerprint(self.cfg.input),
            "input_path": str(self.cfg.input),
            "lines_done": self.stats.lines,
            "in_bytes": self._written_end,
            "out_bytes": out.tell(),
            "failed_bytes": failed.tell(),
            "complete": complete,
            "stats": self.stats.to_json(),
        }
        write_json(self.cfg.progress_path, state, fsync=True)  # atomic: a kill leaves the old or the new checkpoint
        self._last_checkpoint = time.monotonic()

    # -- annotation ----------------------------------------------------------------------------------------

    def _finish_chunk(self, d: _Doc, index: int, result: Annotation, shared: bool) -> None:
        assert d.doc is not None
        chunk = d.doc.chunks[index]
        if result.ok:
            chunk.tags = list(result.tags or [])
            d.counts["cached" if shared else "annotated"] += 1
        else:
            d.errors.append({"chunk": index, "reason": result.error, "detail": result.detail})
            d.counts["failed"] += 1
        if not shared:
            d.counts["tokens"] += result.tokens
            d.counts["retried"] += result.retries > 0
            d.counts["malformed"] += result.malformed
            d.counts["truncated"] += result.truncated
            d.counts["echo_only"] += result.echo_only
            d.counts["echoed"] += result.echoed
            d.counts["echo_reasked"] += result.echo_reasked
            d.counts["echo_dropped"] += result.echo_dropped
            if not self._windows:  # a window's requests are counted once (_request_window)
                d.counts["requests"] += result.attempts
                d.counts["extra_requests"] += result.retries
            self._run_tokens += result.tokens
        d.pending -= 1
        self._run_chunks += 1
        if self._bar is not None:
            self._bar.update(1)

    async def _request(self, h: bytes, text: str) -> Annotation:
        assert self.client is not None
        try:
            result = await self.client.annotate(text, h)
        except Exception as e:  # noqa: BLE001 - a bug must fail the chunk, not hang its document forever
            result = Annotation(None, "internal error", f"{type(e).__name__}: {e}")
        if result.ok and self.cache is not None:
            self.cache.put(h, result.tags or [], result.tokens)
        return result

    async def _request_window(self, d: _Doc, hashes: List[bytes], texts: List[str],
                              futures: List["asyncio.Future[Annotation]"]) -> None:
        """One document window: resolve each chunk's future, count the window's requests and tokens once."""
        assert self.client is not None
        key = hashlib.sha256(b"".join(hashes)).digest()
        try:
            res = await self.client.annotate_window(texts, key)
        except Exception as e:  # noqa: BLE001 - a bug must fail the chunks, not hang their document forever
            res = WindowResult([Annotation(None, "internal error", f"{type(e).__name__}: {e}") for _ in texts])
        d.counts["requests"] += res.requests
        d.counts["extra_requests"] += max(0, res.requests - 1)
        d.counts["tokens"] += res.tokens
        self._run_tokens += res.tokens
        for h, fut, result in zip(hashes, futures, res.annotations):
            result = result or Annotation(None, "internal error", "no result for the chunk")
            if result.ok and self.cache is not None:
                self.cache.put(h, result.tags or [], 0)
            fut.set_result(result)

    def _on_done(self, d: _Doc, index: int, shared: bool, fut: "asyncio.Future[Annotation]") -> None:
        self._outstanding -= 1
        self._finish_chunk(d, index, fut.result(), shared)
        assert self._changed is not None
        self._changed.set()

    def _track(self, h: bytes, fut: "asyncio.Future[Annotation]") -> None:
        self._inflight[h] = fut
        fut.add_done_callback(lambda _f, h=h: self._inflight.pop(h, None))

    def _wait_for(self, d: _Doc, index: int, fut: "asyncio.Future[Annotation]", shared: bool) -> None:
        self._outstanding += 1
        d.pending += 1
        fut.add_done_callback(lambda f, d=d, i=index, s=shared: self._on_done(d, i, s, f))

    def _submit(self, d: _Doc, index: int, h: bytes, text: str) -> None:
        """Chunk mode: one request per chunk; identical chunks in flight at once share it."""
        fut = self._inflight.get(h)
        shared = fut is not None
        if fut is None:
            fut = asyncio.ensure_future(self._request(h, text))
            self._track(h, fut)
        self._wait_for(d, index, fut, shared)

    def _submit_document(self, d: _Doc, items: List[Tuple[int, bytes]]) -> None:
        """Document mode: the document's chunks that need the server, in windows; a chunk identical to one
        already in flight waits for that one instead."""
        assert d.doc is not None and self.cfg.client is not None
        loop = asyncio.get_running_loop()
        fresh: List[Tuple[int, bytes, "asyncio.Future[Annotation]"]] = []
        for i, h in items:
            fut = self._inflight.get(h)
            if fut is not None:
                self._wait_for(d, i, fut, True)
                continue
            fut = loop.create_future()
            self._track(h, fut)
            self._wait_for(d, i, fut, False)
            fresh.append((i, h, fut))
        chunks = d.doc.chunks
        c = self.cfg.client
        for a, b in plan_windows([len(chunks[i].text) for i, _, _ in fresh], c.window_chunks, c.window_chars):
            part = fresh[a:b]
            asyncio.ensure_future(self._request_window(d, [h for _, h, _ in part], [chunks[i].text for i, _, _ in part],
                                                       [f for _, _, f in part]))

    def _start_block(self, block: List[_Doc]) -> None:
        """Annotate what can be done at once (embedded annotator, cache) and submit the rest."""
        todo = []  # (doc, chunk index)
        for d in block:
            if d.doc is None:
                continue
            for i, c in enumerate(d.doc.chunks):
                if c.tags is not None:
                    d.counts["pretagged"] += 1
                else:
                    todo.append((d, i))
        if self.local is not None:
            self._annotate_locally(todo)
            return
        hashes = [chunk_hash(d.doc.chunks[i].text) for d, i in todo]  # type: ignore[union-attr]
        hits = self.cache.get_many(hashes) if self.cache is not None else {}
        by_doc: Dict[int, Tuple[_Doc, List[Tuple[int, bytes]]]] = {}
        for (d, i), h in zip(todo, hashes):
            tags = hits.get(h)
            if tags is not None:
                d.doc.chunks[i].tags = tags  # type: ignore[union-attr]
                d.counts["cached"] += 1
                self._run_chunks += 1
                if self._bar is not None:
                    self._bar.update(1)
            elif self._windows:
                by_doc.setdefault(id(d), (d, []))[1].append((i, h))
            else:
                self._submit(d, i, h, d.doc.chunks[i].text)  # type: ignore[union-attr]
        for d, items in by_doc.values():
            self._submit_document(d, items)

    def _annotate_locally(self, todo: List[Tuple[_Doc, int]]) -> None:
        """The embedded or distilled annotator: the block's chunks in one batch, no server, no cache."""
        assert self.local is not None
        texts = [d.doc.chunks[i].text for d, i in todo]  # type: ignore[union-attr]
        for (d, i), tags in zip(todo, self.local.annotate_batch(texts)):
            d.doc.chunks[i].tags = tags  # type: ignore[union-attr]
            d.counts["annotated"] += 1
        self._run_chunks += len(todo)
        if self._bar is not None:
            self._bar.update(len(todo))

    # -- output --------------------------------------------------------------------------------------------

    def _write_ready(self, out: Any, failed: Any) -> None:
        """Write finished documents from the head of the queue, keeping input order."""
        s = self.stats
        while self._docs and self._docs[0].pending == 0:
            d = self._docs.popleft()
            s.lines += 1
            self._written_end = d.end
            if d.bad_input is not None:
                s.documents_failed += 1
                s.reasons["bad input"] = s.reasons.get("bad input", 0) + 1
                rec = {"line": d.line, _ERRORS_KEY: [{"reason": "bad input", "detail": d.bad_input}]}
                failed.write(json.dumps(rec, ensure_ascii=False) + "\n")
                continue
            if d.doc is None:  # a blank line
                continue
            s.documents += 1
            s.chunks += len(d.doc.chunks)
            for k in _DOC_COUNTS:
                setattr(s, k, getattr(s, k) + d.counts[k])
            if d.errors:
                s.documents_failed += 1
                for e in d.errors:
                    s.reasons[e["reason"]] = s.reasons.get(e["reason"], 0) + 1
                rec = d.doc.to_json()
                rec[_ERRORS_KEY] = d.errors
                failed.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                out.write(self.cfg.budget.cap(d.doc).to_jsonl() + "\n")

    # -- main loop -----------------------------------------------------------------------------------------

    async def _open_client(self) -> None:
        cfg = self.cfg
        if self.local is not None:
            return
        assert cfg.client is not None
        try:
            self.client = AnnotatorClient(cfg.client, self.schema)
        except ValueError as e:
            raise AnnotateError(str(e)) from None
        await self.client.start()
        model = await self.client.resolve_model()
        if cfg.use_cache:
            cache_path = cfg.cache_path or Path(str(cfg.output) + ".cache.sqlite")
            self.cache = AnnotationCache(cache_path, model, prompt_id(self.schema, cfg.client.request_mode))

    def _parse(self, raw: bytes, line_no: int) -> _Doc:
        if not raw.strip():
            return _Doc(line_no, None)
        where = f"{self.cfg.input}:{line_no}"
        try:
            doc = parse_line(raw.rstrip(b"\r\n"), where, self.cfg.text_key, self.schema.max_value_chars)
        except DocumentError as e:
            return _Doc(line_no, None, bad_input=str(e))
        doc.extra.pop(_ERRORS_KEY, None)  # a failed file fed back as input: drop the old reasons
        return _Doc(line_no, self.cfg.budget.merge(doc))

    async def _run(self) -> Stats:
        cfg = self.cfg
        state = self._load_checkpoint()
        if state is not None:
            self.stats = Stats.from_json(state["stats"])
            if state.get("complete"):
                print(f"annotate: {cfg.output} is already complete (use --overwrite to redo it)", file=self.log)
                return self.stats
        self._elapsed_before = self.stats.seconds
        self._changed = asyncio.Event()
        await self._open_client()
        window = max(1, cfg.window or 4 * (cfg.client.concurrency if cfg.client else 32))

        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        out = open(cfg.output, "a+b" if state else "wb")
        failed = open(cfg.failed_path, "a+b" if state else "wb")
        # Text mode on top of the binary files would buffer separately; write encoded bytes through wrappers.
        out_w, failed_w = _Utf8Writer(out), _Utf8Writer(failed)
        inp = open(cfg.input, "rb")
        try:
            # This run's byte range of the input (the whole file unless sharded) and the lines before it, so
            # messages name lines of the whole file.
            start, end = shard_byte_range(os.path.getsize(cfg.input), cfg.num_shards, cfg.shard_index)
            line_base = seek_to_shard(inp, start)
            if cfg.num_shards == 1:
                end = None  # a growing or unsized input (a pipe) is read to its end
            if state:
                out.truncate(state["out_bytes"])
                failed.truncate(state["failed_bytes"])
                out.seek(state["out_bytes"])
                failed.seek(state["failed_bytes"])
                inp.seek(state["in_bytes"])
                print(f"annotate: resuming {cfg.output} after input line {state['lines_done']}", file=self.log)
            self._last_checkpoint = time.monotonic()
            self._bar = self._make_bar()
            line_no = line_base + self.stats.lines
            offset = self._written_end = inp.tell()
            if not state:
                # A checkpoint before the first output byte: a run killed at any later point resumes instead of
                # finding an output without a progress file.
                self._checkpoint(out, failed)
            eof = False
            while True:
                # Read while there is room: in-flight requests below the window and the reorder queue bounded
                # (a slow head document must not let the queue grow without end).
                while not eof and self._outstanding < window and len(self._docs) < 64 * window:
                    block = []
                    for _ in range(_READ_BLOCK):
                        if cfg.limit is not None and line_no - line_base >= cfg.limit:
                            eof = True
                            break
                        if end is not None and offset >= end:  # the next line starts in the next shard
                            eof = True
                            break
                        raw = inp.readline()
                        if not raw:
                            eof = True
                            break
                        line_no += 1
                        offset += len(raw)
                        d = self._parse(raw, line_no)
                        d.end = offset
                        block.append(d)
                    self._start_block(block)
                    self._docs.extend(block)
                    self._write_ready(out_w, failed_w)
                    # Let the event loop run: in-process annotators never await, and Ctrl-C (asyncio cancels
                    # the main task) and finished requests are only seen at an await.
                    await asyncio.sleep(0)
                self._write_ready(out_w, failed_w)
                if time.monotonic() - self._last_checkpoint >= cfg.checkpoint_every_s:
                    self._checkpoint(out, failed)
                if eof and not self._docs:
                    break
                if self._outstanding:
                    self._changed.clear()
                    await self._changed.wait()
                self._refresh_bar()
            self._checkpoint(out, failed, complete=True)
        except asyncio.CancelledError:
            # Ctrl-C: everything written so far is whole (documents are written between awaits), so record it
            # and a rerun resumes here instead of at the last periodic checkpoint.
            self._checkpoint(out, failed)
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            inp.close()
            out.close()
            failed.close()
            if self.cache is not None:
                self.cache.close()
            if self.client is not None:
                await self.client.close()
        return self.stats

    def _make_bar(self) -> Any:
        if not self.cfg.progress:
            return None
        from tqdm import tqdm

        return tqdm(unit="chunk", desc="annotate", file=self.log, mininterval=0.5, smoothing=0.1, dynamic_ncols=True)

    def _refresh_bar(self) -> None:
        if self._bar is None:
            return
        elapsed = max(1e-9, time.monotonic() - self._t0)
        if time.monotonic() - getattr(self, "_bar_t", 0.0) >= 0.5:
            self._bar_t = time.monotonic()
            self._bar.set_postfix_str(f"gen {self._run_tokens / elapsed:.1f} tok/s", refresh=False)

    def run(self) -> Stats:
        """Run the job to completion (or until killed: rerun to resume)."""
        return asyncio.run(self._run())


class _Utf8Writer:
    """``write(str)`` onto a binary file, so its ``tell()`` stays exact for checkpoints."""

    def __init__(self, f: Any):
        self.f = f

    def write(self, s: str) -> None:
        self.f.write(s.encode("utf-8", "surrogatepass"))


def annotate_file(config: AnnotateConfig, log: Optional[TextIO] = None) -> Stats:
    """Run the annotate job described by ``config`` and return its counters."""
    return AnnotateJob(config, log).run()

