"""The annotation protocol over OpenAI-compatible ``/v1/chat/completions`` servers (vLLM): chunks in, tags out.

What it guarantees per chunk: a result, either tags or a failure with its reason, never an exception and never
a silent empty list. Retries, replica fail-over, bounded concurrency, structured-output negotiation and the
response cap are the transport's (:mod:`megatron_anchor.annotation.llm.transport`); on top of it this client:

- asks again (at a higher temperature, since the same greedy answer would come back) when an answer cannot be
  parsed, and gives up with the parser's reason after ``parse_retries``; in document mode it asks again only for
  the chunks that were missing or malformed in the answer;
- never takes a tag from the part of an answer that the token cap cut off (``finish_reason`` "length": its last
  value may be cut mid-word): such an answer is asked again at the same temperature with twice the cap, up to
  ``max_tokens_growth`` times the cap, before it counts as unparseable; in document mode the chunks the cut
  answer gave whole (complete JSON objects) are kept;
- catches tags that copy the prompt's examples and keeps, drops or re-asks them (``echo_policy``);
- sends the answer's JSON schema (structured outputs) while the servers take it.

The API key is held in :class:`Secret`, whose ``repr`` and ``str`` hide it, and only ever goes into the
``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_anchor.annotation.format import Tag
from megatron_anchor.annotation.llm.examples import ECHO_POLICIES, EXAMPLE_SETS, find_echoes, pick_example
from megatron_anchor.annotation.llm.parser import ParseResult, parse_document_output, parse_output
from megatron_anchor.annotation.llm.prompt import REQUEST_MODES, build_document_messages, build_messages
from megatron_anchor.annotation.llm.structured import STRUCTURED_MODES, chunk_schema, document_schema, structured_field
from megatron_anchor.annotation.llm.tagschema import TagSchema
from megatron_anchor.annotation.llm.transport import ChatTransport, ClientConfig, RequestFailed
from megatron_anchor.apikey import API_KEY_ENV, Secret, load_api_key  # noqa: F401 - re-exported for the tools


@dataclass
class Annotation:
    """The outcome for one chunk."""

    tags: Optional[List[Tag]]
    """Tags on success, None on failure."""
    error: Optional[str] = None
    """Why it failed (short and groupable, e.g. ``"HTTP 500"``, ``"connection refused"``)."""
    detail: Optional[str] = None
    """More about the failure (the last server message or parser complaint)."""
    attempts: int = 0
    """Requests sent for this chunk (in document mode: requests that carried it)."""
    tokens: int = 0
    """Completion tokens the servers reported generating for it (all attempts; 0 in document mode, where tokens
    belong to the window: :class:`WindowResult`)."""
    malformed: int = 0
    """Answers for this chunk that could not be parsed into valid tags (each followed by a re-ask, or the failure)."""
    echo_only: int = 0
    """Answers that parsed, but whose every tag repeated the prompt's examples (re-asked like malformed ones)."""
    echoed: int = 0
    """Tags of the first answer that repeated the prompt's examples."""
    echo_dropped: int = 0
    """Echoed tags removed from the final tags."""
    echo_reasked: bool = False
    """Whether the chunk was asked again because its answer repeated the examples."""
    truncated: int = 0
    """Answers for this chunk that the token cap cut short (each asked again with a larger cap, or, at the largest
    cap, counted in ``malformed`` too)."""

    @property
    def ok(self) -> bool:
        """True on success."""
        return self.tags is not None

    @property
    def retries(self) -> int:
        """Requests beyond the first."""
        return max(0, self.attempts - 1)


@dataclass
class WindowResult:
    """The outcome for a document window: one :class:`Annotation` per chunk, and what the window cost."""

    annotations: List[Optional[Annotation]]
    requests: int = 0
    tokens: int = 0


