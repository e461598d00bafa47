"""Batched sampling with a KV cache, in three modes.

- ``anchored``: after the prompt the model writes ``<|ann|>``, then tags until it writes ``<|/ann|>`` (closed for it
  once ``max_annotation_tokens`` is reached), then the response until end-of-document or ``max_new_tokens``.
  The response and the sampled annotation are returned separately.
- ``conditioned``: the given annotation is part of the prompt (controllable generation); only the response is
  sampled.
- ``plain``: the response straight after the prompt (baselines trained without annotations).

In every mode the delimiter ids are banned while the response is sampled, so a response can never hold an
annotation token. The samples of several prompts are one batch (:func:`generate_batch`): shorter prompts are
left-padded and every row computes what it would alone. A sequence ends at the model's context length
(``ModelSpec.max_positions``), as vLLM ends it at
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


def generate_ids(model: DecoderLM, prompt_ids: Sequence[int], n: int, mode: str, params: SamplingParams,
                 eod: int, ann_open: int, ann_close: int, vocab_size: Optional[int] = None,
                 seed: Optional[int] = None, stats: Optional[GenerationStats] = None) -> List[Sample]:
    """Sample ``n`` continuations of ``prompt_ids`` (the formatted prompt; in conditioned mode it already ends
    with the given annotation). ``vocab_size``: ids at or beyond it (the embedding's padding rows) are never drawn.
    """
    return generate_batch(model, [prompt_ids], [n], mode, params, eod, ann_open, ann_close, vocab_size, [seed],
                          stats)[0]


@torch.no_grad()
def generate_batch(model: DecoderLM, prompts: Sequence[Sequence[int]], ns: Sequence[int], mode: str,
                   params: SamplingParams, eod: int, ann_open: int, ann_close: int, vocab_size: Optional[int] = None,
                   seeds: Optional[Sequence[Optional[int]]] = None,
                   stats: Optional[GenerationStats] = None) -> List[List[Sample]]:
    """``ns[j]`` samples of each prompt ``prompts[j]``, all rows in one batch: prompts of different lengths are
    left-padded (:meth:`DecoderLM.forward`'s ``pad``), each prompt is run through the model once and its cache
    copied to its rows. The rows of prompt j draw from their own generator seeded ``seeds[j]``, the same number of
    draws per step as :func:`generate_ids` makes for that prompt alone (rows that already ended keep drawing and
    discard it, as they do alone), so with a seed a prompt's samples are those :func:`generate_ids` gives it:
    token for token, except where a padded batch's attention (masked, other batch shape) rounds a logit
    differently and that flips a draw (a near-tie in greedy decoding, or a uniform sitting on a CDF boundary).
    With ``seeds[j]`` None the rows draw from torch's global generator, in batch order: not reproducible alone.

    Memory: the KV cache, rows x slots x 2 (keys, values) x layers x kv_heads x head_dim floats of the model's
    dtype, with rows = sum(ns) and slots = min(longest prompt + annotation cap + max_new_tokens + 2,
    max padding + max_positions) (``longest prompt`` counts the annotation opener); plus one prompt's cache while
    the prompts are read, and rows x vocabulary logits. Padding costs the slots a shorter prompt leaves empty: group
    prompts of similar length to waste less. Without the cache (``use_cache=False``) the rows x slots token ids are
    recomputed every step. Time: one forward pass per prompt, then one batched step per token until the slowest row
    ends (a row stops at end-of-document, its caps or the context length).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    params.check()
    if len(prompts) != len(ns) or (seeds is not None and len(seeds) != len(prompts)):
        raise ValueError("prompts, ns and seeds must have one entry per prompt")
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    t0 = time.perf_counter()
    spec = model.spec
    limit = spec.max_positions
    full = [list(p) + ([ann_open] if mode == "anchored" else []) for p in prompts]
    for ids in full:
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {limit} positions")
    ann_cap = params.max_annotation_tokens if mode == "anchored" else 0
    longest = max(len(ids) for ids in full)
    pad_of = [longest - len(ids) for ids in full]
    row_prompt = [j for j, n in enumerate(ns) for _ in range(n)]  # the prompt of each row
    n = len(row_prompt)
    pad = torch.tensor([pad_of[j] for j in row_prompt], dtype=torch.long)  # [rows]
    padded = bool(pad.any())
    # A row's own positions end at the context length; with padding its slots run pad further.
    max_len = min(longest + ann_cap + 1 + params.max_new_tokens + 1, max(pad_of) + limit)
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in (seeds or [None] * len(prompts))]
    groups, at = [], 0  # rows [at, at + n_j) belong to prompt j
    for j, nj in enumerate(ns):
        groups.append((at, at + nj, gens[j]))
        at += nj
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

    # Each prompt goes through the model once, alone (no padding): its keys/values are copied to its rows.
    seq = torch.full((n, longest), eod, dtype=torch.long)  # [rows, slots], left-padded
    cache = KVCache(spec, n, max_len) if params.use_cache else None
    logits = torch.empty(n, v)
    for j, ids in enumerate(full):
        lo, hi, _ = groups[j]
        if lo == hi:
            continue
        seq[lo:hi, pad_of[j]:] = torch.tensor(ids, dtype=torch.long)
        one = KVCache(spec, 1, len(ids)) if cache is not None else None
        logits[lo:hi] = model(seq[lo:lo + 1, pad_of[j]:], 0, one, last_only=True)[0, -1].float()
        if cache is not None:
            for (k, val), (k1, v1) in zip(cache.layers, one.layers):
                k[lo:hi, :, pad_of[j]:longest] = k1
                val[lo:hi, :, pad_of[j]:longest] = v1
                # Padding slots get zero weight, but 0 x an uninitialised NaN would still poison the row.
                k[lo:hi, :, :pad_of[j]] = 0
                val[lo:hi, :, :pad_of[j]] = 0
    row_pad = pad if padded else None
    slot = longest
    steps = 0
    while True:
        in_ann = phase == _ANNOTATION
        logits = logits + torch.where(in_ann[:, None], ann_ban, resp_ban)
        tok = torch.empty(n, dtype=torch.long)
        for lo, hi, gen in groups:
            if lo < hi:
                tok[lo:hi] = draw(logits[lo:hi], params, gen)
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
        # A row whose next token would have no position left is cut here.
        cut = (slot + 1 - pad >= limit) & (phase != _DONE)
        for i in torch.nonzero(cut).flatten().tolist():
            if int(phase[i]) == _ANNOTATION:
                samples[i].annotation_closed = False
            phase[i] = _DONE
        if bool((phase == _DONE).all()):
            break
        if cache is not None:
            logits = model(tok[:, None], slot, cache, last_only=True, pad=row_pad)[:, -1]
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq, 0, None, last_only=True, pad=row_pad)[:, -1]
        slot += 1
    if stats is not None:
        stats.steps += steps
        stats.prompt_tokens += sum(len(ids) * nj for ids, nj in zip(full, ns))
        stats.annotation_tokens += sum(len(s.annotation_ids) for s in samples)
        stats.response_tokens += sum(len(s.response_ids) for s in samples)
        stats.seconds += time.perf_counter() - t0
    return [samples[lo:hi] for lo, hi, _ in groups]


def annotation_of(sample: Sample, tokenizer) -> dict:
    """The sampled annotation as text and parsed tags."""
    text = tokenizer.decode(sample.annotation_ids)
    return {"text": text, "tags": [list(t) for t in parse_annotation(text)], "closed": sample.annotation_closed}
