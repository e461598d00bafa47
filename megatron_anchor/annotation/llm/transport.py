"""HTTP transport to OpenAI-compatible ``/v1/chat/completions`` servers (vLLM): one answer per request body.

What it guarantees per request: an answer, or :class:`RequestFailed` with a short, groupable reason. On the way it:

- bounds the requests in flight (a semaphore; a retry waits for its backoff *outside* it, so a slow replica
  does not hold slots that healthy ones could use);
- retries connection errors, timeouts, 429 and 5xx with exponential backoff and full jitter (many clients that
  failed together must not come back together), honouring ``Retry-After``; other 4xx answers are final;
- spreads requests round-robin over several replica URLs and fails over: a replica that just failed is skipped
  for a cool-down while others are up;
- stops sending the answer's JSON schema (structured outputs) in ``auto`` mode when a server rejects the field,
  rebuilding the request without it;
- caps the response body it reads, so a runaway answer cannot exhaust memory.

The API key is held in :class:`~megatron_anchor.apikey.Secret`, whose ``repr`` and ``str`` hide it, and only ever
goes into the ``Authorization`` header. :class:`ClientConfig` holds the settings of both layers. What is asked and
how answers become tags is the annotation protocol, :mod:`megatron_anchor.annotation.llm.client`. Memory per request
is bounded by ``max_response_bytes``; the replica table grows with the number of URLs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import aiohttp

from megatron_anchor.annotation.llm.examples import DEFAULT_ECHO_POLICY
from megatron_anchor.annotation.llm.prompt import DEFAULT_MAX_CHUNK_CHARS, DEFAULT_WINDOW_CHARS, DEFAULT_WINDOW_CHUNKS
from megatron_anchor.annotation.llm.structured import DEFAULT_STRUCTURED, rejected_structured_output
from megatron_anchor.apikey import Secret
from megatron_anchor.bounds import bounded



@dataclass
class ClientConfig:
    """How the client talks to the annotator servers. Defaults suit a vLLM deployment."""

    urls: Sequence[str]
    """Replica base URLs (``http://host:port``, with or without ``/v1``); used round-robin."""
    model: Optional[str] = None
    """Served model name; None asks the first reachable replica's ``/v1/models``."""
    concurrency: int = bounded(32, ge=1)
    """Requests in flight at once, over all replicas (vLLM batches them; too few leaves it idle)."""
    request_timeout_s: float = bounded(120.0, gt=0)
    """Total time allowed for one request; a stalled replica is abandoned after it."""
    connect_timeout_s: float = bounded(10.0, gt=0)
    """Time allowed to open a connection."""
    max_attempts: int = bounded(8, ge=1)
    """Failed transport attempts (connection errors, timeouts, 429, 5xx) before a chunk fails."""
    retry_budget_s: float = bounded(600.0, gt=0)
    """Give up retrying a chunk after this many seconds since its first attempt."""
    backoff_base_s: float = bounded(0.5, ge=0)
    """First backoff ceiling; doubles per failed attempt."""
    backoff_max_s: float = bounded(30.0, ge=0)
    """Largest backoff ceiling."""
    cooldown_s: float = bounded(2.0, ge=0)
    """How long a replica that just failed is skipped while others are up."""
    parse_retries: int = bounded(2, ge=0)
    """Extra requests when an answer has no usable tags."""
    max_tokens: int = bounded(96, ge=1)
    """Generation cap per answer (tags are short; this also bounds a runaway answer). In document mode, per chunk
    of the window (plus 4 for its header)."""
    max_tokens_growth: int = bounded(4, ge=1)
    """An answer cut at the cap is asked again with twice the cap, up to this multiple of ``max_tokens``."""
    temperature: float = bounded(0.0, ge=0)
    """Sampling temperature of the first attempt (greedy: reproducible annotations)."""
    retry_temperature: float = bounded(0.7, ge=0)
    """Temperature for re-asking after an unparseable answer."""
    max_chunk_chars: int = bounded(DEFAULT_MAX_CHUNK_CHARS, ge=1)
    """Chunks are clipped to this many characters in the prompt."""
    request_mode: str = "document"
    """``document``: one request per window of a document's chunks; ``chunk``: one request per chunk."""
    window_chunks: int = bounded(DEFAULT_WINDOW_CHUNKS, ge=1)
    """Most chunks in one document-level request."""
    window_chars: int = bounded(DEFAULT_WINDOW_CHARS, ge=1)
    """Most characters of chunk text in one document-level request (longer chunks are clipped to it)."""
    structured: str = DEFAULT_STRUCTURED
    """Structured outputs (the answer's JSON schema in ``response_format``): ``auto``, ``on`` or ``off``."""
    echo_policy: str = DEFAULT_ECHO_POLICY
    """Tags that repeat the prompt's examples: ``reask`` (once, with other examples), ``drop`` or ``keep``."""
    max_response_bytes: int = bounded(1 << 20, ge=1)
    """Response bodies beyond this are refused."""
    api_key: Optional[Secret] = field(default=None, repr=False)
    """Bearer token, if the servers need one."""
    extra_body: Dict[str, Any] = field(default_factory=dict)
    """Extra fields merged into every request body (e.g. ``{"top_p": 0.9}``)."""


def normalize_url(url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all name the same server root."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


class RequestFailed(Exception):
    """A request that failed for good after its retries."""

    def __init__(self, reason: str, detail: str, attempts: int, final: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.attempts = attempts
        self.final = final
        """The server refused this request (e.g. HTTP 400: a prompt too long for its context, content it will
        not process); a smaller request may pass, unlike a server that stayed down through every retry."""


class _Retryable(Exception):
    """A transport-level failure worth another attempt."""

    def __init__(self, reason: str, detail: str = "", retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class _Final(Exception):
    """A failure that another attempt would not fix (e.g. HTTP 400)."""

    def __init__(self, reason: str, detail: str = "", status: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.status = status


def _describe_connection_error(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(e, aiohttp.ClientConnectorError):
        err = getattr(e, "os_error", None)
        if isinstance(err, ConnectionRefusedError) or "refused" in str(e).lower():
            return "connection refused"
        return "cannot connect"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "truncated response"
    if isinstance(e, (aiohttp.ClientOSError, ConnectionError)):
        return "connection reset"
    return f"connection error ({type(e).__name__})"


def _retry_after(headers: Any) -> Optional[float]:
    raw = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: rare from inference servers, and backoff covers it


class ChatTransport:
    """Sends chat-completion requests to a set of replicas with retries, fail-over and bounded concurrency.

    Use as ``async with`` (or :meth:`start` / :meth:`close` inside the running event loop)."""

    def __init__(self, config: ClientConfig):
        if not config.urls:
            raise ValueError("at least one annotator server URL is needed")
        self.config = config
        self.urls = [normalize_url(u) for u in config.urls]
        self.model: Optional[str] = config.model
        self._next = 0
        self._down_until = [0.0] * len(self.urls)
        self._sem: Optional[asyncio.Semaphore] = None
        self._model_lock: Optional[asyncio.Lock] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._rng = random.Random()
        self.structured_active = config.structured != "off"
        """Whether requests carry the answer's schema (``auto`` turns it off when a server rejects it)."""

    async def __aenter__(self) -> "ChatTransport":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the HTTP session (inside the running event loop)."""
        if self._session is not None:
            return
        cfg = self.config
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._model_lock = asyncio.Lock()
        connector = aiohttp.TCPConnector(limit=cfg.concurrency + len(self.urls), limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s)
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key.reveal()}"
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- replicas ------------------------------------------------------------------------------------------

    def _pick(self) -> int:
        """Next replica round-robin, skipping ones in cool-down unless all are."""
        now = time.monotonic()
        n = len(self.urls)
        for _ in range(n):
            i = self._next
            self._next = (self._next + 1) % n
            if self._down_until[i] <= now:
                return i
        return min(range(n), key=lambda j: self._down_until[j])

    def _mark_down(self, i: int) -> None:
        self._down_until[i] = time.monotonic() + self.config.cooldown_s

    async def resolve_model(self) -> str:
        """The served model name: the configured one, else the first id any replica lists in ``/v1/models``."""
        if self.model:
            return self.model
        await self.start()
        assert self._session is not None
        errors = []
        deadline = time.monotonic() + self.config.retry_budget_s
        attempt = 0
        while True:
            for url in self.urls:
                try:
                    async with self._session.get(url + "/v1/models") as resp:
                        if resp.status == 200:
                            data = await resp.json(content_type=None)
                            self.model = str(data["data"][0]["id"])
                            return self.model
                        errors.append(f"{url}: HTTP {resp.status}")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError, IndexError, ValueError) as e:
                    errors.append(f"{url}: {_describe_connection_error(e)}")
            attempt += 1
            if attempt >= self.config.max_attempts or time.monotonic() > deadline:
                raise ConnectionError("no annotator server answered /v1/models: " + "; ".join(errors[-len(self.urls):]))
            await asyncio.sleep(self._backoff(attempt, None))

    # -- requests ------------------------------------------------------------------------------------------

    def _backoff(self, failures: int, retry_after: Optional[float]) -> float:
        cfg = self.config
        ceiling = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (failures - 1)))
        delay = self._rng.uniform(0, ceiling)  # full jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max_s))
        return delay

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, or its first ``max_response_bytes + 1`` bytes when it is longer (checked by the caller)."""
        cap = self.config.max_response_bytes
        if resp.content_length is not None and resp.content_length > cap:
            return b"\0" * (cap + 1)  # refuse without reading it
        buf = bytearray()
        async for part in resp.content.iter_chunked(1 << 16):
            buf += part
            if len(buf) > cap:
                break
        return bytes(buf)

    async def _post(self, url: str, body: Dict[str, Any]) -> Tuple[str, int, bool]:
        """One request; returns (answer text, completion tokens, cut at the token cap) or raises
        _Retryable/_Final."""
        assert self._session is not None
        try:
            async with self._session.post(url + "/v1/chat/completions", json=body) as resp:
                status = resp.status
                headers = resp.headers
                raw = await self._read_capped(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _Retryable(_describe_connection_error(e), str(e)[:200]) from None
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", raw[:200].decode("utf-8", "replace"), _retry_after(headers))
        if status != 200:
            raise _Final(f"HTTP {status}", raw[:300].decode("utf-8", "replace"), status)
        if len(raw) > self.config.max_response_bytes:
            raise _Final("response too large", f"over {self.config.max_response_bytes} bytes")
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
            cut = choice.get("finish_reason") == "length"
            usage = data.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            # A 200 with a body that is not a chat completion: a proxy or a half-dead replica. Try again.
            raise _Retryable("malformed response", f"{type(e).__name__}: {raw[:120]!r}") from None
        return str(content), tokens, cut

    async def _send(self, make_body: Callable[[], Dict[str, Any]]) -> Tuple[str, int, int, bool]:
        """One answer: (content, completion tokens, requests sent, cut at the token cap), retrying transport
        failures with backoff.

        ``make_body`` is called again after ``auto`` structured outputs were turned off, so the retry goes without
        the field. Raises :class:`RequestFailed` when the retries are spent or the failure is final.
        """
        assert self._sem is not None
        cfg = self.config
        start = time.monotonic()
        attempts = failures = 0
        body = make_body()
        while True:
            attempts += 1
            i = -1
            try:
                async with self._sem:
                    i = self._pick()  # after the wait for a slot, so a replica that died meanwhile is skipped
                    content, used, cut = await self._post(self.urls[i], body)
            except _Retryable as e:
                self._mark_down(i)
                failures += 1
                if failures >= cfg.max_attempts or time.monotonic() - start > cfg.retry_budget_s:
                    raise RequestFailed(e.reason, f"gave up after {attempts} attempts: {e.detail}", attempts) from None
                await asyncio.sleep(self._backoff(failures, e.retry_after))
                continue
            except _Final as e:
                if (cfg.structured == "auto" and "response_format" in body
                        and rejected_structured_output(e.status, e.detail)):
                    # This server does not do structured outputs: free text from now on (requests sent before
                    # the first refusal came back are rebuilt here too).
                    self.structured_active = False
                    body = make_body()
                    continue
                # A refusal of the schema itself would refuse every smaller request too: no point in splitting.
                raise RequestFailed(e.reason, e.detail, attempts,
                              final=not rejected_structured_output(e.status, e.detail)) from None
            self._down_until[i] = 0.0
            return content, used, attempts, cut