class AnnotatorClient(ChatTransport):
    """Annotate chunks through OpenAI-compatible servers. Use as ``async with AnnotatorClient(...) as c``."""

    def __init__(self, config: ClientConfig, schema: TagSchema):
        super().__init__(config)
        for name, value, allowed in (("request mode", config.request_mode, REQUEST_MODES),
                                     ("structured output", config.structured, STRUCTURED_MODES),
                                     ("echo policy", config.echo_policy, ECHO_POLICIES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")
        self.schema = schema

    # -- request bodies ------------------------------------------------------------------------------------

    @property
    def answer_format(self) -> str:
        """``json`` while structured outputs are in use, else ``lines``."""
        return "json" if self.structured_active else "lines"

    def _body(self, messages: List[Dict[str, str]], max_tokens: int, temperature: Optional[float],
              answer_schema: Dict[str, Any]) -> Dict[str, Any]:
        cfg = self.config
        body: Dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": cfg.temperature if temperature is None else temperature,
        }
        if self.structured_active:
            body.update(structured_field(cfg.structured, answer_schema) or {})
        body.update(cfg.extra_body)
        return body

    def request_body(self, text: str, temperature: Optional[float] = None, example: int = 0,
                     growth: int = 1) -> Dict[str, Any]:
        """The JSON body sent for one chunk (also used by the benchmark's bare loop); ``growth`` multiplies the
        token cap (an answer cut at the cap is asked again with a larger one)."""
        cfg = self.config
        messages = build_messages(text, self.schema, cfg.max_chunk_chars, example, self.answer_format)
        return self._body(messages, self.token_cap(None, growth), temperature, chunk_schema(self.schema))

    def document_body(self, texts: Sequence[str], temperature: Optional[float] = None,
                      example: int = 0, growth: int = 1) -> Dict[str, Any]:
        """The JSON body sent for a window of a document's chunks; ``max_tokens`` is the per-chunk cap times the
        chunks (plus their headers), times ``growth``."""
        cfg = self.config
        clip = min(cfg.max_chunk_chars, cfg.window_chars)
        messages = build_document_messages(texts, self.schema, clip, example, self.answer_format)
        return self._body(messages, self.token_cap(len(texts), growth), temperature,
                          document_schema(self.schema, len(texts)))

    def token_cap(self, window: Optional[int], growth: int = 1) -> int:
        """``max_tokens`` of a request: one chunk's cap (``window`` None), or a window's of ``window`` chunks (each
        with its header), times ``growth``."""
        cap = self.config.max_tokens
        return (cap if window is None else (cap + 4) * window) * growth

    def _grown(self, growth: int) -> Optional[int]:
        """The next cap multiple after an answer was cut at ``growth`` (None: already the largest)."""
        top = max(1, self.config.max_tokens_growth)
        return min(2 * growth, top) if growth < top else None

    async def _ensure_model(self) -> Optional[Annotation]:
        """Resolve the served model once; an :class:`Annotation` with the failure when no server answers."""
        if self._session is None:
            await self.start()
        if self.model is None:
            assert self._model_lock is not None
            async with self._model_lock:  # one /v1/models probe, not one per chunk
                try:
                    await self.resolve_model()
                except ConnectionError as e:
                    return Annotation(None, "no server", str(e))
        return None

    def _screen(self, tags: List[Tag], text: str, example: int, last: bool) -> Tuple[List[Tag], int, bool]:
        """Apply the echo policy: (tags to keep, echoes found, ask again?)."""
        hits = find_echoes(tags, EXAMPLE_SETS[example], text)
        policy = self.config.echo_policy
        if not hits or policy == "keep":
            return tags, len(hits), False
        if policy == "reask" and not last:
            return tags, len(hits), True
        drop = set(hits)
        return [t for j, t in enumerate(tags) if j not in drop], len(hits), False

    async def annotate(self, text: str, key: Optional[bytes] = None) -> Annotation:
        """Annotate one chunk; always returns an :class:`Annotation` (tags, or the reason there are none).

        ``key``: the chunk's content hash (picks the example set; computed when not given).
        """
        failed = await self._ensure_model()
        if failed is not None:
            return failed
        cfg = self.config
        key = key if key is not None else hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        out = Annotation(None)
        temperature: Optional[float] = None
        rounds = parse_failures = 0
        growth = 1
        while True:
            example = pick_example(key, rounds)
            try:
                content, used, n, cut = await self._send(
                    lambda: self.request_body(text, temperature, example, growth))
            except RequestFailed as e:
                out.error, out.detail, out.attempts = e.reason, e.detail, out.attempts + e.attempts
                return out
            out.attempts += n
            out.tokens += used
            if cut:
                out.truncated += 1
                grown = self._grown(growth)
                if grown is not None:  # the same question with room to finish the answer
                    growth = grown
                    continue
            rounds += 1
            temperature = cfg.retry_temperature  # the same greedy answer would come back
            # A cut answer's last value may be cut mid-word: nothing of it is taken.
            parsed = (ParseResult([], f"answer cut at the token cap ({self.token_cap(None, growth)} tokens)") if cut
                      else parse_output(content, self.schema))
            problem = parsed.problem
            if parsed.ok:
                tags, echoes, again = self._screen(parsed.tags, text, example, last=out.echo_reasked)
                if rounds == 1:
                    out.echoed = echoes
                if again:
                    out.echo_reasked = True
                    continue
                out.echo_dropped += len(parsed.tags) - len(tags)
                if tags:
                    out.tags = tags
                    return out
                problem = "only echoes of the prompt's examples"
                out.echo_only += 1
            else:
                out.malformed += 1
            parse_failures += 1
            if parse_failures > cfg.parse_retries:
                out.error, out.detail = "unparseable output", problem
                return out

    async def annotate_window(self, texts: Sequence[str], key: bytes) -> WindowResult:
        """Annotate a window of one document's chunks with document-level requests.

        Chunks missing or malformed in an answer are asked again (up to ``parse_retries`` times each, in one
        request for all of them). A window the server refuses (HTTP 4xx: too long for its context, or one chunk it
        will not process) is split in halves until the refused chunk is alone, so only that chunk fails. Every
        chunk gets an :class:`Annotation`. ``key`` (the window's content hash) picks the example set.
        """
        res = WindowResult([None] * len(texts))
        failed = await self._ensure_model()
        if failed is not None:
            res.annotations = [Annotation(None, failed.error, failed.detail) for _ in texts]
            return res
        await self._window(texts, list(range(len(texts))), key, res)
        return res

    async def _window(self, texts: Sequence[str], todo: List[int], key: bytes, res: WindowResult) -> None:
        cfg = self.config
        for i in todo:
            res.annotations[i] = Annotation(None)
        failures: Dict[int, int] = {i: 0 for i in todo}
        rounds = 0
        growth = 1
        while todo:
            example = pick_example(key, rounds)
            temperature = None if rounds == 0 else cfg.retry_temperature
            sub = [texts[i] for i in todo]
            try:
                content, used, n, cut = await self._send(
                    lambda: self.document_body(sub, temperature, example, growth))
            except RequestFailed as e:
                res.requests += e.attempts
                if e.final and len(todo) > 1:  # refused as a whole: halve it to isolate the cause
                    half = len(todo) // 2
                    await asyncio.gather(self._window(texts, todo[:half], key, res),
                                         self._window(texts, todo[half:], key, res))
                    return
                for i in todo:
                    a = res.annotations[i]
                    a.error, a.detail, a.attempts = e.reason, e.detail, a.attempts + e.attempts
                return
            res.requests += n
            res.tokens += used
            parsed: Dict[int, ParseResult] = parse_document_output(content, self.schema, len(todo))
            grown = None
            if cut:
                grown = self._grown(growth)
                self._distrust_cut(parsed, f"answer cut at the token cap ({self.token_cap(len(todo), growth)} tokens)")
            again: List[int] = []
            for j, i in enumerate(todo, 1):
                a = res.annotations[i]
                a.attempts += n
                a.truncated += cut
                p = parsed[j]
                if grown is not None and not p.ok:  # cut off, not wrong: asked again with room to finish
                    again.append(i)
                    continue
                problem = p.problem
                if p.ok:
                    tags, echoes, reask = self._screen(p.tags, texts[i], example, last=a.echo_reasked)
                    if rounds == 0:
                        a.echoed = echoes
                    if reask:
                        a.echo_reasked = True
                        again.append(i)
                        continue
                    a.echo_dropped += len(p.tags) - len(tags)
                    if tags:
                        a.tags = tags
                        continue
                    problem = "only echoes of the prompt's examples"
                    a.echo_only += 1
                else:
                    a.malformed += 1
                failures[i] += 1
                if failures[i] > cfg.parse_retries:
                    a.error, a.detail = "unparseable output", problem
                else:
                    again.append(i)
            if grown is not None:  # the next request repeats this one's temperature and examples
                growth = grown
            else:
                rounds += 1
            todo = again

    def _distrust_cut(self, parsed: Dict[int, ParseResult], why: str) -> None:
        """Drop what a cut answer may have given cut: every chunk without complete tags, and, in free text (whose
        sections have no closing mark), the last chunk that has tags. Complete JSON objects are whole."""
        for j, p in parsed.items():
            if not p.ok:
                parsed[j] = ParseResult([], why)
        if self.answer_format != "json":
            last = max((j for j, p in parsed.items() if p.ok), default=None)
            if last is not None:
                parsed[last] = ParseResult([], why)

    async def annotate_many(self, texts: Sequence[str]) -> List[Annotation]:
        """Annotate several chunks concurrently (bounded by ``concurrency``); results in input order."""
        return list(await asyncio.gather(*(self.annotate(t) for t in texts)))
