"""The one-shot GPU acceptance run (driven by ``benchmarks/gpu_acceptance.sh``, which installs what it needs).

Three phases, each under its own time limit, on the machine's first GPU:

1. the ``gpu``-marked tests (every test file that carries the marker);
2. the 1B recipe's architecture (``examples/gpu/model_sizes.sh``: 22 x 2048, GQA 16/8, SwiGLU 5632) in bf16 with
   Transformer Engine, the distributed optimizer with overlapped gradient reduce and parameter gather, every fused
   kernel, on THD-packed SFT-shaped batches (prompt, annotation, response, EOD; ``--loss-mask-policy
   sft-anchored`` through the role channel) for ``--steps`` steps: tokens/s, TFLOP/s, MFU and peak memory are the
   medians of the trainer's own log lines after ``--warmup`` steps;
3. ``benchmarks/bench_trainer.py`` on the same architecture: the trainer's whole loop (role channel + policy)
   against the stock megatron-core loop on megatron-core's ``GPTDataset``.

Writes everything to ``--out`` (JSON), with the targets (MFU >= 0.45, loop ratio <= 1.01) and whether they were
met. ``--smoke`` runs the same phases on CPU with a tiny model and no tests, to check the plumbing.

    python benchmarks/gpu_acceptance.py --out gpu_acceptance.json --model-args "--num-layers 22 ..."
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TARGET_MFU = 0.45
"""The issue's bar: Megatron-LM's published table gives 41% for a 1.7B GPT on H100 and 47-49% at 7-16B."""
TARGET_RATIO = 1.01
VOCAB = 32000
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| tokens/s: (\S+) \| TFLOP/s/GPU: (\S+) \|(?: MFU: (\S+)% \|)? "
                  r"peak memory: (\S+) GiB \(rank \d+\) \| ms/step: (\S+)")
SMOKE_MODEL = "--num-layers 2 --hidden-size 64 --ffn-hidden-size 256 --num-attention-heads 4 --swiglu " \
              "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear"


def write_packed_sft_data(prefix: str, tokens: int, seed: int = 0) -> str:
    """Synthetic SFT-shaped documents (prompt, annotation key/value, response, EOD) as a token + role dataset of
    about ``tokens`` tokens, vocabulary :data:`VOCAB` (NullTokenizer: EOD is the last id). Returns the prefix."""
    import numpy as np

    from megatron_anchor.data.indexed import write_token_role_documents
    from megatron_anchor.roles import Role

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < tokens:
        n_prompt, n_ann, n_resp = int(rng.integers(50, 400)), int(rng.integers(10, 60)), int(rng.integers(100, 1800))
        n = n_prompt + n_ann + n_resp + 1
        ids = rng.integers(0, VOCAB - 1, n).astype(np.uint16)
        ids[-1] = VOCAB - 1
        roles = np.empty(n, dtype=np.uint8)
        roles[:n_prompt] = int(Role.PROMPT)
        roles[n_prompt:n_prompt + n_ann] = int(Role.ANNOTATION_KEY)
        roles[n_prompt + n_ann // 2:n_prompt + n_ann] = int(Role.ANNOTATION_VALUE)
        roles[n_prompt + n_ann:-1] = int(Role.RESPONSE)
        roles[-1] = int(Role.EOD)
        docs.append((ids, roles))
        total += n
    write_token_role_documents(prefix, docs, np.uint16)
    return prefix


def _run(cmd: List[str], timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    try:
        return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(cmd, 124, out, err + f"\n(timed out after {timeout:.0f} s)")


def gpu_test_files() -> List[str]:
    """Every test file that carries the ``gpu`` marker."""
    tests = os.path.join(REPO, "tests")
    found = []
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name), encoding="utf-8") as fh:
                text = fh.read()
            if "pytest.mark.gpu" in text:
                found.append(os.path.join("tests", name))
    return found


def run_tests(timeout: float) -> Dict:
    files = gpu_test_files()
    proc = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files], timeout)
    tail = (proc.stdout + proc.stderr)[-4000:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    return {"files": files, "returncode": proc.returncode, "counts": counts, "tail": tail[-1500:]}


def parse_log(stdout: str, warmup: int) -> Dict:
    """Medians of the trainer's log lines after ``warmup`` iterations."""
    rows = [m.groups() for m in LINE.finditer(stdout)]
    steady = [r for r in rows if int(r[0]) > warmup] or rows
    if not steady:
        return {}

    def med(i):
        values = [float(r[i]) for r in steady if r[i] is not None]
        return statistics.median(values) if values else None

    mfu = med(3)
    return {"iterations_measured": len(steady), "tokens_per_s": med(1), "tflops_per_gpu": med(2),
            "mfu": mfu / 100 if mfu is not None else None, "peak_memory_gib": max(float(r[4]) for r in steady),
            "ms_per_step": med(5)}


