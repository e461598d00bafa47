"""Batched sampling with a KV cache, in three modes.

- ``anchored``: after the prompt the model writes ``<|ann|>``, then tags until it writes ``<|/ann|>`` (closed for it
  once ``max_annotation_tokens`` is reached), then the response until end-of-document or ``max_new_tokens``.
  The response and the sampled annotation are returned separately.
- ``conditioned``: the given annotation is part of the prompt (controllable generation); only the response is
  sampled.
- ``plain``: the response straight after the prompt (baselines trained without annotations).

In every mode the delimiter ids are banned while the response is sampled, so a response can never hold an
annotation token. The N samples of one prompt are one batch of identical-length rows: no padding is needed.
A sequence ends at the model's context length (``ModelSpec.max_positions``), as vLLM ends it at
``max_model_len``: a sample cut there is not ``finished`` (and its annotation not ``closed`` if it was still open).
Time per step grows with the batch times the vocabulary (the bans and the per-row bookkeeping) plus the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from megatron_anchor import bounds
from megatron_anchor.annotation.format import parse_annotation
from megatron_anchor.bounds import bounded
from megatron_anchor.inference.model import DecoderLM, KVCache

MODES = ("anchored", "conditioned", "plain")

_ANNOTATION, _RESPONSE, _DONE = 0, 1, 2


@dataclass
class SamplingParams:
    """How tokens are drawn."""

    temperature: float = bounded(1.0, ge=0)
    """Softmax temperature; 0 is greedy decoding."""
    top_k: int = bounded(0, ge=0)
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = bounded(1.0, gt=0, le=1)
    """Keep the smallest set of tokens whose probability reaches p (1.0: all)."""
    max_new_tokens: int = bounded(128, ge=1)
    """Cap on response tokens (the annotation has its own cap)."""
    max_annotation_tokens: int = bounded(64, ge=1)
    """Cap on annotation tokens in anchored mode; the closing delimiter is forced once it is reached."""
    use_cache: bool = True
    """Use the KV cache (False recomputes the whole prefix at every step: for benchmarks and checks only)."""

    def check(self) -> None:
        """Raise ValueError on settings that cannot sample (out of their declared ranges, or not finite)."""
        bounds.check(self, ValueError)


@dataclass
class Sample:
    """One generated sample."""

    response_ids: List[int]
    annotation_ids: List[int] = field(default_factory=list)
    """Tokens between the delimiters (anchored mode), delimiters excluded."""
    annotation_closed: bool = True
    """False when the annotation hit its cap and the closing delimiter was forced."""
    finished: bool = False
    """True when the response ended with end-of-document (not cut by max_new_tokens)."""


@dataclass
class GenerationStats:
    """Token counts and wall time of one :func:`generate_ids` call."""

    steps: int = 0
    annotation_tokens: int = 0
    response_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside top-k / the top-p nucleus to -inf. logits: [batch, vocab]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches p (the most likely token always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row from logits [batch, vocab] -> [batch]."""
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: DecoderLM, prompt_ids: Sequence[int], n: int, mode: str, params: SamplingParams,
                 eod: int, ann_open: int, ann_close: int, vocab_size: Optional[int] = None,
                 seed: Optional[int] = None, stats: Optional[GenerationStats] = None) -> List[Sample]:
    """Sample ``n`` continuations of ``prompt_ids`` (the formatted prompt; in conditioned mode it already ends
    with the given annotation). ``vocab_size``: ids at or beyond it (the embedding's padding rows) are never drawn.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    params.check()
    if not prompt_ids:
        raise ValueError("empty prompt")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    prompt = list(prompt_ids) + ([ann_open] if mode == "anchored" else [])
    ann_cap = params.max_annotation_tokens if mode == "anchored" else 0
    spec = model.spec
    limit = spec.max_positions
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {limit} positions")
    max_len = min(len(prompt) + ann_cap + 1 + params.max_new_tokens + 1, limit)
    cache = KVCache(spec, n, max_len) if params.use_cache else None
    seq = torch.tensor(prompt, dtype=torch.long).unsqueeze(0).repeat(n, 1)  # [n, prompt]
    v = spec.vocab_size
    # Bans per phase, as additive masks over the vocabulary.
    never = torch.zeros(v)
    if vocab_size is not None and vocab_size < v:
        never[vocab_size:] = float("-inf")
    ann_ban = never.clone()
    ann_ban[[eod, ann_open]] = float("-inf")
    resp_ban = never.clone()
    resp_ban[[ann_open, ann_close]] = float("-inf")
    phase = torch.full((n,), _ANNOTATION if mode == "anchored" else _RESPONSE)
    ann_len = torch.zeros(n, dtype=torch.long)
    resp_len = torch.zeros(n, dtype=torch.long)
    samples = [Sample(response_ids=[]) for _ in range(n)]

    logits = model(seq, 0, cache, last_only=True)[:, -1]
    pos = seq.shape[1]
    steps = 0
    while True:
        in_ann = phase == _ANNOTATION
        logits = logits + torch.where(in_ann[:, None], ann_ban, resp_ban)
        tok = draw(logits, params, gen)
        forced = in_ann & (ann_len >= ann_cap)
        tok = torch.where(forced, torch.full_like(tok, ann_close), tok)
        done = phase == _DONE
        tok = torch.where(done, torch.full_like(tok, eod), tok)  # finished rows idle on end-of-document
        for i in range(n):
            t, ph = int(tok[i]), int(phase[i])
            s = samples[i]
            if ph == _ANNOTATION:
                if t == ann_close:
                    s.annotation_closed = not bool(forced[i])
                    phase[i] = _RESPONSE
                else:
                    s.annotation_ids.append(t)
                    ann_len[i] += 1
            elif ph == _RESPONSE:
                if t == eod:
                    s.finished = True
                    phase[i] = _DONE
                else:
                    s.response_ids.append(t)
                    resp_len[i] += 1
                    if resp_len[i] >= params.max_new_tokens:
                        phase[i] = _DONE
        steps += 1
        if pos + 1 >= limit:  # the next token would have no position left: cut every open row here
            for i in range(n):
                if int(phase[i]) == _ANNOTATION:
                    samples[i].annotation_closed = False
            phase[:] = _DONE
        if bool((phase == _DONE).all()):
            break
        if cache is not None:
            logits = model(tok[:, None], pos, cache, last_only=True)[:, -1]
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq, 0, None, last_only=True)[:, -1]
        pos += 1
    if stats is not None:
        stats.steps += steps
        stats.prompt_tokens += len(prompt) * n
        stats.annotation_tokens += sum(len(s.annotation_ids) for s in samples)
        stats.response_tokens += sum(len(s.response_ids) for s in samples)
        stats.seconds += time.perf_counter() - t0
    return samples


def annotation_of(sample: Sample, tokenizer) -> dict:
    """The sampled annotation as text and parsed tags."""
    text = tokenizer.decode(sample.annotation_ids)
    return {"text": text, "tags": [list(t) for t in parse_annotation(text)], "closed": sample.annotation_closed}