def layers_impl() -> str:
    """transformer_engine when it imports here, else local (the report says which ran)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - without its CUDA libraries TE raises more than ImportError
        return "local"
    return "transformer_engine"


def train_args(args, data_prefix: str) -> List[str]:
    precision = [] if args.smoke else ["--bf16", "--transformer-impl", layers_impl(),
                                       "--use-distributed-optimizer", "--overlap-grad-reduce",
                                       "--overlap-param-gather"]
    return ["pretrain_anchor.py", *shlex.split(args.model_args), *precision,
            "--hidden-dropout", "0", "--attention-dropout", "0",
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.steps),
            "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "2", "--clip-grad", "1.0",
            "--data-path", data_prefix, "--split", "100,0,0", "--eval-iters", "0",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--reset-attention-mask",
            "--loss-mask-policy", "sft-anchored", "--log-interval", "1",
            "--data-cache-path", os.path.join(os.path.dirname(data_prefix), "cache")]


def run_training(args, work: str, timeout: float) -> Dict:
    tokens = (args.steps + 2) * args.global_batch_size * (args.seq_length + 1) * 2
    prefix = write_packed_sft_data(os.path.join(work, "sft_packed"), tokens)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           *train_args(args, prefix)]
    proc = _run(cmd, timeout)
    out = {"returncode": proc.returncode, "command": " ".join(shlex.quote(c) for c in cmd[3:])}
    out.update(parse_log(proc.stdout, args.warmup))
    fused = re.search(r"fused kernels on: (.*)", proc.stdout)
    out["fused_kernels"] = fused.group(1) if fused else None
    if proc.returncode != 0 or "tokens_per_s" not in out:
        out["tail"] = (proc.stdout + proc.stderr)[-3000:]
    return out


def run_bench(args, work: str, timeout: float) -> Dict:
    extra = args.model_args if args.smoke else \
        args.model_args + f" --bf16 --transformer-impl {layers_impl()} --use-distributed-optimizer"
    path = os.path.join(work, "bench.json")
    cmd = [sys.executable, os.path.join("benchmarks", "bench_trainer.py"), "--steps", str(args.bench_steps),
           "--block", "5", "--warmup", "2", "--seq-length", str(args.bench_seq_length),
           "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
           "--extra", extra, "--json", path]
    proc = _run(cmd, timeout)
    out = {"returncode": proc.returncode}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            figures = json.load(fh)
        out.update(ratio=figures["ratio"], median_ms=figures["median_ms"], data_path_ratio=figures["data_path_ratio"])
    else:
        out["tail"] = (proc.stdout + proc.stderr)[-3000:]
    return out


def environment() -> Dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for module in ("megatron.core", "transformer_engine"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[module] = getattr(mod, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - TE raises more than ImportError without its libraries
            info[module] = f"unavailable ({type(exc).__name__})"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_acceptance.json", help="the JSON report")
    ap.add_argument("--model-args", default=None, help="architecture flags (gpu_acceptance.sh passes the 1b entry "
                                                       "of examples/gpu/model_sizes.sh)")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="training steps of phase 2")
    ap.add_argument("--warmup", type=int, default=10, help="steps of phase 2 left out of the medians")
    ap.add_argument("--bench-steps", type=int, default=10, help="timed steps per arm in phase 3")
    ap.add_argument("--bench-seq-length", type=int, default=2048)
    ap.add_argument("--skip-tests", action="store_true", help="leave out phase 1")
    ap.add_argument("--test-timeout", type=float, default=240)
    ap.add_argument("--train-timeout", type=float, default=180)
    ap.add_argument("--bench-timeout", type=float, default=150)
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny model, fp32, local layers")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model_args = args.model_args or SMOKE_MODEL
        args.skip_tests = True
        args.seq_length, args.bench_seq_length, args.micro_batch_size, args.global_batch_size = 64, 64, 2, 4
        args.steps, args.warmup, args.bench_steps = 3, 1, 2
    elif not args.model_args:
        ap.error("--model-args is required (benchmarks/gpu_acceptance.sh passes the 1b recipe's)")

    start = time.time()
    report = {"environment": environment(), "layers": "local" if args.smoke else layers_impl(),
              "targets": {"mfu": TARGET_MFU, "loop_ratio": TARGET_RATIO}}
    work = tempfile.mkdtemp(prefix="gpu_acceptance_")
    if not args.skip_tests:
        print("phase 1: gpu-marked tests", flush=True)
        report["tests"] = run_tests(args.test_timeout)
        print(json.dumps(report["tests"]["counts"]), flush=True)
    print("phase 2: 1B architecture, bf16 + Transformer Engine + distributed optimizer, packed SFT", flush=True)
    report["train"] = run_training(args, work, args.train_timeout)
    print(json.dumps({k: v for k, v in report["train"].items() if k != "tail"}), flush=True)
    print("phase 3: trainer loop vs stock megatron-core loop", flush=True)
    report["bench"] = run_bench(args, work, args.bench_timeout)
    print(json.dumps({k: v for k, v in report["bench"].items() if k != "tail"}), flush=True)
    mfu, ratio = report["train"].get("mfu"), report["bench"].get("ratio")
    report["met"] = {"mfu": mfu is not None and mfu >= TARGET_MFU,
                     "loop_ratio": ratio is not None and ratio <= TARGET_RATIO}
    report["wall_s"] = round(time.time() - start, 1)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: tokens/s {report['train'].get('tokens_per_s')}, MFU {mfu}, peak memory "
          f"{report['train'].get('peak_memory_gib')} GiB, loop ratio {ratio}", flush=True)
    ok = report["train"].get("returncode") == 0 and report["bench"].get("returncode") == 0
    ok = ok and (args.skip_tests or report["tests"]["returncode"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
